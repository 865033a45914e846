"""Causal linear attention with per-head scalar decay, in plain torch (runs anywhere).

Shapes: q, k (B, T, H, d_k); v, o (B, T, H, d_v); log_decay (H,) holding log λ_h ≤ 0;
states (B, H, d_k, d_v) in float32 (float64 for float64 inputs). Per head:

    S_t = λ S_{t-1} + k_tᵀ v_t,    o_t = q_t S_t,    S_{-1} = initial_state (0 if None)

`linear_attn_chunked` is the Lightning Attention-2 form, per block of c tokens entering with state P:

    O  = [(Q Kᵀ) ⊙ D] V + (Λ_q Q) P,    D_ij = λ^{i-j} (i ≥ j, else 0),  (Λ_q)_i = λ^{i+1}
    P' = λ^c P + (Λ_k K)ᵀ V,            (Λ_k)_i = λ^{c-1-i}

Only the intra-block product is quadratic (in c); cost per token is flat in T. `linear_attn_recurrent` is the
token-by-token definition, used only as a test oracle.
"""
import torch

__all__ = ["check_linear_attn_inputs", "state_dtype", "repeat_kv", "linear_attn_chunked",
           "linear_attn_recurrent"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and decay powers are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_linear_attn_inputs(q, k, v, log_decay=None, initial_state=None):
    """Raise ValueError naming the sizes when q, k, v, log_decay or a state do not fit together."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, T, H, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must share (B, T, H) with q {tuple(q.shape)}")
    B, _, H, d_k = q.shape
    if log_decay is not None:
        if log_decay.shape != (H,):
            raise ValueError(f"log_decay must have shape ({H},) for H={H} heads, got {tuple(log_decay.shape)}")
        if bool((log_decay > 0).any()) or not bool(torch.isfinite(log_decay).all()):
            raise ValueError(f"log_decay must be finite and <= 0 (λ = exp(log_decay) in (0, 1]), got {log_decay.tolist()}")
    if initial_state is not None and initial_state.shape != (B, H, d_k, v.shape[-1]):
        raise ValueError(f"initial_state must be (B, H, d_k, d_v) = {(B, H, d_k, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")


def repeat_kv(q, k, v, log_decay=None):
    """Grouped K/V heads (H_kv < H; query head i reads K/V head i // (H/H_kv)) repeated to q's H heads, with their
    decays (log_decay per K/V head, (H_kv,)) -> (k, v, log_decay) for an op that wants equal heads."""
    groups = q.shape[2] // k.shape[2]
    if groups == 1:
        return k, v, log_decay
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    return k, v, None if log_decay is None else log_decay.repeat_interleave(groups)


def _decay(log_decay, n):
    """λ_h^n for every head: (H, len(n)). Computed as exp(n·log λ) so strong decays underflow to 0, never NaN."""
    return torch.exp(log_decay[:, None] * n[None, :].to(log_decay.dtype))


def _chunk_scan(q, k, v, log_decay, state, c):
    """One pass over T = n·c tokens in (B, H, T, D) layout, entering with `state`. Returns (o, final state)."""
    B, H, T, _ = q.shape
    n = T // c
    q, k, v = (x.reshape(B, H, n, c, x.shape[-1]) for x in (q, k, v))
    i = torch.arange(c, device=q.device)
    diff = i[:, None] - i[None, :]                              # i - j, (c, c)
    scores = q @ k.transpose(-1, -2)                            # (B, H, n, c, c)
    if log_decay is None:
        mask = (diff >= 0).to(q.dtype)
        chunk_decay = None
    else:
        mask = _decay(log_decay, diff.clamp(min=0).flatten()).view(H, 1, c, c) * (diff >= 0)
        q = q * _decay(log_decay, i + 1).view(H, 1, c, 1)       # Λ_q Q
        chunk_decay = _decay(log_decay, torch.tensor([c], device=q.device)).view(H, 1, 1)
    o = (scores * mask) @ v                                     # intra (scores used the undecayed q)
    k_end = k if log_decay is None else k * _decay(log_decay, c - 1 - i).view(H, 1, c, 1)
    chunk_states = k_end.transpose(-1, -2) @ v                  # (B, H, n, d_k, d_v): (Λ_k K)ᵀ V
    prefixes = []
    for m_j in chunk_states.unbind(2):                          # P_{j+1} = λ^c P_j + M_j
        prefixes.append(state)                                  # (unbind, not [:, :, j]: its backward is one
        state = m_j + (state if chunk_decay is None else chunk_decay * state)  # stack, not n full-size zeros)
    o = o + q @ torch.stack(prefixes, dim=2)                    # inter: (Λ_q Q) P_j
    return o.reshape(B, H, T, -1), state


def linear_attn_chunked(q, k, v, log_decay=None, initial_state=None, chunk_len=64):
    """Chunked causal linear attention. (B,T,H,d_k)x2, (B,T,H,d_v) -> (o (B,T,H,d_v), final state (B,H,d_k,d_v)).

    Any T: the last partial block is a block of its own. Arithmetic in the state dtype; o in the input dtype.
    Differentiable by torch autograd (this is also the CPU backward).
    """
    check_linear_attn_inputs(q, k, v, log_decay, initial_state)
    B, T, H, d_k = q.shape
    sdt = state_dtype(q.dtype)
    qh, kh, vh = (x.transpose(1, 2).to(sdt) for x in (q, k, v))  # (B, H, T, D)
    ld = None if log_decay is None else log_decay.to(device=q.device, dtype=sdt)
    state = q.new_zeros(B, H, d_k, v.shape[-1], dtype=sdt) if initial_state is None else initial_state.to(sdt)
    main = T - T % chunk_len
    outs = []
    for start, stop in ((0, main), (main, T)):                  # full blocks, then the tail block
        if stop > start:
            c = min(chunk_len, stop - start)
            o, state = _chunk_scan(qh[:, :, start:stop], kh[:, :, start:stop], vh[:, :, start:stop], ld, state, c)
            outs.append(o)
    o = torch.cat(outs, dim=2) if outs else vh.new_zeros(B, H, 0, v.shape[-1])
    return o.transpose(1, 2).to(q.dtype), state


def linear_attn_recurrent(q, k, v, log_decay=None, initial_state=None):
    """Token-by-token recurrence S_t = λ S_{t-1} + k_tᵀ v_t, o_t = q_t S_t. Slow; a test oracle only."""
    check_linear_attn_inputs(q, k, v, log_decay, initial_state)
    B, T, H, d_k = q.shape
    sdt = state_dtype(q.dtype)
    lam = torch.ones(H, dtype=sdt) if log_decay is None else torch.exp(log_decay.to(sdt))
    lam = lam.to(q.device).view(1, H, 1, 1)
    S = q.new_zeros(B, H, d_k, v.shape[-1], dtype=sdt) if initial_state is None else initial_state.to(sdt)
    outs = []
    for t in range(T):
        S = lam * S + k[:, t, :, :, None].to(sdt) * v[:, t, :, None, :].to(sdt)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(sdt), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=sdt)
    return o.to(q.dtype), S
