"""Local math shared by the LASP engines: chunk states and the cross-rank terms, on one rank's segments.

Shapes: q (S, c, H, d_k), do (S, c, H, d_v); k (S, c, H_kv, d_k), v (S, c, H_kv, d_v), where the S = B·n rows
are the rank's n segments of c tokens for each batch row (n = 1 contiguous, 2 zigzag); states P, G, M
(S, H_kv, d_k, d_v) in the state dtype; log_gate (S, c, H_kv). Grouped heads: query head i reads key/value head
i // (H / H_kv), so the states, and every message of the engines, count the H_kv distinct K/V heads only;
log_decay is (H_kv,). Per segment, a_t = log λ + g_t (log_decay and log_gate add; either may be absent) and
A_t = Σ_{s≤t} a_s, A_e = A_{c−1} (the segment's total, summed in float64); constant decay: A_t = (t+1)·log λ.

    M  = Σ_t e^{A_e − A_t} k_tᵀ v_t         (the segment's own state, decayed to its end)
    dM = Σ_t e^{A_t} q_tᵀ do_t              (gradient flowing into the state that enters the segment)
    o_t  += e^{A_t} q_t P                   dq_t += e^{A_t} do_t Pᵀ
    dk_t += e^{A_e − A_t} v_t Gᵀ            dv_t += e^{A_e − A_t} k_t G           (G: gradient of the state leaving)
    the state leaving is e^{A_e} P + M, so with b_u = k_u·dk_u^{via G}:
    dg_s += Σ_{u≥s} q_u·dq_u^{via P} + Σ_{u<s} b_u + e^{A_e} <P, G>    (g_s scales every product it spans)

Packed documents (ids (S, c) per segment, non-decreasing; kernels/documents.py): the kernel's convention is kept,
the state entering a segment belongs to the document of its token 0, so an engine passes P already multiplied by
keep = [ids_0 = the id before the segment in global order]. The weights above become e^{A_t}·[ids_t = ids_0] and
e^{A_e − A_t}·[ids_t = ids_{c−1}], the segment's transition e^{A_e}·[ids_{c−1} = ids_0] (0 with a reset inside),
and dM the kernel's (the caller applies keep, as the fold masks of lasp2.py do).

Only differences of inclusive cumulative sums that are ≤ 0 are exponentiated, so nothing overflows.
The products run per (segment, head) as batched matmuls on strided views, accumulating in place into the
kernel's fresh outputs: no permuted copies of the (c, H, D) tensors, no grouped einsum views.
"""
import torch

from lasp.kernels import (check_linear_attn_inputs, lightning_attn_bwd, lightning_attn_fwd, repeat_kv,
                     state_dtype)
from lasp.kernels.documents import check_segment_ids
from lasp.kernels.linear_attn import (chunked_backward, chunked_forward, deferred_grads, deferred_outputs,
                                 deferred_state_grads, deferred_states)
from lasp.parallel import layout as layouts

__all__ = ["check_engine_inputs", "check_log_gate", "to_segments", "from_segments", "local_state", "state_grad",
           "add_prefix_output", "add_state_grads", "add_suffix_grads", "add_total_grad", "segment_log_totals",
           "intra_forward", "local_forward", "local_backward", "deferred_forward",
           "deferred_backward", "constant_decay"]


