"""LASP-2: sequence-parallel linear attention with ONE all-gather of states forward and ONE backward.

Shapes: local shards q (B, T_local, H, d_k), k (B, T_local, H_kv, d_k), v (B, T_local, H_kv, d_v) with H a
multiple of H_kv (query head i reads K/V head i // (H/H_kv)); log_gate (B, T_local, H_kv); states
(B, H_kv, d_k, d_v) in float32 (float64 for float64 inputs): the messages count the distinct K/V heads only. A
rank's tokens are n segments of c tokens (n = 1 contiguous, 2 zigzag) with global sub-chunk indices g
(parallel/layout.py); N = W·n sub-chunks in all. Causal, per token a_t = log λ + g_t (log_decay and log_gate
add), A_t its inclusive cumsum inside the segment, A_e = A_{c−1} the segment's total (constant decay: c·log λ):

  forward   M_g = Σ_t e^{A_e − A_t} k_tᵀ v_t               each segment's state, decayed to its end
            [(M_0, A_e,0) … ] = AllGather(M_g, A_e,g)       started async; the local kernel runs meanwhile
            P_g = Σ_{j<g} e^{Γ_{g−1} − Γ_j} M_j            = the fold P ← e^{A_e,j} P + M_j over earlier sub-chunks
            o_t = O_intra,t + e^{A_t} q_t P_g               (Γ: inclusive cumsum of the totals over sub-chunks)
  backward  dM_g = Σ_t e^{A_t} q_tᵀ dO_t                   ONE all-gather (with the totals again), overlapped
            G_g = Σ_{j>g} e^{Γ_{j−1} − Γ_g} dM_j            with the local kernel's backward
            dq_t += e^{A_t} dO_t P_gᵀ, dk_t += e^{A_e − A_t} v_t G_gᵀ, dv_t += e^{A_e − A_t} k_t G_g
            dg_s += Σ_{u≥s} q_u·dq_u^{via P} + Σ_{u<s} k_u·dk_u^{via G} + e^{A_e} <P_g, G_g>   (lasp/common.py)
  overlap=True, torch kernel (the default on CPU): the kernel's own passes around each gather (kernels/
            linear_attn.py, "the entering state arrives during the call"): M_g is the state its state pass
            leaves from zero; then block by block, polling the gather: a block met while it flies does its
            intra-chunk products and keeps them, later blocks run whole once P_g is there (chunk j's entering
            state P⁰_j + e^{A before j} P_g); backward: dM_g from its dP pass, then the blocks from the last, a
            block met while the gather flies doing the products that need no G, later ones whole once G_g joins
            the exit gradients R_j. The products of the kernel entering from P_g and leaving with G_g, no others,
            and bitwise the same results whenever the gather lands.
            Other backends (Triton): the kernel from a zero state meanwhile, the cross terms above added after.
  overlap=False: the kernel runs from P_g (forward) and from P_g to G_g (backward) after the gathers instead,
            which is all of the above with no product of its own beyond M_g and dM_g, and nothing hidden.
  non-causal (λ = 1, no gate): o = Q Σ_j M_j;  dq = dO (Σ_j M_j)ᵀ,  dk = V (Σ_j dM_j)ᵀ,  dv = K Σ_j dM_j.

  documents (segment_ids (B, T_local)): each segment's first and last id travel in the forward gather (bit-cast
            int64, after the states), so every rank knows the ids around every sub-chunk; the fold weights are
            masked, P_g = Σ_{j<g} [first_g = last_j]·e^{Γ_{g−1} − Γ_j} M_j, G_g = Σ_{j>g} [first_j = last_g]·… dM_j
            (ids are non-decreasing, so one equality says "no reset between"); the kernel resets inside the
            segment itself (kernels/documents.py). The backward reuses the forward's ids: same collectives, and
            2·n·B·8 more bytes per rank in the forward gather only. Non-causal with documents: refused.

Only differences of inclusive cumsums that are ≤ 0 are exponentiated (float64 sums), so nothing overflows.
The gathered payload carries each rank's (T_local, n) as a two-number header, so ranks holding different
lengths raise the same ValueError everywhere instead of computing a wrong answer. Bytes received per rank and
pass: (W−1)·n·B·H_kv·d_k·d_v·4, with gates (W−1)·n·B·H_kv·(d_k·d_v + 1)·4 (+ the header), independent of T.

The delta rule (beta=, lasp/delta.py): the gather carries each segment's (A_g, M_g) (d_k² + d_k·d_v per value
head), the fold is P ← Ã_j P + M_j; backward dP_g = Σ_t A_{≤t}ᵀ q_tᵀ dO_t gathered once, G ← dP̃_j + Ã_jᵀ G
from the last segment down, then the kernel's backward from (P_g, G_g). Ã = (1 − f)·A, f: the segment's first
token starts a document (its first id ≠ the last id before it; the ids ride in the same gather).
"""
import torch

