"""Causal short convolution under sequence parallelism: every segment fetches its halo (the h = w − 1 tokens before
it in global order) from the rank that holds them, and the backward sends the halo's gradient back to that rank.

Shapes: x (B, C, F) the local shard, C tokens per rank in `layout` (parallel/layout.py), F channels; weight
(F, 1, w) (depthwise nn.Conv1d without bias, fla's ShortConvolution); h = w − 1. A rank's C tokens are n segments
(1 contiguous, 2 zigzag) of c = C/n tokens, global sub-chunk g each; segment_ids (B, C) document ids or None.

    y_t = act(Σ_{k<w} W[f, 0, k] · x_{t−h+k} · [doc(t−h+k) = doc(t)])        act = SiLU, or none

    forward   sub-chunk g's halo = the last h tokens of sub-chunk g − 1 (zeros for g = 0). Contiguous: rank r − 1's.
              Zigzag: sub-chunk r's from rank r − 1, sub-chunk 2W−1−r's from rank r + 1 (on rank W − 1 its own
              first segment: a local slice). ONE comm.exchange (batch_isend_irecv) of the tails, each one message
              that also carries its document ids when documents are given (h·B int64, their bytes appended), so
              taps stop at a boundary on a rank edge.
    backward  the same messages reversed: each segment's dhalo (B, h, F) goes to the tail's owner, which adds it to
              the gradient of its last h tokens. dW is this rank's partial sum, reduced over the sequence-parallel
              ranks with every other weight's gradient.

Point-to-point, not one all-gather: a segment needs h·B·F numbers from ONE neighbour. An all-gather would bring
every rank's tails to every rank (W× the bytes, W − 1 latency steps on a ring) and need a reduce-scatter of a
W-slot gradient buffer back; P2P moves exactly the halo, one latency step each way. Bytes received per call:
h·B·F·(bytes of x) per segment whose halo is on another rank (+ h·B·8 with documents), and h·B·F·(bytes of x)
per segment whose tail went to another rank on the way back.

The convolution itself is kernels/short_conv.py's (conv_forward / conv_backward of a segment after its halo), the
op the models run on one process. A segment shorter than h tokens would need its halo from two
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
    """Send each local segment's block (B, ...) along the plan (forward: tail -> consumer; backward: dhalo ->
    source) and return what arrives per segment (None where nothing does); a peer that is this rank is a local
    hand-over. ONE comm.exchange; a directed pair of ranks carries at most one block (asserted)."""
    rank = comm.group_rank(group)
    out, sends, recvs, peers = [None] * len(plan), [], [], set()
    for s, (source, consumer) in enumerate(plan):
        to, frm = (consumer, source) if forward else (source, consumer)
        if to is not None and to[0] == rank:
            out[to[1]] = blocks[s]
        elif to is not None:
            assert ("to", to[0]) not in peers, (plan, rank)
            peers.add(("to", to[0]))
            sends.append((blocks[s], to[0]))
        if frm is not None and frm[0] != rank:
            assert ("from", frm[0]) not in peers, (plan, rank)
            peers.add(("from", frm[0]))
            out[s] = torch.empty_like(blocks[s])
            recvs.append((out[s], frm[0]))
    if sends or recvs:
        comm.wait_all(comm.exchange(sends, recvs, group))
    return out


def _halos(x, segment_ids, h, layout, group):
    """-> segments (B·n, c, F) (a view of x), halos (B·n, h, F), ids (B·n, h + c) or None. A tail travels as one
    message: its h·F values, then (with documents) its h int64 ids reinterpreted as x's dtype (bytes, not values)."""
    B, C, Fch = x.shape
    n = layouts.segments_per_rank(layout)
    c = C // n
    segs = x.view(B, n, c, Fch)
    ids = None if segment_ids is None else segment_ids.reshape(B, n, c).to(torch.int64)
    tails = [segs[:, s, c - h:].reshape(B, h * Fch) for s in range(n)]
    if ids is not None:
        tails = [torch.cat([t, ids[:, s, c - h:].contiguous().view(x.dtype)], dim=1) for s, t in enumerate(tails)]
    got = [None] * n if h == 0 else _move(tails, halo_plan(layout, comm.group_rank(group), comm.group_size(group)),
                                          True, group)
    halo = torch.stack([x.new_zeros(B, h, Fch) if g is None else g[:, :h * Fch].view(B, h, Fch) for g in got], 1)
    halo = halo.flatten(0, 1)                                                    # (B·n, h, F)
    if ids is None:
        return segs.flatten(0, 1), halo, None
    # sub-chunk 0 has no halo (zeros): its ids join the first document, any value would do
    halo_ids = torch.stack([ids[:, s, :1].expand(B, h) if g is None else g[:, h * Fch:].contiguous().view(torch.int64)
                            for s, g in enumerate(got)], dim=1)
    return segs.flatten(0, 1), halo, torch.cat([halo_ids, ids], dim=2).flatten(0, 1)


def short_conv_forward(x, weight, segment_ids, activation, layout, group):
    """-> (y (B, C, F), saved): saved = (segments, halos, boundary-crossing taps or None, pre-activation or None),
    what the backward needs."""
    h = weight.shape[-1] - 1
    segs, halo, ids = _halos(x, segment_ids, h, layout, group)
    pre, crossing = conv_forward(segs, halo, weight, ids)
    return (F.silu(pre) if activation else pre).view(x.shape), (segs, halo, crossing, pre if activation else None)


def short_conv_backward(segs, halo, crossing, pre, weight, dy, layout, group):
    """-> (dx (B, C, F), dweight (F, 1, w)): the local gradient plus the dhalo that consumers sent back. pre: the
    pre-activation (None without SiLU)."""
    h = weight.shape[-1] - 1
    n = layouts.segments_per_rank(layout)
    B, c, Fch = dy.shape[0], segs.shape[1], segs.shape[-1]
    dpre = dy.view(B * n, c, Fch)
    dpre = dpre if pre is None else silu_backward(pre, dpre)
    dx, dhalo, dweight = conv_backward(segs, halo, weight, crossing, dpre)
    dx, dhalo = dx.view(B, n, c, Fch), dhalo.view(B, n, h, Fch)
    got = [None] * n if h == 0 else _move([dhalo[:, s].contiguous() for s in range(n)], halo_plan(
        layout, comm.group_rank(group), comm.group_size(group)), False, group)
    for s, g in enumerate(got):
        if g is not None:
            dx[:, s, c - h:] += g
    return dx.view(B, n * c, Fch), dweight


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, segment_ids, activation, layout, group):
        y, saved = short_conv_forward(x, weight, segment_ids, activation, layout, group)
        ctx.save_for_backward(weight, *saved)
        ctx.config = (layout, group)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, segs, halo, crossing, pre = ctx.saved_tensors
        dx, dweight = short_conv_backward(segs, halo, crossing, pre, weight, dy.contiguous(), *ctx.config)
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