def check_log_gate(log_gate, q, k, causal):
    """ValueError naming the shapes unless log_gate is (B, T_local, H_kv) on q's device, in q's or the state dtype,
    finite and ≤ 0, with causal=True. Call before any collective (the value check syncs with the device)."""
    want = (q.shape[0], q.shape[1], k.shape[2])
    if tuple(log_gate.shape) != want:
        raise ValueError(f"log_gate must be (B, T_local, H_kv) = {want} for q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"got {tuple(log_gate.shape)}")
    if log_gate.dtype not in (q.dtype, state_dtype(q.dtype)):
        raise ValueError(f"log_gate {tuple(log_gate.shape)} has dtype {log_gate.dtype}; q {tuple(q.shape)} is "
                         f"{q.dtype}: use {q.dtype} or {state_dtype(q.dtype)}")
    if log_gate.device != q.device:
        raise ValueError(f"log_gate {tuple(log_gate.shape)} is on {log_gate.device}, q {tuple(q.shape)} on {q.device}")
    if not causal:
        raise ValueError(f"log_gate {tuple(log_gate.shape)} needs causal=True: gates are only defined for causal "
                         f"attention")
    if log_gate.numel() and not bool((torch.isfinite(log_gate) & (log_gate <= 0)).all()):
        raise ValueError(f"log_gate {tuple(log_gate.shape)} must be finite and <= 0 (gates e^g in (0, 1])")


def check_engine_inputs(q, k, v, log_decay, causal, layout, log_gate=None, segment_ids=None):
    """ValueError naming the sizes, raised before any collective. Returns the segment length c.
    segment_ids (B, T_local): integer, non-decreasing along each row, causal only (documents.check_segment_ids)."""
    if q.dim() == 4 and k.dim() == 4 and k.shape[2] and q.shape[2] != k.shape[2]:
        if q.shape[2] % k.shape[2]:
            raise ValueError(f"q has {q.shape[2]} heads, k and v {k.shape[2]}: the query heads must be a multiple "
                             f"of the key/value heads (q {tuple(q.shape)}, k {tuple(k.shape)})")
        q = q[:, :, ::q.shape[2] // k.shape[2]]                            # check sizes over the K/V heads
    check_linear_attn_inputs(q, k, v, log_decay)
    if log_decay is not None and not causal:
        raise ValueError("log_decay needs causal=True: decay is only defined for causal attention")
    if log_gate is not None:
        check_log_gate(log_gate, q, k, causal)
    c = layouts.check_local_len(q.shape[1], layout)
    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[:2], q.device)
        if not causal:
            raise ValueError(f"segment_ids {tuple(segment_ids.shape)} need causal=True: the linear engines keep "
                             f"packed documents apart in causal attention only")
    return c


def constant_decay(log_decay, q):
    """log_decay as the engines use it: a constant (no gradient) in the state dtype on q's device, or None."""
    return None if log_decay is None else log_decay.detach().to(device=q.device, dtype=state_dtype(q.dtype))


def to_segments(x, n):
    """(B, n·c, ...) -> (B·n, c, ...), a view."""
    return x.unflatten(1, (n, x.shape[1] // n)).flatten(0, 1)


def from_segments(x, n):
    """(B·n, c, ...) -> (B, n·c, ...), a view."""
    return x.unflatten(0, (x.shape[0] // n, n)).flatten(1, 2)


def _cum_gate(log_gate, log_decay):
    """A (S, c, H_kv) float64: the inclusive cumulative sum of a = log_gate + log_decay inside each segment."""
    a = log_gate.double() if log_decay is None else log_gate.double() + log_decay.double()
    return a.cumsum(1)


def _weights(log_decay, log_gate, c, dtype, to_end, ids=None):
    """e^{A_t} (to_end False) or e^{A_e − A_t} (to_end True) as (1 or S, c, H_kv, 1); None without decay or gate.
    ids (S, c): times [ids_t = ids_0] ([ids_t = ids_{c−1}] to_end), the mask alone without decay or gate."""
    w = _decay_weights(log_decay, log_gate, c, dtype, to_end)
    if ids is None:
        return w
    mask = (ids == ids[:, -1:] if to_end else ids == ids[:, :1]).to(dtype)[:, :, None, None]
    return mask if w is None else w * mask


def _decay_weights(log_decay, log_gate, c, dtype, to_end):
    if log_gate is not None:
        A = _cum_gate(log_gate, log_decay)
        return (A[:, -1:] - A if to_end else A).exp().to(dtype)[..., None]
    if log_decay is None:
        return None
    t = torch.arange(c, device=log_decay.device, dtype=dtype)
    power = (c - 1 - t) if to_end else (t + 1)
    return torch.exp(power[:, None] * log_decay.to(dtype)[None, :])[None, :, :, None]


def segment_log_totals(log_decay, log_gate, c):
    """A_e per segment: (S, H_kv) float64 with a gate, (1, H_kv) c·log λ for a constant decay, else None."""
    if log_gate is not None:
        return _cum_gate(log_gate, log_decay)[:, -1]
    return None if log_decay is None else c * log_decay.double()[None]


def _scaled(x, weights, dtype):
    x = x.to(dtype)
    return x if weights is None else x * weights


def _per_query_head(x, groups, dim):
    """Per K/V head -> per query head (a repeat of a small tensor: weights or states)."""
    return x if x is None or groups == 1 else x.repeat_interleave(groups, dim)


def _accumulate(out, a, b):
    """out[s, :, h] += a[s, :, h] @ b[s, h] in place, out (S, c, H, D), a (S, c, H, K), b (S, H, K, D)."""
    for s in range(out.shape[0]):
        out[s].transpose(0, 1).baddbmm_(a[s].transpose(0, 1), b[s])
    return out


def _token_product(a, b):
    """Σ_t a_tᵀ b_t per (segment, head): (S, c, H, K), (S, c, H, D) -> (S, H, K, D)."""
    return torch.einsum("sthk,sthv->shkv", a, b)


def local_state(k, v, log_decay, log_gate=None, ids=None):
    """M (S, H_kv, d_k, d_v)."""
    sdt = state_dtype(k.dtype)
    return _token_product(_scaled(k, _weights(log_decay, log_gate, k.shape[1], sdt, True, ids), sdt), v.to(sdt))


def state_grad(q, do, log_decay, n_kv, log_gate=None, ids=None):
    """dM per K/V head (S, H_kv, d_k, d_v): summed over its query heads."""
    sdt, groups = state_dtype(q.dtype), q.shape[2] // n_kv
    w = _per_query_head(_weights(log_decay, log_gate, q.shape[1], sdt, False, ids), groups, 2)
    dstate = _token_product(_scaled(q, w, sdt), do.to(sdt))
    return dstate if groups == 1 else dstate.unflatten(1, (n_kv, groups)).sum(2)


def add_prefix_output(o, q, prefix, log_decay, log_gate=None, ids=None):
    """o + e^{A_t} q_t P (P of the query head's K/V head), returned in o's dtype (o may be updated in place)."""
    sdt, groups = prefix.dtype, q.shape[2] // prefix.shape[1]
    w = _per_query_head(_weights(log_decay, log_gate, q.shape[1], sdt, False, ids), groups, 2)
    out = _accumulate(o.to(sdt), _scaled(q, w, sdt), _per_query_head(prefix, groups, 1))
    return out.to(o.dtype)


def add_suffix_grads(dk, dv, k, v, suffix, log_decay, log_gate=None, ids=None):
    """dk + e^{A_e − A_t} v_t Gᵀ, dv + e^{A_e − A_t} k_t G (in place where the dtypes allow), and with a gate the
    exclusive prefix sum Σ_{u<s} b_u, b_u = k_u·dk_u^{via G} (S, c, H_kv) float64, else None."""
    sdt = suffix.dtype
    w = _weights(log_decay, log_gate, k.shape[1], sdt, True, ids)
    dk = _accumulate(dk.to(sdt), _scaled(v, w, sdt), suffix.transpose(-1, -2))
    if log_gate is None:
        return dk, _accumulate(dv.to(sdt), _scaled(k, w, sdt), suffix), None
    dv_suffix = _accumulate(torch.zeros_like(dv, dtype=sdt), _scaled(k, w, sdt), suffix)
    b = (dv_suffix * v.to(sdt)).sum(-1, dtype=torch.float64)            # k_u·dk_u^{via G} = v_u·dv_u^{via G}
    return dk, dv_suffix.add_(dv.to(sdt)), b.cumsum(1) - b


def add_state_grads(dq, dk, dv, q, k, v, do, prefix, suffix, log_decay, log_gate=None, ids=None):
    """Add the cross-segment terms of the gradients given the prefix P and the suffix gradient G -> (dq, dk, dv),
    and with a gate also d log_gate of those terms (S, c, H_kv) float64 (the kernel's intra part not included)."""
    sdt, groups = prefix.dtype, q.shape[2] // prefix.shape[1]
    w = _per_query_head(_weights(log_decay, log_gate, q.shape[1], sdt, False, ids), groups, 2)
    start = dq.to(sdt) if log_gate is None else torch.zeros_like(dq, dtype=sdt)   # in place without a gate
    dq_prefix = _accumulate(start, _scaled(do, w, sdt), _per_query_head(prefix, groups, 1).transpose(-1, -2))
    dk, dv, b = add_suffix_grads(dk, dv, k, v, suffix, log_decay, log_gate, ids)
    if log_gate is None:
        return dq_prefix.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    out = (dq_prefix.add(dq.to(sdt)).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))
    a = (q.to(sdt) * dq_prefix).sum(-1, dtype=torch.float64)           # q_u·dq_u^{via P}, per query head
    a = a if groups == 1 else a.unflatten(2, (-1, groups)).sum(3)
    return (*out, add_total_grad(a.flip(1).cumsum(1).flip(1) + b, prefix, suffix, log_decay, log_gate, ids))


def add_total_grad(dg, prefix, suffix, log_decay, log_gate, ids=None):
    """dg + e^{A_e} <P, G> (S, c, H_kv) float64: the segment's total gate scales P on its way to the state leaving
    (with documents only when no reset follows its token 0)."""
    total = segment_log_totals(log_decay, log_gate, log_gate.shape[1])
    term = (total.exp() * (prefix.double() * suffix.double()).sum((-1, -2)))[:, None]
    return dg + (term if ids is None else term * (ids[:, -1] == ids[:, 0]).double()[:, None, None])


def local_forward(q, k, v, log_decay, backend, log_gate=None, initial_state=None, ids=None):
    """The kernel's output for segments entering with initial_state (None = 0) -> (o, block states or None): the
    torch kernel's states entering each block of chunks, which spare `local_backward` its state pass. ids (S, c):
    the segments' document ids (the state emptied at each document start) or None."""
    groups = q.shape[2] // k.shape[2]
    k, v, log_decay = repeat_kv(q, k, v, log_decay)
    state, gate = _per_query_head(initial_state, groups, 1), _per_query_head(log_gate, groups, 2)
    if backend == "torch":
        o, _, block_states = chunked_forward(q, k, v, log_decay, gate, state, segment_ids=ids)
        return o, block_states
    return lightning_attn_fwd(q, k, v, log_decay, state, backend, gate, ids)[0], None


def intra_forward(q, k, v, log_decay, backend, log_gate=None, initial_state=None, ids=None):
    """O_intra = [(Q Kᵀ) ⊙ D] V per segment, zero initial state (or the kernel's full output from initial_state)."""
    return local_forward(q, k, v, log_decay, backend, log_gate, initial_state, ids)[0]


def local_backward(q, k, v, log_decay, do, backend, log_gate=None, initial_state=None, dfinal_state=None,
                   block_states=None, ids=None):
    """The kernel's gradients of one segment entering with initial_state (None = 0), given the gradient of the state
    leaving it (None = 0) -> (dq, dk, dv, d log_gate or None); dk, dv, d log_gate summed over each query group.
    block_states: from `local_forward` with the same initial_state (torch backend), or None (recomputed)."""
    groups = q.shape[2] // k.shape[2]
    k_rep, v_rep, ld = repeat_kv(q, k, v, log_decay)
    dfinal_state = _one_copy(dfinal_state, groups)
    state, gate = _per_query_head(initial_state, groups, 1), _per_query_head(log_gate, groups, 2)
    if backend == "torch":
        dq, dk, dv, _, dg = chunked_backward(q, k_rep, v_rep, ld, gate, state, do, dfinal_state, block_states,
                                             segment_ids=ids)
    else:
        dq, dk, dv, _, dg = lightning_attn_bwd(q, k_rep, v_rep, ld, state, do, dfinal_state, backend, gate, ids)
    return (dq, *_per_kv_head((dk, dv, dg), k.shape[2], groups))


def _one_copy(dstate, groups):
    """The gradient of a state per K/V head, in the first of its query heads' copies (the state is one)."""
    if dstate is None or groups == 1:
        return dstate
    return torch.stack([dstate, *[torch.zeros_like(dstate)] * (groups - 1)], 2).flatten(1, 2)


def _per_kv_head(grads, n_kv, groups):
    """Gradients per query head (S, c, H, ·) or (S, c, H) summed over each K/V head's group."""
    if groups == 1:
        return grads
    return tuple(None if g is None else g.unflatten(2, (n_kv, groups)).sum(3) for g in grads)


def deferred_forward(q, k, v, log_decay, log_gate, exchange, ids=None):
    """The torch kernel's forward for segments whose entering state P is exchanged during it (LASP-2 overlap):
    exchange(M per K/V head) starts the exchange and returns a finisher, finish(wait) -> P per K/V head, or None
    while it has not arrived and wait is False; polled before each block of chunks -> (o, P, block states for
    `local_backward` / `deferred_backward`). The kernel's own state pass gives M and its inter products take P
    (kernels/linear_attn.py deferred_states, deferred_outputs)."""
    groups = q.shape[2] // k.shape[2]
    k, v, ld = repeat_kv(q, k, v, log_decay)
    gate = _per_query_head(log_gate, groups, 2)
    final, entries = deferred_states(k, v, ld, gate, segment_ids=ids)
    arrived = _polled(exchange(final[:, ::groups]), lambda P: _per_query_head(P, groups, 1))
    o, block_states = deferred_outputs(q, k, v, ld, gate, entries, arrived, segment_ids=ids)
    return o, arrived.value, block_states


def deferred_backward(q, k, v, log_decay, do, log_gate, block_states, exchange, ids=None):
    """The torch kernel's backward entering from the forward's P and leaving with G, exchanged during it:
    exchange(dM per K/V head) returns a finisher as in `deferred_forward` giving G per K/V head -> (dq, dk, dv,
    d log_gate or None), dk, dv, d log_gate summed over each query group."""
    groups = q.shape[2] // k.shape[2]
    k_rep, v_rep, ld = repeat_kv(q, k, v, log_decay)
    gate = _per_query_head(log_gate, groups, 2)
    dstate, dP = deferred_state_grads(q, do, ld, gate, segment_ids=ids)
    finish = exchange(dstate if groups == 1 else dstate.unflatten(1, (k.shape[2], groups)).sum(2))
    dq, dk, dv, dg = deferred_grads(q, k_rep, v_rep, do, ld, gate, block_states, dP,
                                    _polled(finish, lambda G: _one_copy(G, groups)), segment_ids=ids)
    return (dq, *_per_kv_head((dk, dv, dg), k.shape[2], groups))


def _polled(finish, per_query_head):
    """finish(wait) -> the exchanged state or None, as a callable giving it per query head; .value: as exchanged."""
    def arrived(wait):
        if arrived.value is None:
            arrived.value = finish(wait)
        return None if arrived.value is None else per_query_head(arrived.value)
    arrived.value = None
    return arrived
