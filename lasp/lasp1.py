"""LASP-1: the ring baseline. States travel rank to rank, one hop at a time (contiguous layout only).

Shapes: local shards q (B, C, H, d_k), k (B, C, H_kv, d_k), v (B, C, H_kv, d_v), log_gate (B, C, H_kv); states
(B, H_kv, d_k, d_v) in float32 (float64 for float64 inputs). With a_t = log λ + g_t, A_t its inclusive cumsum
on the rank, A_e = A_{C−1}, M_r = Σ_t e^{A_e − A_t} k_tᵀ v_t and dM_r = Σ_t e^{A_t} q_tᵀ dO_t (lasp/common.py):

  forward   rank r receives P_r from r−1 (P_0 = 0), sends P_{r+1} = e^{A_e} P_r + M_r to r+1,
            o = the local kernel entering with state P_r        (o_t = O_intra,t + e^{A_t} q_t P_r)
  backward  rank r receives G_r from r+1 (G_{W−1} = 0), sends G_{r−1} = e^{A_e} G_r + dM_r to r−1, then the
            kernel's backward entering with P_r and leaving with gradient G_r gives dq, dk, dv and d log_gate
            whole (its state terms are those of lasp/common.py). Non-causal (λ = 1, no gate): a prefix ring and
            a suffix ring each way, total = P+M+G.

Documents (segment_ids (B, C)): the forward message also carries the sender's last id per batch row (B int64
bit-cast after the state, 8·B + one flag element per hop), so rank r knows keep_r = [its first id = r−1's last id]; it enters
the kernel with keep_r·P_r and sends e^{A_e}·[last_r = first_r]·keep_r·P_r + M_r on. The backward reuses keep_r
(no ids travel): it sends keep_r·(e^{A_e}·[last_r = first_r]·G_r + dM_r). A rank that receives a last id above
its first id (shards that disagree) raises after passing the error on in its own message, so it and every later
rank raise the same ValueError in this call; earlier ranks have finished theirs and fail at their next message.
Non-causal with documents: refused.

Each rank's own total A_e is all the fold needs, so nothing but the state travels. W−1 sequential hops per
ring, each one state: the same bytes per rank as LASP-2 but serialised latency, which is what LASP-2's single
all-gather removes.

The delta rule (beta=, lasp/delta.py): the ring carries P_{r+1} = Ã_r P_r + M_r and G_{r−1} = dP̃_r + Ã_rᵀ G_r,
one d_k×d_v state per hop (A_r, d_k×d_k, never travels); documents add one tiny all-gather of segment ids.
"""
import torch

from lasp.kernels import resolve_backend
from lasp.parallel import comm, mesh
from lasp.parallel.engines import EngineSpec, linear_kernel_work, linear_saved

from .common import (add_prefix_output, add_state_grads, check_engine_inputs, constant_decay, local_backward,
                     local_forward, local_state, segment_log_totals, state_grad)
from . import delta
from .documents import ids_from_payload, ids_to_payload, transition_mask

__all__ = ["lasp1", "lasp1_forward", "lasp1_backward"]


def _ring_scan(states, log_totals, group, reverse, log_space=True):
    """Exclusive scan by P2P hops: X_r = the fold X ← e^{A_e,s} X + M_s over earlier ranks s (later ones if reverse);
    log_totals (B or 1, H) float64 is this rank's own segment total A_e (None: no decay); log_space=False: the
    scale itself, (B, H or 1, 1, 1)."""
    W, r = comm.group_size(group), comm.group_rank(group)
    src, dst = (r + 1, r - 1) if reverse else (r - 1, r + 1)
    carried = torch.zeros_like(states)
    if 0 <= src < W:                                   # everyone but the first rank of the ring waits
        comm.recv(carried, src, group)
    if 0 <= dst < W:                                   # everyone but the last rank passes its fold on
        if log_space:
            decay = 1.0 if log_totals is None else log_totals.exp().to(states.dtype)[..., None, None]
        else:
            decay = log_totals
        comm.send(decay * carried + states, dst, group)
    return carried


