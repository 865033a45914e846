"""Process mesh, sequence layouts, communication accounting and softmax-attention sequence parallelism."""
from . import comm, layout, mesh
from .comm import count_collectives
from .layout import gather_sequence, local_positions, shard, unshard
from .mesh import Mesh, build_mesh, current_mesh, init_mesh, sp_group

__all__ = ["comm", "layout", "mesh", "count_collectives", "gather_sequence", "local_positions", "shard", "unshard",
           "Mesh", "build_mesh", "current_mesh", "init_mesh", "sp_group"]
