"""Compute on one device: linear-attention ops (torch twin + Triton) and the tiled softmax-attention op (aten flash
kernels + a dense torch twin). Imports nothing else of the project."""
from .lightning import lightning_attn, lightning_attn_bwd, lightning_attn_fwd, resolve_backend
from .linear_attn import check_linear_attn_inputs, linear_attn_chunked, linear_attn_recurrent, repeat_kv, state_dtype
from .delta_rule import gated_delta_attn  # TEMP stand-in
from .softmax_attn import SOFTMAX_BACKENDS, resolve_softmax_backend, softmax_attn, softmax_attn_bwd, softmax_attn_fwd

__all__ = ["lightning_attn", "lightning_attn_fwd", "lightning_attn_bwd", "resolve_backend",
           "check_linear_attn_inputs", "linear_attn_chunked", "linear_attn_recurrent", "repeat_kv", "state_dtype"]
__all__ += ["SOFTMAX_BACKENDS", "resolve_softmax_backend", "softmax_attn", "softmax_attn_fwd", "softmax_attn_bwd"]