def _document_ring(states, log_totals, ids, group):
    """The forward ring with documents -> (keep_r·P_r, keep_r (B, 1, 1, 1)): the message is the state, this rank's
    last id per row (bit-cast) and an error flag (set once some rank saw ids decrease across its left edge)."""
    W, r = comm.group_size(group), comm.group_rank(group)
    numel = states.numel()
    last = ids_to_payload(ids[:, -1], states.dtype)
    message = states.new_zeros(numel + last.numel() + 1)
    first, prev, failed = ids[:, 0].long(), ids[:, 0].long(), False
    if r > 0:
        comm.recv(message, r - 1, group)
        prev, failed = ids_from_payload(message[numel:-1]), bool(message[-1] != 0)
    failed = failed or bool((prev > first).any())
    keep = (prev == first).to(states.dtype)[:, None, None, None]
    carried = message[:numel].view_as(states) * keep
    if r < W - 1:
        decay = transition_mask(ids).to(states.dtype)[:, None, None, None]
        decay = decay if log_totals is None else decay * log_totals.exp().to(states.dtype)[..., None, None]
        flag = states.new_full((1,), float(failed))
        comm.send(torch.cat([(decay * carried + states).flatten(), last, flag]), r + 1, group)
    if failed:
        raise ValueError(f"LASP-1: segment_ids decrease across a rank edge at or before rank {r} (the ranks must "
                         f"hold one non-decreasing (B, T) id tensor in contiguous shards; local {tuple(ids.shape)})")
    return carried, keep


def lasp1_forward(q, k, v, log_decay, causal, group, backend, log_gate=None, segment_ids=None):
    """-> (o, prefix, block states or None, keep or None) where prefix is P_r (causal) or the total Σ_s M_s
    (non-causal), keep (B, 1, 1, 1) = [first id = the previous rank's last id] with documents."""
    states = local_state(k, v, log_decay, log_gate, segment_ids)
    if segment_ids is not None:             # causal only (lasp1 refuses documents without causal)
        prefix, keep = _document_ring(states, segment_log_totals(log_decay, log_gate, q.shape[1]), segment_ids,
                                      group)
        o, block_states = local_forward(q, k, v, log_decay, backend, log_gate, initial_state=prefix, ids=segment_ids)
        return o, prefix, block_states, keep
    prefix = _ring_scan(states, segment_log_totals(log_decay, log_gate, q.shape[1]), group, reverse=False)
    if causal:       # the prefix is known before the local compute: the kernel starts from it (no extra product)
        o, block_states = local_forward(q, k, v, log_decay, backend, log_gate, initial_state=prefix)
        return o, prefix, block_states, None
    total = prefix + states + _ring_scan(states, None, group, reverse=True)
    return add_prefix_output(q.new_zeros(*q.shape[:3], v.shape[-1]), q, total, None), total, None, None


def lasp1_backward(q, k, v, log_decay, prefix, do, causal, group, backend, log_gate=None, block_states=None,
                   segment_ids=None, keep=None):
    """-> (dq, dk, dv, d log_gate or None). keep: the forward's (documents)."""
    dstates = state_grad(q, do, log_decay, k.shape[2], log_gate, segment_ids)
    log_totals = segment_log_totals(log_decay, log_gate, q.shape[1])
    if segment_ids is not None:     # what leaves toward r−1 is keep·(e^{A_e}·[last = first]·G + dM)
        scale = transition_mask(segment_ids).to(dstates.dtype)[:, None, None, None]
        scale = scale if log_totals is None else scale * log_totals.exp().to(dstates.dtype)[..., None, None]
        suffix = _ring_scan(dstates * keep, scale * keep, group, reverse=True, log_space=False)
    else:
        suffix = _ring_scan(dstates, log_totals, group, reverse=True)
    if causal:       # entering with P, leaving with gradient G: the kernel's gradients are the whole answer
        return local_backward(q, k, v, log_decay, do, backend, log_gate, prefix, suffix, block_states, segment_ids)
    suffix = suffix + dstates + _ring_scan(dstates, None, group, reverse=False)
    zeros = (torch.zeros_like(x) for x in (q, k, v))
    return (*add_state_grads(*zeros, q, k, v, do, prefix, suffix, None), None)


