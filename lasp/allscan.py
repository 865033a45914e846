"""All-Scan (ZeCO-style): each rank receives ONE prefix state per segment, in K blocks pipelined down a chain.

Shapes: local shards q (B, T_local, H, d_k), k (B, T_local, H_kv, d_k), v (B, T_local, H_kv, d_v), H a multiple
of H_kv, log_gate (B, T_local, H_kv); states (B, H_kv, d_k, d_v) in float32 (float64 for float64 inputs). A
rank's tokens are n segments of c tokens (n = 1 contiguous, 2 zigzag) with global sub-chunk indices g = 0..N−1,
N = W·n (parallel/layout.py). Causal, per token a_t = log λ + g_t (log_decay and log_gate add), A_t its
inclusive cumsum inside the segment, A_e = A_{c−1} the segment's total (lasp/common.py for M, dM and the grads):

  forward   M_g = Σ_t e^{A_e − A_t} k_tᵀ v_t             the segment's own state, computed first
            P_{g+1} = e^{A_e,g}·P_g + M_g   (P_0 = 0)     the chain: P_g comes from the owner of sub-chunk g−1
                                                          in K column blocks of d_v; each block is folded with
                                                          the LOCAL total and sent on to the owner of g+1 as
                                                          soon as it is folded
            o_t = O_intra,t + e^{A_t} q_t P_g             O_intra computed while the first blocks travel
  backward  dM_g = Σ_t e^{A_t} q_tᵀ dO_t;  G_{g−1} = e^{A_e,g}·G_g + dM_g  (G_{N−1} = 0): the chain reversed,
            the kernel's backward entering from P_g (dq and its d log_gate whole) runs meanwhile, then
            dk_t += e^{A_e − A_t} v_t G_gᵀ,  dv_t += e^{A_e − A_t} k_t G_g,
            dg_s += Σ_{u<s} k_u·dk_u^{via G} + e^{A_e} <P_g, G_g>          (the totals' path)
  non-causal (λ = 1): total = prefix + own + suffix, own = Σ of the rank's segments' M, with a prefix chain up
            the ranks and a suffix chain down them (one state in from each side); ranks in the lower half
            serve the prefix chain first, the upper half the suffix chain, so neither waits for the other.

Message flow. A chain start (no predecessor) sends its blocks before the local compute. Every other rank posts
all its receives first, computes O_intra (or the intra backward), then for block j = 0..K−1: wait, fold, send.
Time on W ranks for an m-byte state (α latency, β bandwidth): the last rank has its prefix after about
(h + K − 1)(α + m/(Kβ)) for h hops, against (W−1)(α + m/β) for LASP-2's all-gather, and it received m bytes
(LASP-2: (W−1)·m). `choose_blocks` minimises that: K = sqrt((h−1)·m/(αβ)), clamped to [1, min(d_v, 8)].

Zigzag: the chain runs through the first segments (sub-chunks 0..W−1, ranks 0→W−1), turns on rank W−1 with no
message (it holds sub-chunks W−1 and W), and comes back through the second segments (ranks W−1→0): h = 2(W−1)
hops. Each segment still has exactly one predecessor and one successor, so one state in and one out per
segment; rank 0's first and rank W−1's second segment take theirs without a message.

Bytes received per rank and pass: one state (B·H_kv·d_k·d_v·elem) per segment that has a predecessor on
another rank, independent of W and T; with gates too, since each rank folds with its own segment's total (no
gate totals travel, unlike LASP-2's gather). Length check: every rank's (T_local, n) travels in one tiny all-gather
(8 bytes per rank, forward only) started before the chain and checked after it: message sizes do not depend on
T_local, so ranks holding different lengths all finish the chain and then all raise the same ValueError
instead of hanging. B, H_kv, d_k, d_v and K must agree across ranks (they come from the model and the code).

Documents (segment_ids (B, T_local), docs/lasp.md): that same tiny gather also carries every segment's first and
last id (32·B bytes more per rank); read after the local compute, it gives prev_g, the id before each segment:
enter with keep_g·P_g (keep_g = [first_g = prev_g]), fold with e^{A_e}·[last_g = prev_g]; the backward reuses
prev_g and sends keep_g·dM_g. Ids that decrease across ranks raise on every rank after the chain.
The delta rule (beta=, lasp/delta.py): each link folds a column block as Ã·X + M (Ã: the segment's d_k×d_k
transition, its transpose backward with dP̃ for M); still one d_k×d_v state in per segment; documents ride in the
length header's gather, as for the other kinds.
"""
import math
from dataclasses import dataclass

