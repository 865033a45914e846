"""Local math shared by the LASP engines: chunk states and the cross-rank terms, on one rank's segments.

Shapes: q (S, c, H, d_k), do (S, c, H, d_v); k (S, c, H_kv, d_k), v (S, c, H_kv, d_v), where the S = B·n rows
are the rank's n segments of c tokens for each batch row (n = 1 contiguous, 2 zigzag); states P, G, M
(S, H_kv, d_k, d_v) in the state dtype. Grouped heads: query head i reads key/value head i // (H / H_kv), so the
states, and every message of the engines, count the H_kv distinct K/V heads only; log_decay is (H_kv,).
With λ = exp(log_decay) per head and t = 0..c−1 the position inside a segment:

    M  = Σ_t λ^{c−1−t} k_tᵀ v_t            (the segment's own state, decayed to its end)
    dM = Σ_t λ^{t+1} q_tᵀ do_t             (gradient flowing into the state that enters the segment)
    o_t  += λ^{t+1} q_t P                  dq_t += λ^{t+1} do_t Pᵀ
    dk_t += λ^{c−1−t} v_t Gᵀ               dv_t += λ^{c−1−t} k_t G
"""
import torch

from kernels import check_linear_attn_inputs, lightning_attn_bwd, lightning_attn_fwd, repeat_kv, state_dtype
from parallel import layout as layouts

__all__ = ["check_engine_inputs", "to_segments", "from_segments", "local_state", "state_grad",
           "add_prefix_output", "add_state_grads", "intra_forward", "intra_backward", "constant_decay"]


def check_engine_inputs(q, k, v, log_decay, causal, layout):
    """ValueError naming the sizes, raised before any collective. Returns the segment length c."""
    if q.dim() == 4 and k.dim() == 4 and k.shape[2] and q.shape[2] != k.shape[2]:
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"q has {q.shape[2]} heads, k and v {k.shape[2]}: the query heads must be a multiple "
                             f"of the key/value heads (q {tuple(q.shape)}, k {tuple(k.shape)})")
        q = q[:, :, ::q.shape[2] // k.shape[2]]                            # check sizes over the K/V heads
    check_linear_attn_inputs(q, k, v, log_decay)
    if log_decay is not None and not causal:
        raise ValueError("log_decay needs causal=True: decay is only defined for causal attention")
    return layouts.check_local_len(q.shape[1], layout)


def constant_decay(log_decay, q):
    """log_decay as the engines use it: a constant (no gradient) in the state dtype on q's device, or None."""
    return None if log_decay is None else log_decay.detach().to(device=q.device, dtype=state_dtype(q.dtype))


def to_segments(x, n):
    """(B, n·c, H, D) -> (B·n, c, H, D), a view."""
    return x.unflatten(1, (n, x.shape[1] // n)).flatten(0, 1)


def from_segments(x, n):
    """(B·n, c, H, D) -> (B, n·c, H, D), a view."""
    return x.unflatten(0, (x.shape[0] // n, n)).flatten(1, 2)


def _powers(log_decay, c, first, step, dtype):
    """λ^{first + step·t} for t = 0..c−1 as (1, c, H, 1), or None without decay."""
    if log_decay is None:
        return None
    t = torch.arange(c, device=log_decay.device, dtype=dtype)
    return torch.exp((first + step * t)[:, None] * log_decay.to(dtype)[None, :])[None, :, :, None]


def _scaled(x, powers, dtype):
    x = x.to(dtype)
    return x if powers is None else x * powers


def _grouped(x, n_kv):
    """(S, c, H, D) -> (S, c, H_kv, H/H_kv, D), a view: query head i is (i // G, i % G)."""
    return x.unflatten(2, (n_kv, x.shape[2] // n_kv))


def _grouped_scaled(x, powers, dtype, n_kv):
    return _grouped(_scaled(x, None if powers is None else powers.repeat_interleave(x.shape[2] // n_kv, 2), dtype),
                    n_kv)


def intra_forward(q, k, v, log_decay, backend):
    """O_intra = [(Q Kᵀ) ⊙ D] V per segment, zero initial state."""
    return lightning_attn_fwd(q, *repeat_kv(q, k, v, log_decay), None, backend)[0]


def intra_backward(q, k, v, log_decay, do, backend):
    """(dq, dk, dv) of the intra term; dk, dv summed over each K/V head's query group."""
    groups = q.shape[2] // k.shape[2]
    dq, dk, dv = lightning_attn_bwd(q, *repeat_kv(q, k, v, log_decay), None, do, None, backend)[:3]
    if groups > 1:
        dk, dv = (x.unflatten(2, (k.shape[2], groups)).sum(3) for x in (dk, dv))
    return dq, dk, dv


def local_state(k, v, log_decay):
    sdt = state_dtype(k.dtype)
    c = k.shape[1]
    return torch.einsum("sthk,sthv->shkv", _scaled(k, _powers(log_decay, c, c - 1, -1, sdt), sdt), v.to(sdt))


def state_grad(q, do, log_decay, n_kv):
    """dM per K/V head: summed over its query heads."""
    sdt = state_dtype(q.dtype)
    qd = _grouped_scaled(q, _powers(log_decay, q.shape[1], 1, 1, sdt), sdt, n_kv)
    return torch.einsum("sthgk,sthgv->shkv", qd, _grouped(do.to(sdt), n_kv))


def add_prefix_output(o, q, prefix, log_decay):
    """o + λ^{t+1} q_t P (P of the query head's K/V head), returned in o's dtype."""
    sdt, n_kv = prefix.dtype, prefix.shape[1]
    qd = _grouped_scaled(q, _powers(log_decay, q.shape[1], 1, 1, sdt), sdt, n_kv)
    inter = torch.einsum("sthgk,shkv->sthgv", qd, prefix).flatten(2, 3)
    return (o.to(sdt) + inter).to(o.dtype)


def add_state_grads(dq, dk, dv, q, k, v, do, prefix, suffix, log_decay):
    """Add the cross-segment terms of the gradients given the prefix P and the suffix gradient G."""
    sdt = prefix.dtype
    c = q.shape[1]
    kd = _powers(log_decay, c, c - 1, -1, sdt)
    dod = _grouped_scaled(do, _powers(log_decay, c, 1, 1, sdt), sdt, prefix.shape[1])
    dq = dq.to(sdt) + torch.einsum("sthgv,shkv->sthgk", dod, prefix).flatten(2, 3)
    dk = dk.to(sdt) + torch.einsum("sthv,shkv->sthk", _scaled(v, kd, sdt), suffix)
    dv = dv.to(sdt) + torch.einsum("sthk,shkv->sthv", _scaled(k, kd, sdt), suffix)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