class _LASP1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, log_gate, causal, group, backend, segment_ids):
        o, prefix, block_states, keep = lasp1_forward(q, k, v, log_decay, causal, group, backend, log_gate,
                                                      segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, log_gate, prefix, block_states, segment_ids, keep)
        ctx.config = (causal, group, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, log_gate, prefix, block_states, segment_ids, keep = ctx.saved_tensors
        dq, dk, dv, dg = lasp1_backward(q, k, v, log_decay, prefix, do.contiguous(), *ctx.config, log_gate,
                                        block_states, segment_ids, keep)
        return dq, dk, dv, None, dg, None, None, None, None


def lasp1(q, k, v, *, log_decay=None, log_gate=None, causal=True, group=None, backend=None, beta=None,
          segment_ids=None):
    """LASP-1 ring linear attention on contiguous local shards (B, C, H, D) -> o (B, C, H, d_v).

    Same arguments (grouped K/V heads, log_gate and segment_ids included) and errors as `lasp.lasp2` (no layout:
    contiguous only). Ranks whose shards' ids decrease across a rank edge: that rank and the later ones raise
    (module docstring). beta: the delta rule, as in `lasp.lasp2` (the chain carries one d_k×d_v state per hop).
    """
    if beta is not None:
        delta.check_delta_engine_inputs(q, k, v, beta, log_gate, log_decay, causal, "contiguous", segment_ids)
        group = mesh.sp_group() if group is None else group
        return _LASP1Delta.apply(q, k, v, beta, log_gate, segment_ids, group)
    check_engine_inputs(q, k, v, log_decay, causal, "contiguous", log_gate, segment_ids)
    group = mesh.sp_group() if group is None else group
    backend = resolve_backend(backend, q.device)
    log_decay = constant_decay(log_decay, q)
    return _LASP1.apply(q, k, v, log_decay, log_gate, causal, group, backend, segment_ids)


# ------------------------------------------------------------------------------------ the delta-rule kind
def _delta_ring(step, like, group, reverse):
    """X from the previous rank of the ring (zeros for the first); step(X) sent on to the next -> X."""
    W, r = comm.group_size(group), comm.group_rank(group)
    src, dst = (r + 1, r - 1) if reverse else (r - 1, r + 1)
    carried = torch.zeros_like(like)
    if 0 <= src < W:
        comm.recv(carried, src, group)
    if 0 <= dst < W:
        comm.send(step(carried), dst, group)
    return carried


class _LASP1Delta(torch.autograd.Function):
    """Forward: P_{r+1} = Ã_r P_r + M_r down the ring, the kernel from (1 − f)·P_r; backward: G_{r−1} = dP̃_r +
    Ã_rᵀ G_r up the ring, the kernel's backward from ((1 − f)·P_r, G_r) (lasp/delta.py)."""
    @staticmethod
    def forward(ctx, q, k, v, beta, log_gate, segment_ids, group):
        inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, 1)
        flags = None if segment_ids is None else delta.gather_first_flags(segment_ids, "contiguous", group)
        pieces, A, M = delta.local_transition(inp)
        A = delta.keep(flags, A)
        prefix = delta.keep(flags, _delta_ring(lambda P: A @ P + M, M, group, reverse=False))
        o, states = delta.local_forward(inp, pieces, prefix, 1)
        ctx.save_for_backward(q, k, v, beta, log_gate, segment_ids, A, flags, *states, *delta.saved_pieces(pieces))
        ctx.config = (group, len(states))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, log_gate, segment_ids, A, flags, *rest = ctx.saved_tensors
        group, n_states = ctx.config
        inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, 1)
        dP = delta.keep(flags, delta.local_entry_grad(inp, rest[n_states:], do, 1))
        suffix = _delta_ring(lambda G: dP + A.transpose(-1, -2) @ G, dP, group, reverse=True)
        return (*delta.local_backward(inp, rest[:n_states], do.contiguous(), suffix, 1)[0], None, None)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes: as LASP-2's (the buffer counted as its gathered states)."""
    return linear_saved(s), linear_kernel_work(s), 2 * s.sp * s.B * s.H * s.d_k * s.d_v * 4


ENGINE = EngineSpec("lasp1", "linear", lasp1, ("contiguous",),
                    "states: one (B, H_kv, d_k, d_v) state per ring hop, W−1 sequential hops each way", _memory)