import torch

from lasp.kernels import resolve_backend, state_dtype
from lasp.parallel import comm, layout as layouts, mesh
from lasp.parallel.engines import EngineSpec, linear_kernel_work, linear_saved

from .common import (add_prefix_output, add_state_grads, add_suffix_grads, add_total_grad, check_engine_inputs,
                     constant_decay, from_segments, intra_forward, local_backward, local_state, segment_log_totals,
                     state_grad, to_segments)
from . import delta
from .documents import (check_global_ids, document_scales, header_with_ids, ids_from_header, previous_ids,
                        segment_ends)

__all__ = ["allscan", "allscan_forward", "allscan_backward", "choose_blocks", "DEFAULT_NETWORK"]

LOCAL = "local"        # a link fed by the previous link on the same rank (the zigzag turn), no message
MAX_BLOCKS = 8
# assumed by `choose_blocks` when no network model is set: one 25 Gbit/s link, 10 µs per message
DEFAULT_NETWORK = comm.NetworkModel(latency_s=10e-6, bytes_per_s=25e9 / 8)


def choose_blocks(state_bytes, hops, d_v, model=None):
    """K minimising (h + K − 1)(α + m/(Kβ)): round(sqrt((h−1)·m/(αβ))) in [1, min(d_v, 8)]; 1 for h ≤ 1.

    model: a comm.NetworkModel; default the one in force (LASP_SIM_NETWORK), else DEFAULT_NETWORK."""
    model = model or comm.network_model() or DEFAULT_NETWORK
    if hops <= 1:
        return 1
    if model.latency_s == 0:
        best = MAX_BLOCKS
    else:
        best = round(math.sqrt((hops - 1) * state_bytes / (model.latency_s * model.bytes_per_s)))
    return max(1, min(best, d_v, MAX_BLOCKS))


@dataclass
class _Link:
    """One step of a chain on this rank: incoming X, outgoing scale·X + state. src/dst: None (chain end),
    LOCAL (the previous/next link on this rank) or the peer's index in the group."""
    name: object
    state: torch.Tensor                  # (B, H_kv, d_k, d_v)
    scale: torch.Tensor                  # e^{A_e} of the segment, (B or 1, H_kv, 1, 1); None: 1
    src: object
    dst: object


def _is_peer(end):
    return end is not None and end != LOCAL


def _chain_links(states, scales, layout, group, reverse):
    """Links of the causal chain over sub-chunks (g ascending; descending if reverse), in this rank's order."""
    W, r = comm.group_size(group), comm.group_rank(group)
    n = layouts.segments_per_rank(layout)
    owner = {g: rank for rank in range(W) for g in layouts.segment_indices(layout, rank, W)}
    idx = layouts.segment_indices(layout, r, W)
    per_seg, step = states.unflatten(0, (-1, n)), -1 if reverse else 1

    def end(g):
        return None if g not in owner else (LOCAL if owner[g] == r else owner[g])
    order = sorted(range(n), key=lambda s: idx[s], reverse=reverse)
    return [_Link(s, per_seg[:, s], scales[s], end(idx[s] - step), end(idx[s] + step)) for s in order]


