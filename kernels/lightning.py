"""`lightning_attn`: the one public linear-attention op, with a Triton and a torch backend.

Shapes: q, k (B, T, H, d_k); v, o (B, T, H, d_v); log_decay (H,) ≤ 0; states (B, H, d_k, d_v) float32
(float64 for float64 inputs). Semantics: kernels/linear_attn.py.

The engines in lasp/ call `lightning_attn_fwd` / `lightning_attn_bwd` directly (no autograd), so that they can
overlap their collectives with the local compute and add the cross-rank terms themselves.
Backend: "triton" on CUDA tensors, "torch" otherwise; LASP_KERNEL_BACKEND=torch|triton overrides the default.
"""
import os

import torch

from .linear_attn import check_linear_attn_inputs, linear_attn_chunked, state_dtype

__all__ = ["lightning_attn", "lightning_attn_fwd", "lightning_attn_bwd", "resolve_backend"]

BACKENDS = ("triton", "torch")


def resolve_backend(backend, device):
    """None -> $LASP_KERNEL_BACKEND, else triton on CUDA and torch elsewhere."""
    backend = backend or os.environ.get("LASP_KERNEL_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def lightning_attn_fwd(q, k, v, log_decay=None, initial_state=None, backend="torch"):
    """No-grad forward -> (o, final_state)."""
    if backend == "triton":
        from .lightning_triton import triton_fwd
        return triton_fwd(q, k, v, log_decay, initial_state)
    with torch.no_grad():
        return linear_attn_chunked(q, k, v, log_decay, initial_state)


def lightning_attn_bwd(q, k, v, log_decay, initial_state, do, dfinal_state=None, backend="torch"):
    """Gradients (dq, dk, dv, dinitial_state) given do and, optionally, the gradient of the final state.

    dinitial_state is None when initial_state is None. The torch backend recomputes the forward under autograd.
    """
    if backend == "triton":
        from .lightning_triton import triton_bwd
        return triton_bwd(q, k, v, log_decay, initial_state, do, dfinal_state)
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        if initial_state is not None:
            leaves.append(initial_state.detach().requires_grad_())
        o, final = linear_attn_chunked(*leaves[:3], log_decay, leaves[3] if initial_state is not None else None)
        outs, grads = [o], [do]
        if dfinal_state is not None:
            outs.append(final)
            grads.append(dfinal_state.to(final.dtype))
        dx = torch.autograd.grad(outs, leaves, grads)
    return (*dx[:3], dx[3] if initial_state is not None else None)


class _LightningAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, backend):
        o, final = lightning_attn_fwd(q, k, v, log_decay, initial_state, backend)
        ctx.save_for_backward(q, k, v, log_decay, initial_state)
        ctx.backend = backend
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log_decay, initial_state = ctx.saved_tensors
        dq, dk, dv, ds = lightning_attn_bwd(q, k, v, log_decay, initial_state, do.contiguous(), dfinal, ctx.backend)
        return dq, dk, dv, None, ds, None


def lightning_attn(q, k, v, *, log_decay=None, initial_state=None, output_final_state=False, backend=None):
    """Causal linear attention with per-head decay -> (o (B,T,H,d_v), final_state (B,H,d_k,d_v) or None).

    Raises ValueError on wrong dims, non-float dtypes, a state of the wrong shape or log_decay > 0.
    log_decay is a constant of the model here (no gradient flows to it).
    """
    check_linear_attn_inputs(q, k, v, log_decay, initial_state)
    backend = resolve_backend(backend, q.device)
    if log_decay is not None:
        log_decay = log_decay.detach().to(device=q.device, dtype=state_dtype(q.dtype))
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype(q.dtype))
    o, final = _LightningAttn.apply(q, k, v, log_decay, initial_state, backend)
    return o, (final if output_final_state else None)