from lasp.kernels import resolve_backend, state_dtype
from lasp.parallel import comm, layout as layouts, mesh
from lasp.parallel.checkpointing import replayable
from lasp.parallel.engines import EngineSpec, linear_kernel_work, linear_saved

from .common import (add_prefix_output, add_state_grads, check_engine_inputs, constant_decay, deferred_backward,
                     deferred_forward, from_segments, local_backward, local_forward, local_state, segment_log_totals,
                     state_grad, to_segments)
from . import delta
from .documents import check_global_ids, ids_from_payload, ids_to_payload, segment_ends

__all__ = ["lasp2", "lasp2_forward", "lasp2_backward"]


def _gather_states(states, n, layout, group, header=None, totals=None, ends=None):
    """Start the ONE all-gather of (B·n, H, d_k, d_v) local states, their (B·n, H) log totals (gated only), the
    segments' (B·n, 2) first and last document ids (documents only) and the header. Returns a finisher giving
    (states (N, B, H, d_k, d_v), totals (N, B, H) or None, ids (N, B, 2) or None) in global order, or None with
    wait=False while the gather is in flight."""
    W = comm.group_size(group)
    per_rank = states.unflatten(0, (-1, n)).transpose(0, 1).contiguous()      # (n, B, H, d_k, d_v)
    parts = [per_rank.flatten()]
    if totals is not None:
        parts.append(totals.unflatten(0, (-1, n)).transpose(0, 1).to(states.dtype).flatten())   # (n, B, H)
    if ends is not None:
        parts.append(ids_to_payload(ends.unflatten(0, (-1, n)).transpose(0, 1), states.dtype))  # (n, B, 2)
    if header is not None:
        parts.append(header)
    out, work = comm.all_gather(torch.cat(parts) if len(parts) > 1 else parts[0], group, async_op=True)
    sizes = [x.numel() for x in parts]

    def finish(wait=True):          # wait=False: None while the gather is still in flight
        if not (wait or work.is_completed()):
            return None
        work.wait()
        pieces = out.view(W, -1).split(sizes, dim=1)
        if header is not None:
            heads = pieces[-1]
            if not bool((heads == heads[0]).all()):
                lens = heads[:, 0].long().tolist()
                raise ValueError(f"LASP-2 ranks hold different local lengths {lens} or layouts: every rank of the "
                                 f"sequence-parallel group must hold T/W tokens in layout {layout!r}")
        order = torch.argsort(torch.tensor([g for r in range(W) for g in layouts.segment_indices(layout, r, W)]))
        by_rank = pieces[0].reshape(W * n, *per_rank.shape[1:])[order]       # (N, B, H, d_k, d_v)
        gathered_totals = None if totals is None else pieces[1].reshape(W * n, *per_rank.shape[1:3])[order]
        gathered_ends = None
        if ends is not None:
            gathered_ends = ids_from_payload(pieces[1 + (totals is not None)]).view(W * n, -1, 2)[order]
            check_global_ids(gathered_ends, "LASP-2", layout)
        return by_rank, gathered_totals, gathered_ends
    return finish


