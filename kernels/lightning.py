"""`lightning_attn`: the one public linear-attention op, with a Triton and a torch backend.

Shapes: q, k (B, T, H, d_k); v, o (B, T, H, d_v); log_decay (H,) ≤ 0 (a constant); log_gate (B, T, H) ≤ 0
(data-dependent, differentiable; the two add); states (B, H, d_k, d_v) float32 (float64 for float64 inputs).
Semantics: kernels/linear_attn.py.

The engines in lasp/ call `lightning_attn_fwd` / `lightning_attn_bwd` directly (no autograd), so that they can
overlap their collectives with the local compute and add the cross-rank terms themselves.
Backend: "triton" on CUDA tensors, "torch" otherwise; LASP_KERNEL_BACKEND=torch|triton overrides the default.
"""
import os

import torch

from .linear_attn import check_linear_attn_inputs, chunked_backward, chunked_forward, linear_attn_chunked, state_dtype

__all__ = ["lightning_attn", "lightning_attn_fwd", "lightning_attn_bwd", "resolve_backend"]

BACKENDS = ("triton", "torch")


def resolve_backend(backend, device):
    """None -> $LASP_KERNEL_BACKEND, else triton on CUDA and torch elsewhere."""
    backend = backend or os.environ.get("LASP_KERNEL_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def lightning_attn_fwd(q, k, v, log_decay=None, initial_state=None, backend="torch", log_gate=None, segment_ids=None):
    """No-grad forward -> (o, final_state)."""
    if backend == "triton":
        from .lightning_triton import triton_fwd
        return triton_fwd(q, k, v, log_decay, initial_state, log_gate=log_gate, segment_ids=segment_ids)
    return chunked_forward(q, k, v, log_decay, log_gate, initial_state, segment_ids=segment_ids)[:2]


def lightning_attn_bwd(q, k, v, log_decay, initial_state, do, dfinal_state=None, backend="torch", log_gate=None,
                       segment_ids=None):
    """Gradients (dq, dk, dv, dinitial_state, dlog_gate) given do and, optionally, the gradient of the final state.

    dinitial_state is None when initial_state is None, dlog_gate None when log_gate is None. The torch backend
    recomputes the block states with one state pass (kernels/linear_attn.py chunked_backward).
    """
    if backend == "triton":
        from .lightning_triton import triton_bwd
        return triton_bwd(q, k, v, log_decay, initial_state, do, dfinal_state, log_gate=log_gate,
                          segment_ids=segment_ids)
    return chunked_backward(q, k, v, log_decay, log_gate, initial_state, do, dfinal_state, segment_ids=segment_ids)


class _LightningAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, log_gate, initial_state, backend, segment_ids):
        o, final = lightning_attn_fwd(q, k, v, log_decay, initial_state, backend, log_gate, segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, log_gate, initial_state, segment_ids)
        ctx.backend = backend
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log_decay, log_gate, initial_state, segment_ids = ctx.saved_tensors
        dq, dk, dv, ds, dg = lightning_attn_bwd(q, k, v, log_decay, initial_state, do.contiguous(), dfinal,
                                                ctx.backend, log_gate, segment_ids)
        return dq, dk, dv, None, dg, ds, None, None


def lightning_attn(q, k, v, *, log_decay=None, log_gate=None, initial_state=None, output_final_state=False,
                   backend=None, segment_ids=None):
    """Causal linear attention with per-head decay and gates -> (o (B,T,H,d_v), final_state (B,H,d_k,d_v) or None).

    segment_ids (B, T) integer, non-decreasing per row: packed documents, the state emptied at the first token of
    each (S_t = k_tᵀ v_t there); an initial_state belongs to the document of token 0 (kernels/documents.py).
    Raises ValueError on wrong dims, non-float dtypes, a state of the wrong shape, log_decay > 0, a log_gate
    that is not (B, T, H) on q's device, or has positive or non-finite entries, or segment_ids of the wrong
    shape, dtype or order.
    log_decay is a constant of the model here (no gradient flows to it); log_gate is differentiable.
    """
    check_linear_attn_inputs(q, k, v, log_decay, initial_state, log_gate, segment_ids=segment_ids)
    backend = resolve_backend(backend, q.device)
    if log_decay is not None:
        log_decay = log_decay.detach().to(device=q.device, dtype=state_dtype(q.dtype))
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q.dtype))
    if backend == "torch":                  # its own autograd Function, which keeps the block-entry states
        o, final = linear_attn_chunked(q, k, v, log_decay, initial_state, log_gate=log_gate, segment_ids=segment_ids)
    else:
        o, final = _LightningAttn.apply(q, k, v, log_decay, log_gate, initial_state, backend, segment_ids)
    return o, (final if output_final_state else None)
