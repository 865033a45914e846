"""Process mesh, sequence layouts, communication accounting and softmax-attention sequence parallelism."""
from . import comm, layout, mesh
from .comm import count_collectives
from .layout import gather_sequence, local_positions, shard, unshard
from .mesh import Mesh, build_mesh, current_mesh, init_mesh, sp_group
from . import engines, local_attn
from .engines import CallShape, EngineSpec
from .allgather_attn import allgather_attention
from .ring_attn import ring_attention
from .ulysses import ulysses_attention
from . import tensor
from .tensor import apply_tensor_parallel

__all__ = ["comm", "layout", "mesh", "count_collectives", "gather_sequence", "local_positions", "shard", "unshard",
           "Mesh", "build_mesh", "current_mesh", "init_mesh", "sp_group",
           "engines", "CallShape", "EngineSpec",
           "local_attn", "allgather_attention", "ring_attention", "ulysses_attention",
           "tensor", "apply_tensor_parallel"]
from . import experts
from .experts import apply_expert_parallel, apply_global_router_counts
from .checkpointing import apply_activation_checkpointing
from . import short_conv
from .short_conv import sequence_parallel_short_conv

__all__ += ["experts", "apply_expert_parallel", "apply_global_router_counts", "apply_activation_checkpointing",
            "short_conv", "sequence_parallel_short_conv"]
