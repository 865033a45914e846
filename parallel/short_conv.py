"""Causal short convolution under sequence parallelism: every segment fetches its halo (the h = w − 1 tokens before
it in global order) from the rank that holds them, and the backward sends the halo's gradient back to that rank.

Shapes: x (B, C, F) the local shard, C tokens per rank in `layout` (parallel/layout.py), F channels; weight
(F, 1, w) (depthwise nn.Conv1d without bias, fla's ShortConvolution); h = w − 1. A rank's C tokens are n segments
(1 contiguous, 2 zigzag) of c = C/n tokens, global sub-chunk g each; segment_ids (B, C) document ids or None.

    y_t = act(Σ_{k<w} W[f, 0, k] · x_{t−h+k} · [doc(t−h+k) = doc(t)])        act = SiLU, or none

    forward   sub-chunk g's halo = the last h tokens of sub-chunk g − 1 (zeros for g = 0). Contiguous: rank r − 1's.
              Zigzag: sub-chunk r's from rank r − 1, sub-chunk 2W−1−r's from rank r + 1 (on rank W − 1 its own
              first segment: a local slice). ONE comm.exchange (batch_isend_irecv) of the tails, with their
              document ids (int64, h·B numbers) when documents are given, so taps stop at a boundary on a rank edge.
    backward  the same messages reversed: each segment's dhalo (B, h, F) goes to the tail's owner, which adds it to
              the gradient of its last h tokens. dW is this rank's partial sum, reduced over the sequence-parallel
              ranks with every other weight's gradient.

Point-to-point, not one all-gather: a segment needs h·B·F numbers from ONE neighbour. An all-gather would bring
every rank's tails to every rank (W× the bytes, W − 1 latency steps on a ring) and need a reduce-scatter of a
W-slot gradient buffer back; P2P moves exactly the halo, one latency step each way. Bytes received per call:
h·B·F·(bytes of x) per segment that has a halo on another rank (+ h·B·8 with documents).

The convolution itself is kernels/short_conv.py's (conv_forward / conv_backward over [halo | segment]), the op the
models run on one process. A segment shorter than h tokens would need its halo from two
ranks: ValueError naming short_conv and the segment length, before any message.
"""
import torch
import torch.nn.functional as F

from lasp.kernels.short_conv import conv_backward, conv_forward, silu_backward

from . import comm, layout as layouts, mesh

__all__ = ["sequence_parallel_short_conv", "short_conv_forward", "short_conv_backward", "halo_plan"]


# ---------------------------------------------------------------------------------------------- halo messages
def halo_plan(layout, rank, world):
    """Per local segment s: (source, consumer), each (rank, segment) or None. source holds sub-chunk g − 1 (this
    segment's halo), consumer sub-chunk g + 1 (which reads this segment's tail)."""
    owner = {g: (r, s) for r in range(world) for s, g in enumerate(layouts.segment_indices(layout, r, world))}
    return [(owner.get(g - 1), owner.get(g + 1)) for g in layouts.segment_indices(layout, rank, world)]


def _move(blocks, plan, forward, group):
    """Send each local segment's block along the plan (forward: tail -> consumer; backward: dhalo -> source) and
    return what arrives per segment ([list of tensors] or None). blocks: per segment, a list of tensors (B, h, ...)
    sent together; a peer that is this rank is a local hand-over. ONE comm.exchange; a directed pair of ranks
    carries at most one segment's block (asserted), so the messages match in order."""
    rank = comm.group_rank(group)
    out, sends, recvs, peers = [None] * len(plan), [], [], set()
    if blocks[0][0].shape[1] == 0:                                   # width 1: no halo, nothing to move
        return out
    for s, (source, consumer) in enumerate(plan):
        to, frm = (consumer, source) if forward else (source, consumer)
        if to is not None and to[0] == rank:
            out[to[1]] = list(blocks[s])
        elif to is not None:
            assert ("to", to[0]) not in peers, (plan, rank)
            peers.add(("to", to[0]))
            sends += [(b, to[0]) for b in blocks[s]]
        if frm is not None and frm[0] != rank:
            assert ("from", frm[0]) not in peers, (plan, rank)
            peers.add(("from", frm[0]))
            out[s] = [torch.empty_like(b) for b in blocks[s]]
            recvs += [(b, frm[0]) for b in out[s]]
    if sends or recvs:
        comm.wait_all(comm.exchange(sends, recvs, group))
    return out