def _document_mask(ends, local_idx, suffix):
    """(n, N, B, 1): [first_g = last_j] for the prefix of local sub-chunk g (suffix: [first_j = last_g]),
    ends (N, B, 2) the first and last ids of every sub-chunk: no document starts between them."""
    g = torch.tensor(local_idx, device=ends.device)
    first, last = ends[..., 0], ends[..., 1]                                   # (N, B)
    mask = (first[None] == last[g][:, None]) if suffix else (first[g][:, None] == last[None])
    return mask[..., None]


def _fold_weights(log_totals, local_idx, N, dtype, device, suffix):
    """A (n, N, B or 1, H): e^{Γ_{g_s−1} − Γ_j} for j < g_s (prefix) or e^{Γ_{j−1} − Γ_{g_s}} for j > g_s (suffix),
    Γ the inclusive cumsum over sub-chunks of their log totals (N, B or 1, H) in float64; None: the 0/1 mask."""
    g = torch.tensor(local_idx, device=device)
    j = torch.arange(N, device=device)
    keep = (j[None, :] > g[:, None]) if suffix else (j[None, :] < g[:, None])   # (n, N)
    if log_totals is None:
        return keep.to(dtype)[:, :, None, None]
    cum = log_totals.double().cumsum(0)                                      # Γ_j
    before = torch.cat([torch.zeros_like(cum[:1]), cum[:-1]])                # Γ_{j−1}, Γ_{−1} = 0
    gap = (before[None, :] - cum[g][:, None]) if suffix else (before[g][:, None] - cum[None, :])   # ≤ 0 where kept
    return gap.masked_fill(~keep[:, :, None, None], float("-inf")).exp().to(dtype)


def _fold(gathered, weights, n):
    """Σ_j A[s, j] X_j for each local segment s: (N, B, H, d_k, d_v) -> (B·n, H, d_k, d_v)."""
    weights = weights.expand(-1, -1, gathered.shape[1], -1)
    return torch.einsum("sjbh,jbhkv->bshkv", weights, gathered).flatten(0, 1)


def _fold_totals(log_decay, gathered_totals, c, N):
    """The sub-chunks' log totals for the fold: gathered (gated), N copies of c·log λ (constant decay), or None."""
    if gathered_totals is not None:
        return gathered_totals
    totals = segment_log_totals(log_decay, None, c)
    return None if totals is None else totals[None].expand(N, -1, -1)


def _local_indices(layout, group):
    return layouts.segment_indices(layout, comm.group_rank(group), comm.group_size(group))


def _segments(x, n):
    return None if x is None else to_segments(x, n)


def _prefix_fold(gathered, gathered_totals, ends, log_decay, c, layout, group, suffix):
    """The prefix P (suffix G) of every local segment from the gathered states, in global sub-chunk order; ends
    (N, B, 2): the sub-chunks' first and last document ids, or None."""
    N = gathered.shape[0]
    weights = _fold_weights(_fold_totals(log_decay, gathered_totals, c, N), _local_indices(layout, group), N,
                            gathered.dtype, gathered.device, suffix)
    if ends is not None:
        weights = weights * _document_mask(ends, _local_indices(layout, group), suffix).to(weights.dtype)
    return _fold(gathered, weights, layouts.segments_per_rank(layout))


def _folded(finish, log_decay, c, layout, group, suffix, ends=None):
    """The gather's finisher made to give (every local segment's P (suffix: G), the sub-chunks' ids or None);
    wait=False: None while in flight. ends: the ids when the gather does not carry them (the backward)."""
    def fold(wait=True):
        gathered = finish(wait)
        if gathered is None:
            return None
        states, totals, got = gathered
        got = ends if got is None else got
        return _prefix_fold(states, totals, got, log_decay, c, layout, group, suffix), got
    return fold


def _first(finish, box):
    """A finisher giving (X, ids) made to give X, keeping ids in box[0]."""
    def first(wait=True):
        got = finish(wait)
        if got is None:
            return None
        box[0] = got[1]
        return got[0]
    return first