def _total_links(own, group):
    """Non-causal: a prefix chain up the ranks and a suffix chain down, the nearer chain start served first."""
    W, r = comm.group_size(group), comm.group_rank(group)
    up = _Link("prefix", own, None, r - 1 if r > 0 else None, r + 1 if r < W - 1 else None)
    down = _Link("suffix", own, None, r + 1 if r < W - 1 else None, r - 1 if r > 0 else None)
    return [up, down] if r < (W - 1) / 2 else [down, up]


def _column_slices(d_v, blocks):
    sizes = [d_v // blocks + (j < d_v % blocks) for j in range(blocks)]
    starts = [sum(sizes[:j]) for j in range(blocks)]
    return [slice(a, a + s) for a, s in zip(starts, sizes)]


def _scale(scale, x):
    """A segment's e^{A_e} (·, H, 1, 1) times x, or its delta-rule transition Ã (·, H, d_k, d_k) applied to x."""
    return scale * x if scale.shape[-1] == 1 else scale @ x


def _start(links, blocks, group):
    """Post every receive; chain starts send their blocks now. -> pending (slices, inboxes, send works)."""
    slices = _column_slices(links[0].state.shape[-1], blocks)
    inboxes = []
    for link in links:
        bufs = [link.state.new_empty((*link.state.shape[:-1], sl.stop - sl.start)) for sl in slices] \
            if _is_peer(link.src) else []
        inboxes.append(list(zip(bufs, comm.exchange([], [(b, link.src) for b in bufs], group))) if bufs else [])
    sent = []
    for link in links:
        if link.src is None and _is_peer(link.dst):          # nothing to wait for: M leaves before the compute
            sent += comm.exchange([(link.state[..., sl], link.dst) for sl in slices], [], group)
    return slices, inboxes, sent


def _finish(links, pending, group):
    """Block by block in chain order: wait, fold X ← scale·X + state, send on. -> ({name: incoming}, send works)."""
    slices, inboxes, sent = pending
    incoming, carried = {}, None
    for link, inbox in zip(links, inboxes):
        parts, out = [], []
        for j, sl in enumerate(slices):
            own = link.state[..., sl]
            if link.src is None:
                x = torch.zeros_like(own)
            elif link.src == LOCAL:
                x = carried[j]
            else:
                x, work = inbox[j]
                work.wait()
            parts.append(x)
            if link.dst is None or (link.src is None and link.dst != LOCAL):   # chain end, or sent by _start
                continue
            y = own if link.src is None else (x + own if link.scale is None else _scale(link.scale, x) + own)
            out.append(y)
            if link.dst != LOCAL:
                sent += comm.exchange([(y, link.dst)], [], group)
        incoming[link.name] = torch.cat(parts, dim=-1)
        carried = out
    return incoming, sent


def _scan(links, blocks, group, compute, rescale=None):
    """Start the chain, run compute() while blocks travel, finish it. -> (compute's result, incoming, sends).
    rescale(): the links' scales by segment, set after compute (documents: they need the gathered ids)."""
    pending = _start(links, blocks, group)
    result = compute()
    if rescale is not None:
        scales = rescale()
        for link in links:
            link.scale = scales[link.name]
    incoming, sent = _finish(links, pending, group)
    return result, incoming, sent


def _segment_scales(log_decay, gs, c, n, dtype):
    """e^{A_e} of each local segment as (B or 1, H_kv, 1, 1), a list of n; None entries without decay or gate."""
    totals = segment_log_totals(log_decay, gs, c)                  # (B·n, H_kv) gated, (1, H_kv) constant, None
    if totals is None:
        return [None] * n
    scale = totals.exp().to(dtype)
    per = scale[:, None] if scale.shape[0] == 1 else scale.unflatten(0, (-1, n))
    return [per[:, 0 if per.shape[1] == 1 else s, :, None, None] for s in range(n)]


def _blocks(blocks, states, layout, causal, group):
    W = comm.group_size(group)
    hops = (W - 1) * (layouts.segments_per_rank(layout) if causal else 1)
    per_segment = states[0].numel() * states.element_size() * (states.shape[0] // layouts.segments_per_rank(layout))
    return blocks or choose_blocks(per_segment, hops, states.shape[-1])


def _start_length_check(local_len, n, layout, group, dtype, device, ends=None):
    """All-gather every rank's (T_local, n) now, with documents also its segments' (B·n, 2) first and last ids
    (padded to 2 segments). -> (check, ids): check() raises the same ValueError on every rank; ids() waits and
    gives the gathered ids (N, B, 2) in global sub-chunk order (None without documents)."""
    header = torch.tensor([local_len, n], dtype=dtype, device=device)
    out, work = comm.all_gather(header if ends is None else header_with_ids(header, ends, n), group, async_op=True)
    W = comm.group_size(group)

    def gathered_ids():
        work.wait()
        order = torch.argsort(torch.tensor([g for r in range(W) for g in layouts.segment_indices(layout, r, W)]))
        return None if ends is None else ids_from_header(out.view(W, -1), 2, n, order)

    def check():
        work.wait()
        rows = out.view(W, -1)[:, :2]
        if not bool((rows == rows[0]).all()):
            raise ValueError(f"All-Scan ranks hold different local lengths {rows[:, 0].long().tolist()} or layouts:"
                             f" every rank of the sequence-parallel group must hold T/W tokens in layout {layout!r}")
        if ends is not None:
            check_global_ids(gathered_ids(), "All-Scan", layout)
    return check, gathered_ids


def _scan_states(states, scales, causal, layout, group, blocks, reverse, compute, rescale=None):
    """Run the chain(s) over per-segment states around compute(). -> (result, per-row X (B·n, ...), sends)."""
    n = layouts.segments_per_rank(layout)
    if causal:
        links = _chain_links(states, scales, layout, group, reverse)
        result, incoming, sent = _scan(links, blocks, group, compute, rescale)
        return result, torch.stack([incoming[s] for s in range(n)], dim=1).flatten(0, 1), sent
    own = states.unflatten(0, (-1, n)).sum(1)
    result, incoming, sent = _scan(_total_links(own, group), blocks, group, compute)
    total = incoming["prefix"] + own + incoming["suffix"]
    return result, total.repeat_interleave(n, dim=0), sent


def _segments(x, n):
    return None if x is None else to_segments(x, n)


def allscan_forward(q, k, v, log_decay, log_gate, causal, layout, group, backend, blocks=None, segment_ids=None):
    """-> (o (B, T_local, H, d_v), prefix states (B·n, H_kv, d_k, d_v) or the non-causal total, K used, the id
    before each local segment (B·n,) or None)."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs, gs, ids = (_segments(x, n) for x in (q, k, v, log_gate, segment_ids))
    ends = segment_ends(ids)
    check, gathered_ids = _start_length_check(q.shape[1], n, layout, group, state_dtype(q.dtype), q.device, ends)
    states = local_state(ks, vs, log_decay, gs, ids)
    blocks = _blocks(blocks, states, layout, causal, group)
    scales = _segment_scales(log_decay, gs, qs.shape[1], n, states.dtype)
    prev = []

    def compute():
        if causal:
            return intra_forward(qs, ks, vs, log_decay, backend, gs, ids=ids)
        return qs.new_zeros(*qs.shape[:3], vs.shape[-1])

    def rescale():                      # documents: the ids before each segment, from the tiny gather
        idx = layouts.segment_indices(layout, comm.group_rank(group), comm.group_size(group))
        prev.append(previous_ids(ends, gathered_ids(), idx))
        return document_scales(scales, ends, prev[0], n, states.dtype)
    o, prefix, sent = _scan_states(states, scales, causal, layout, group, blocks, False, compute,
                                   None if ids is None else rescale)
    if ids is not None:
        prefix = prefix * (ends[:, 0] == prev[0]).to(prefix.dtype)[:, None, None, None]     # keep_g·P_g
    o = add_prefix_output(o, qs, prefix, log_decay, gs, ids) if causal else add_prefix_output(o, qs, prefix, None)
    comm.wait_all(sent)
    check()
    return from_segments(o, n), prefix, blocks, (prev[0] if prev else None)


def allscan_backward(q, k, v, log_decay, log_gate, prefix, do, causal, layout, group, backend, blocks,
                     segment_ids=None, prev=None):
    """-> (dq, dk, dv, d log_gate or None) local shards; the suffix gradient G comes down the chain reversed.
    prev: the forward's ids before each local segment (documents)."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs, dos, gs, ids = (_segments(x, n) for x in (q, k, v, do, log_gate, segment_ids))
    dstates = state_grad(qs, dos, log_decay, k.shape[2], gs, ids)
    scales = _segment_scales(log_decay, gs, qs.shape[1], n, dstates.dtype)
    if ids is not None:                 # keep_g·dM_g leaves toward g−1; through g: e^{A_e}·[last = prev]
        ends = segment_ends(ids)
        dstates = dstates * (ends[:, 0] == prev).to(dstates.dtype)[:, None, None, None]
        scales = document_scales(scales, ends, prev, n, dstates.dtype)
    if not causal:
        _, suffix, sent = _scan_states(dstates, scales, False, layout, group, blocks, True, lambda: None)
        zeros = (torch.zeros_like(x) for x in (qs, ks, vs))
        grads = add_state_grads(*zeros, qs, ks, vs, dos, prefix, suffix, None)
        comm.wait_all(sent)
        return (*(from_segments(g, n) for g in grads), None)

    def compute():                      # the kernel enters from the cached prefix: dq (and its dg part) whole
        return local_backward(qs, ks, vs, log_decay, dos, backend, gs, prefix, ids=ids)
    (dq, dk, dv, dg), suffix, sent = _scan_states(dstates, scales, True, layout, group, blocks, True, compute)
    dk, dv, b = add_suffix_grads(dk, dv, ks, vs, suffix, log_decay, gs, ids)
    if gs is not None:
        dg = from_segments((dg.double() + add_total_grad(b, prefix, suffix, log_decay, gs, ids)).to(log_gate.dtype),
                           n)
    comm.wait_all(sent)
    return from_segments(dq, n), from_segments(dk.to(k.dtype), n), from_segments(dv.to(v.dtype), n), dg


class _AllScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, log_gate, causal, layout, group, backend, blocks, segment_ids):
        o, prefix, blocks, prev = allscan_forward(q, k, v, log_decay, log_gate, causal, layout, group, backend, blocks,
                                                  segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, log_gate, prefix, segment_ids, prev)
        ctx.config = (causal, layout, group, backend, blocks)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, log_gate, prefix, segment_ids, prev = ctx.saved_tensors
        dq, dk, dv, dg = allscan_backward(q, k, v, log_decay, log_gate, prefix, do.contiguous(), *ctx.config,
                                          segment_ids, prev)
        return dq, dk, dv, None, dg, None, None, None, None, None, None


def allscan(q, k, v, *, log_decay=None, log_gate=None, causal=True, layout="contiguous", group=None, backend=None,
            blocks=None, beta=None, segment_ids=None):
    """All-Scan linear attention on local shards (B, T_local, H, D) -> o (B, T_local, H, d_v).

    Same arguments (grouped K/V heads, log_decay, log_gate, segment_ids) and errors as `lasp.lasp2`; blocks: the K
    column blocks of each message (1 ≤ K ≤ d_v; None = `choose_blocks`).
    Raises ValueError before any communication on bad shapes; on every rank if ranks hold different lengths or
    ids that decrease across ranks. beta: the delta rule, as in `lasp.lasp2`; the chain's blocks fold Ã·X + M (one
    d_k×d_v state per hop).
    """
    if beta is not None:
        delta.check_delta_engine_inputs(q, k, v, beta, log_gate, log_decay, causal, layout, segment_ids)
        _check_blocks(blocks, v)
        group = mesh.sp_group() if group is None else group
        return _AllScanDelta.apply(q, k, v, beta, log_gate, segment_ids, layout, group, blocks)
    check_engine_inputs(q, k, v, log_decay, causal, layout, log_gate, segment_ids)
    if blocks is not None and not (isinstance(blocks, int) and 1 <= blocks <= v.shape[-1]):
        raise ValueError(f"allscan: blocks must be an int in [1, d_v = {v.shape[-1]}], got {blocks!r}")
    group = mesh.sp_group() if group is None else group
    backend = resolve_backend(backend, q.device)
    log_decay = constant_decay(log_decay, q)
    return _AllScan.apply(q, k, v, log_decay, log_gate, causal, layout, group, backend, blocks, segment_ids)


def _check_blocks(blocks, v):
    if blocks is not None and not (isinstance(blocks, int) and 1 <= blocks <= v.shape[-1]):
        raise ValueError(f"allscan: blocks must be an int in [1, d_v = {v.shape[-1]}], got {blocks!r}")


class _AllScanDelta(torch.autograd.Function):
    """The delta rule: the chain carries P ← Ã P + M forward and G ← Ãᵀ G + dP̃ backward, per column block."""
    @staticmethod
    def forward(ctx, q, k, v, beta, log_gate, segment_ids, layout, group, blocks):
        n = layouts.segments_per_rank(layout)
        inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, n)
        ends = None if segment_ids is None else segment_ends(to_segments(segment_ids, n))
        # the ids ride in the length header's gather, as for the other kinds (no extra collective)
        check, gathered_ids = _start_length_check(q.shape[1], n, layout, group, state_dtype(q.dtype), q.device, ends)
        flags = None if ends is None else delta.local_first_flags(gathered_ids()[..., None], layout, group)
        pieces, A, M = delta.local_transition(inp)
        A = delta.keep(flags, A)
        blocks = _blocks(blocks, M, layout, True, group)
        _, prefix, sent = _scan_states(M, list(A.unflatten(0, (-1, n)).unbind(1)), True, layout, group, blocks,
                                       False, lambda: None)
        o, states = delta.local_forward(inp, pieces, delta.keep(flags, prefix), n)
        comm.wait_all(sent)
        check()
        ctx.save_for_backward(q, k, v, beta, log_gate, segment_ids, A, flags, *states, *delta.saved_pieces(pieces))
        ctx.config = (layout, group, blocks, len(states))
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, log_gate, segment_ids, A, flags, *rest = ctx.saved_tensors
        layout, group, blocks, n_states = ctx.config
        n = layouts.segments_per_rank(layout)
        inp = delta.delta_segments(q, k, v, beta, log_gate, segment_ids, n)
        dP = delta.keep(flags, delta.local_entry_grad(inp, rest[n_states:], do, n))
        scales = list(A.transpose(-1, -2).unflatten(0, (-1, n)).unbind(1))
        _, suffix, sent = _scan_states(dP, scales, True, layout, group, blocks, True, lambda: None)
        grads = delta.local_backward(inp, rest[:n_states], do.contiguous(), suffix, n)[0]
        comm.wait_all(sent)
        return (*grads, None, None, None, None)


def _memory(s):
    """(saved, backward working set, exchange buffer) bytes: as LASP-2's; buffer ≤ 2 received + 2 sent states."""
    return linear_saved(s), linear_kernel_work(s), 4 * s.B * s.H * s.d_k * s.d_v * 4


ENGINE = EngineSpec("allscan", "linear", allscan, ("contiguous", "zigzag"),
                    "states: one prefix state per segment, point to point down a chain, pipelined in column blocks",
                    _memory)