def _halos(x, segment_ids, h, layout, group):
    """-> xe (B·n, h + c, F) = [halo | segment] per segment, ids (B·n, h + c) or None."""
    B, C, Fch = x.shape
    n = layouts.segments_per_rank(layout)
    c = C // n
    segs = x.view(B, n, c, Fch)
    ids = None if segment_ids is None else segment_ids.view(B, n, c).to(torch.int64)
    blocks = [[segs[:, s, c - h:]] + ([] if ids is None else [ids[:, s, c - h:]]) for s in range(n)]
    got = _move(blocks, halo_plan(layout, comm.group_rank(group), comm.group_size(group)), True, group)
    halo = torch.stack([x.new_zeros(B, h, Fch) if g is None else g[0] for g in got], dim=1)  # (B, n, h, F)
    xe = torch.cat([halo, segs], dim=2).flatten(0, 1)
    if ids is None:
        return xe, None
    # sub-chunk 0 has no halo (zeros): its ids join the first document, any value would do
    halo_ids = torch.stack([ids[:, s, :1].expand(B, h) if g is None else g[1] for s, g in enumerate(got)], dim=1)
    return xe, torch.cat([halo_ids, ids], dim=2).flatten(0, 1)


def short_conv_forward(x, weight, segment_ids, activation, layout, group):
    """-> (y (B, C, F), xe (B·n, h + c, F), ids (B·n, h + c) or None, pre-activation (B·n, c, F) or None): the
    last three are what the backward needs."""
    h = weight.shape[-1] - 1
    xe, ids = _halos(x, segment_ids, h, layout, group)
    pre = conv_forward(xe, weight, ids)
    return (F.silu(pre) if activation else pre).reshape(x.shape), xe, ids, pre if activation else None


def short_conv_backward(xe, weight, ids, pre, dy, layout, group):
    """-> (dx (B, C, F), dweight (F, 1, w)): the local gradient plus the dhalo that consumers sent back. pre: the
    pre-activation (None without SiLU)."""
    h = weight.shape[-1] - 1
    n = layouts.segments_per_rank(layout)
    B, c, Fch = dy.shape[0], xe.shape[1] - h, xe.shape[-1]
    dpre = dy.reshape(B * n, c, Fch)
    dpre = dpre if pre is None else silu_backward(pre, dpre)
    dxe, dweight = conv_backward(xe, weight, ids, dpre)
    dxe = dxe.view(B, n, h + c, Fch)
    dx = dxe[:, :, h:].clone()
    got = _move([[dxe[:, s, :h]] for s in range(n)], halo_plan(layout, comm.group_rank(group),
                                                               comm.group_size(group)), False, group)
    for s, g in enumerate(got):
        if g is not None:
            dx[:, s, c - h:] += g[0]
    return dx.view(B, n * c, Fch), dweight


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, segment_ids, activation, layout, group):
        y, xe, ids, pre = short_conv_forward(x, weight, segment_ids, activation, layout, group)
        ctx.save_for_backward(xe, weight, ids, pre)
        ctx.config = (layout, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        xe, weight, ids, pre = ctx.saved_tensors
        dx, dweight = short_conv_backward(xe, weight, ids, pre, dy.contiguous(), *ctx.config)
        return dx, dweight, None, None, None, None


def _check(x, weight, segment_ids, layout):
    """ValueError naming the sizes (before any message)."""
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[:2] != (x.shape[-1], 1) or weight.shape[-1] < 1:
        raise ValueError(f"short_conv: x must be (B, C, F) and weight (F, 1, w), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    c = layouts.check_local_len(x.shape[1], layout)
    if c < weight.shape[-1] - 1:
        raise ValueError(f"short_conv: width {weight.shape[-1]} needs segments of at least {weight.shape[-1] - 1} "
                         f"tokens per rank (its halo), got segment length {c} (local length {x.shape[1]}, layout "
                         f"{layout!r}): use a longer sequence or fewer sequence-parallel ranks")
    if segment_ids is not None and (segment_ids.shape != x.shape[:2] or segment_ids.is_floating_point()):
        raise ValueError(f"short_conv: segment_ids must be an integer (B, C) = {tuple(x.shape[:2])} tensor, got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)}")


def sequence_parallel_short_conv(x, weight, *, activation=True, segment_ids=None, layout="contiguous", group=None):
    """Causal depthwise convolution (then SiLU if activation) of the local shard x (B, C, F) with weight (F, 1, w),
    exactly as kernels.short_conv.short_conv over the whole sequence: the halo comes from the rank before in global
    order. segment_ids (B, C): taps stop at document boundaries, across ranks too. group None = the mesh's
    sequence-parallel group (else the default). -> (B, C, F). Raises ValueError (shapes, a segment shorter than
    w − 1 tokens, segment_ids not an integer (B, C) tensor) before any message."""
    _check(x, weight, segment_ids, layout)
    group = mesh.sp_group() if group is None else group
    return _ShortConv.apply(x.contiguous(), weight, segment_ids, activation, layout, group)