def lasp2_forward(q, k, v, log_decay, causal, layout, group, backend, log_gate=None, overlap=True, segment_ids=None):
    """-> (o (B, T_local, H, d_v), prefix states (B·n, H_kv, d_k, d_v), the torch kernel's block states (overlap=False)
    or None, the sub-chunks' gathered (N, B, 2) first and last document ids or None) for the backward."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs, gs, ids = (_segments(x, n) for x in (q, k, v, log_gate, segment_ids))
    c, sdt = qs.shape[1], state_dtype(q.dtype)
    header = torch.tensor([q.shape[1], n], dtype=sdt, device=q.device)
    totals = None if gs is None else segment_log_totals(log_decay, gs, c)
    if not causal:
        finish = _gather_states(local_state(ks, vs, None), n, layout, group, header)
        total = finish()[0].sum(0).repeat_interleave(n, dim=0)               # Σ_j M_j for every segment row
        o = add_prefix_output(qs.new_zeros(*qs.shape[:3], vs.shape[-1]), qs, total, None)
        return from_segments(o, n), total, None, None

    @replayable                     # a checkpointed layer's recomputation reuses P: no second gather
    def gather(states):             # starts the gather; its finisher folds every local segment's prefix P
        return _folded(_gather_states(states, n, layout, group, header, totals, segment_ends(ids)), log_decay, c,
                       layout, group, False)
    box = [None]                    # the gathered ids, once the gather lands

    def exchange(states):
        return _first(gather(states), box)
    if overlap and backend == "torch":      # M from the kernel's state pass, P into its inter products
        o, prefix, block_states = deferred_forward(qs, ks, vs, log_decay, gs, exchange, ids)
    elif overlap:                           # the kernel from a zero state while the gather flies, P's term after
        finish = exchange(local_state(ks, vs, log_decay, gs, ids))
        o, block_states = local_forward(qs, ks, vs, log_decay, backend, gs, ids=ids)
        prefix = finish()
        o = add_prefix_output(o, qs, prefix, log_decay, gs, ids)
    else:
        prefix = exchange(local_state(ks, vs, log_decay, gs, ids))()
        o, block_states = local_forward(qs, ks, vs, log_decay, backend, gs, initial_state=prefix, ids=ids)
    return from_segments(o, n), prefix, block_states, box[0]


def lasp2_backward(q, k, v, log_decay, prefix, do, causal, layout, group, backend, log_gate=None, overlap=True,
                   block_states=None, segment_ids=None, ends=None):
    """-> (dq, dk, dv, d log_gate or None) local shards. ends: the forward's gathered (N, B, 2) ids (documents)."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs, dos, gs, ids = (_segments(x, n) for x in (q, k, v, do, log_gate, segment_ids))
    c = qs.shape[1]
    totals = None if gs is None else segment_log_totals(log_decay, gs, c)
    if not causal:
        suffix = _gather_states(state_grad(qs, dos, None, k.shape[2]), n, layout, group)()[0].sum(0)
        suffix = suffix.repeat_interleave(n, dim=0)
        zeros = (torch.zeros_like(x) for x in (qs, ks, vs))
        return (*(from_segments(g, n) for g in add_state_grads(*zeros, qs, ks, vs, dos, prefix, suffix, None)), None)

    def exchange(dstates):          # starts the gather; its finisher folds every local segment's suffix G
        return _first(_folded(_gather_states(dstates, n, layout, group, totals=totals), log_decay, c, layout, group,
                              True, ends), [None])
    if overlap and backend == "torch":      # dM from the kernel's dP, G into its exit products
        grads = deferred_backward(qs, ks, vs, log_decay, dos, gs, block_states, exchange, ids)
        return tuple(None if g is None else from_segments(g, n) for g in grads)
    finish = exchange(state_grad(qs, dos, log_decay, k.shape[2], gs, ids))
    if not overlap:         # the kernel enters from P and leaves with gradient G: its gradients are the answer
        grads = local_backward(qs, ks, vs, log_decay, dos, backend, gs, prefix, finish(), block_states, ids)
        return tuple(None if g is None else from_segments(g, n) for g in grads)
    # other backends: the kernel from a zero state while the gather flies, then the terms of P and G
    dq, dk, dv, dg = local_backward(qs, ks, vs, log_decay, dos, backend, gs, ids=ids)
    suffix = finish()
    grads = add_state_grads(dq, dk, dv, qs, ks, vs, dos, prefix, suffix, log_decay, gs, ids)
    if gs is not None:
        grads = (*grads[:3], (dg.double() + grads[3]).to(log_gate.dtype))
    return tuple(from_segments(g, n) for g in grads) + ((None,) if gs is None else ())


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, log_gate, causal, layout, group, backend, overlap, segment_ids):
        o, prefix, block_states, ends = lasp2_forward(q, k, v, log_decay, causal, layout, group, backend, log_gate,
                                                      overlap, segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, log_gate, prefix, block_states, segment_ids, ends)
        ctx.config = (causal, layout, group, backend)
        ctx.overlap = overlap
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, log_gate, prefix, block_states, segment_ids, ends = ctx.saved_tensors
        dq, dk, dv, dg = lasp2_backward(q, k, v, log_decay, prefix, do.contiguous(), *ctx.config, log_gate,
                                        ctx.overlap, block_states, segment_ids, ends)
        return dq, dk, dv, None, dg, None, None, None, None, None, None


def lasp2(q, k, v, *, log_decay=None, log_gate=None, causal=True, layout="contiguous", group=None, backend=None,
          overlap=True, beta=None, segment_ids=None):
    """LASP-2 linear attention on local shards (B, T_local, H, D) -> o (B, T_local, H, d_v).

    k, v may have fewer heads H_kv (H % H_kv == 0, grouped as i // (H/H_kv)); log_decay: (H_kv,) of log λ ≤ 0, one
    per state (constant, no gradient), None = no decay; log_gate: (B, T_local, H_kv) of g ≤ 0 (differentiable,
    adds to log_decay), None = no gate; causal=False needs neither.
    group=None: the mesh's sequence-parallel group, else the default group, else a single process.
    overlap=True runs the local kernel's products that need neither P nor G while each gather is in flight and
    the rest after (torch kernel: the same products as overlap=False; other backends: 4 more d_k×d_v products
    per token over fwd+bwd, the cross terms added after a zero-state kernel); overlap=False runs the kernel from
    the gathered prefix (the gather exposed).
    segment_ids (B, T_local) integer document ids of the local shard in `layout` order (as the softmax engines
    take them), non-decreasing in global order: the state is emptied at each document's first token.
    Raises ValueError (before any collective) on mismatched shapes/dtypes, bad log_decay or log_gate (shape,
    dtype, device, positive or non-finite entries), a local length the layout cannot split, segment_ids of the
    wrong shape or dtype, decreasing inside a segment, or with causal=False; and on every rank if ranks hold
    different lengths or ids that decrease from one rank's shard to the next.
    beta (B, T_local, H) in [0, 2]: the (gated) delta rule instead (lasp/delta.py; q, k (B, T_local, H_k, d_k),
    v (B, T_local, H, d_v), log_gate per value head, segment_ids (B, T_local) documents; the torch chunk kernel).
    """
    if beta is not None:
        delta.check_delta_engine_inputs(q, k, v, beta, log_gate, log_decay, causal, layout, segment_ids)
        group = mesh.sp_group() if group is None else group
        return _LASP2Delta.apply(q, k, v, beta, log_gate, segment_ids, layout, group)
    check_engine_inputs(q, k, v, log_decay, causal, layout, log_gate, segment_ids)
    group = mesh.sp_group() if group is None else group
    backend = resolve_backend(backend, q.device)
    log_decay = constant_decay(log_decay, q)
    return _LASP2.apply(q, k, v, log_decay, log_gate, causal, layout, group, backend, bool(overlap), segment_ids)


# ------------------------------------------------------------------------------------ the delta-rule kind
def _delta_gather(A, M, segment_ids, local_len, n, layout, group):
    """The ONE forward all-gather of every segment's (A, M) (+ its first/last document ids, int64 bit-cast into the
    message's dtype as the other kinds send them (lasp/documents.py), + the (T_local, n) header) -> (Ã = (1 − f)·A, M) (N, B, H, ·) in global order and f (N, B) or None."""
    W, sdt = comm.group_size(group), A.dtype
    parts = [x.unflatten(0, (-1, n)).transpose(0, 1) for x in (A, M)]                  # (n, B, H, d_k, ·)
    if segment_ids is not None:
        bounds = delta.segment_bounds(segment_ids, n)                                  # (n, B, 2, 1) int64
        parts.append(ids_to_payload(bounds, sdt).view(*bounds.shape[:3], -1))          # (n, B, 2, 8 / itemsize)
    parts.append(torch.tensor([local_len, n], dtype=sdt, device=A.device))
    out = comm.all_gather(torch.cat([x.flatten() for x in parts]), group).view(W, -1)
    pieces = out.split([x.numel() for x in parts], dim=1)
    if not bool((pieces[-1] == pieces[-1][0]).all()):
        raise ValueError(f"LASP-2 ranks hold different local lengths {pieces[-1][:, 0].long().tolist()} or "
                         f"layouts: every rank must hold T/W tokens in layout {layout!r}")
    A_all, M_all, *ids = (delta.global_order(x.reshape(W * n, *p.shape[1:]), layout, W) for x, p in
                          zip(pieces[:-1], parts[:-1]))
    flags = delta.first_flags(ids_from_payload(ids[0])) if ids else None
    return (A_all if flags is None else delta.keep(flags.flatten(), A_all.flatten(0, 1)).view_as(A_all)), M_all, flags


def lasp2_delta_forward(q, k, v, beta, log_gate, segment_ids, layout, group):
    """-> (o, block states, saved pieces, Ã (N, B, H, d_k, d_k), local flags (B·n,) or None) for the backward."""
    n = layouts.segments_per_rank(layout)
    inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, n)
    pieces, A, M = delta.local_transition(inp)
    A_all, M_all, flags = _delta_gather(A, M, segment_ids, q.shape[1], n, layout, group)
    idx = _local_indices(layout, group)
    local_flags = None if flags is None else flags[idx].transpose(0, 1).flatten()
    prefix = delta.keep(local_flags, delta.fold_segments(A_all, M_all, idx, suffix=False))
    o, states = delta.local_forward(inp, pieces, prefix, n)
    return o, states, delta.saved_pieces(pieces), A_all, local_flags


def lasp2_delta_backward(q, k, v, beta, log_gate, segment_ids, do, layout, group, states, saved, A_all, flags):
    """-> (dq, dk, dv, dbeta, dlog_gate or None): ONE all-gather of the dP̃'s, the suffix G, the local backward."""
    W, n = comm.group_size(group), layouts.segments_per_rank(layout)
    inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, n)
    dP = delta.keep(flags, delta.local_entry_grad(inp, saved, do, n))
    dP_all = delta.global_order(comm.all_gather(dP.unflatten(0, (-1, n)).transpose(0, 1).contiguous(), group),
                                layout, W)
    suffix = delta.fold_segments(A_all, dP_all, _local_indices(layout, group), suffix=True)
    return delta.local_backward(inp, states, do, suffix, n)[0]


class _LASP2Delta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_gate, segment_ids, layout, group):
        o, states, saved, A_all, flags = lasp2_delta_forward(q, k, v, beta, log_gate, segment_ids, layout, group)
        ctx.save_for_backward(q, k, v, beta, log_gate, segment_ids, A_all, flags, *states, *saved)
        ctx.config = (layout, group, len(states))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, log_gate, segment_ids, A_all, flags, *rest = ctx.saved_tensors
        layout, group, n_states = ctx.config
        grads = lasp2_delta_backward(q, k, v, beta, log_gate, segment_ids, do.contiguous(), layout, group,
                                     rest[:n_states], rest[n_states:], A_all, flags)
        return (*grads, None, None, None)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes: q, k, v and two states; the local kernel's backward
    (16.6 floats per token·H·d torch, 4 Triton: parallel/engines.py); the gathered W·n states."""
    return linear_saved(s), linear_kernel_work(s), 2 * s.sp * s.B * s.H * s.d_k * s.d_v * 4


ENGINE = EngineSpec("lasp2", "linear", lasp2, ("contiguous", "zigzag"),
                    "states: one all-gather of every segment's (B, H_kv, d_k, d_v) state forward, one backward",
                    _memory, overlaps_exchange=True)
