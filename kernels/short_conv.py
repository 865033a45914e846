"""Causal depthwise short convolution on one device (fla's ShortConvolution: depthwise nn.Conv1d of width w, no
bias, then SiLU), with document boundaries and a halo: an op with an explicit backward and its naive torch twin.

Shapes: x (R, T, F) F channels, weight (F, 1, w), h = w − 1; halo (R, h, F) the h tokens before x (None: zeros;
under sequence parallelism another rank's tail, parallel/short_conv.py); ids (R, h + T) the document ids of
[halo | x] (None: one document). Token j < 0 is halo[h + j].

    pre_t = Σ_{k<w} W[f, 0, k] · x_{t−h+k} · [ids(t−h+k) = ids(t)]        (tap k reads token t − h + k)
    y_t   = SiLU(pre_t)  (or pre_t without the activation)
    dx_{t−h+k} += W_k · dpre_t · mask,   dW_k = Σ_{r,t} dpre_t · x_{t−h+k} · mask

Each tap is one multiply-add over shifted views of x (no copy of x with its halo in front). Documents: the taps
are applied unmasked, then the few (r, t, k) whose tap crosses a boundary (at most h per document start) are
subtracted again, found by one `nonzero` (a host sync on GPU), so documents cost almost nothing over the dense
op, where a dense mask would add a pass over (R, T, F) per tap, forward and backward. Computed in x's dtype (a
float32 weight under bf16 autocast is cast, as nn.Conv1d would run); the weight gradient summed in at least
float32. `short_conv_naive` is the same op as plain autograd over masked taps, the twin the tests compare against.
"""
import torch
import torch.nn.functional as F

__all__ = ["short_conv", "short_conv_naive", "conv_forward", "conv_backward", "silu_backward", "document_ids"]


def _crossing_taps(ids, h, T):
    """(n, 3) long rows (r, t, k): tap k of output t reads another document; None without documents or if none."""
    if ids is None or h == 0:
        return None
    bad = torch.stack([ids[:, k:k + T] != ids[:, h:] for k in range(h)], dim=-1)     # (R, T, h) bool, small
    crossing = bad.nonzero()
    return crossing if len(crossing) else None


def _read(x, halo, r, j):
    """Rows (n, F) of tokens j of rows r: x[r, j] for j ≥ 0, halo[r, h + j] for j < 0 (zeros without a halo)."""
    rows = x[r, j.clamp(min=0)]
    before = (j < 0).unsqueeze(-1)
    if halo is None:
        return rows.masked_fill(before, 0)
    return torch.where(before, halo[r, (j + halo.shape[1]).clamp(max=halo.shape[1] - 1)], rows)


def conv_forward(x, halo, weight, ids):
    """-> pre-activation (R, T, F) of x (R, T, F) after halo (R, h, F) or None, and the boundary-crossing taps
    (n, 3) or None (what conv_backward needs of the documents); ids (R, h + T) or None."""
    h, T = weight.shape[-1] - 1, x.shape[1]
    taps = weight[:, 0].t().to(x.dtype)                                    # (w, F)
    pre = x * taps[h]
    for k in range(h):
        s = h - k                                                          # tap k reads token t − s
        if s < T:
            pre[:, s:].addcmul_(x[:, :T - s], taps[k])
        if halo is not None:                                               # outputs t < s read halo[t + k]
            pre[:, :s].addcmul_(halo[:, k:k + min(s, T)], taps[k])
    crossing = _crossing_taps(ids, h, T)
    if crossing is not None:
        r, t, k = crossing.unbind(1)
        pre.index_put_((r, t), -_read(x, halo, r, t + k - h) * taps[k], accumulate=True)
    return pre, crossing


def conv_backward(x, halo, weight, crossing, dpre):
    """-> dx (R, T, F), dhalo (R, h, F) or None, dweight (F, 1, w) of conv_forward, given dpre (R, T, F) and the
    crossing taps conv_forward returned."""
    h, T = weight.shape[-1] - 1, x.shape[1]
    taps = weight[:, 0].t().to(x.dtype)
    acc = torch.promote_types(x.dtype, torch.float32)                      # weight sums over R·T tokens
    dx = dpre * taps[h]
    dhalo = None if halo is None else torch.zeros_like(halo)
    dtaps = torch.zeros(h + 1, x.shape[-1], dtype=acc, device=x.device)
    dtaps[h] = (dpre * x).sum((0, 1), dtype=acc)
    for k in range(h):
        s = h - k
        if s < T:
            dx[:, :T - s].addcmul_(dpre[:, s:], taps[k])
            dtaps[k] += (dpre[:, s:] * x[:, :T - s]).sum((0, 1), dtype=acc)
        if halo is not None:
            m = min(s, T)
            dhalo[:, k:k + m].addcmul_(dpre[:, :m], taps[k])
            dtaps[k] += (dpre[:, :m] * halo[:, k:k + m]).sum((0, 1), dtype=acc)
    if crossing is not None:                                               # undo the taps across boundaries
        r, t, k = crossing.unbind(1)
        j, g = t + k - h, dpre[r, t]                                       # (n,), (n, F)
        dtaps.index_add_(0, k, -(g * _read(x, halo, r, j)).to(acc))
        before = (j < 0).unsqueeze(-1)                                     # halo tokens; no boolean indexing:
        gk = g * taps[k]                                                   # the other side adds zeros
        dx.index_put_((r, j.clamp(min=0)), -gk.masked_fill(before, 0), accumulate=True)
        if halo is not None:
            dhalo.index_put_((r, (j + h).clamp(max=h - 1)), -gk.masked_fill(~before, 0), accumulate=True)
    return dx, dhalo, dtaps.t().unsqueeze(1).to(weight.dtype)


def silu_backward(pre, dy):
    """dy · SiLU'(pre) = dy · σ(pre)·(1 + pre·(1 − σ(pre))), aten's fused kernel (one pass, not six)."""
    return torch.ops.aten.silu_backward(dy, pre)


def document_ids(x, weight, halo=None, segment_ids=None, halo_segment_ids=None):
    """Check the shapes (ValueError naming them) -> ids (R, h + T) of [halo | x], or None without documents. The
    halo's ids default to x's first document (an absent halo is zeros: any id would do)."""
    R, T, Fch = x.shape
    w = weight.shape[-1]
    if weight.dim() != 3 or weight.shape != (Fch, 1, w) or w < 1:
        raise ValueError(f"short_conv: weight must be (F, 1, w) = ({Fch}, 1, w) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    if halo is not None and halo.shape != (R, w - 1, Fch):
        raise ValueError(f"short_conv: halo must be (B, w-1, F) = ({R}, {w - 1}, {Fch}), got {tuple(halo.shape)}")
    if segment_ids is None:
        return None
    if segment_ids.shape != (R, T) or segment_ids.is_floating_point():
        raise ValueError(f"short_conv: segment_ids must be an integer (B, T) = ({R}, {T}) tensor, got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    first = segment_ids[:, :1].expand(R, w - 1) if halo_segment_ids is None else halo_segment_ids
    return torch.cat([first.to(torch.int64), segment_ids.to(torch.int64)], dim=1)


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, halo, ids, activation):
        pre, crossing = conv_forward(x, halo, weight, ids)
        ctx.save_for_backward(x, weight, halo, crossing, pre if activation else None)
        return F.silu(pre) if activation else pre

    @staticmethod
    def backward(ctx, dy):
        x, weight, halo, crossing, pre = ctx.saved_tensors
        dpre = dy.contiguous() if pre is None else silu_backward(pre, dy)
        dx, dhalo, dweight = conv_backward(x, halo, weight, crossing, dpre)
        return dx, dweight, dhalo, None, None


def short_conv(x, weight, *, activation=True, segment_ids=None, halo=None, halo_segment_ids=None):
    """Causal depthwise convolution of x (B, T, F) with weight (F, 1, w), then SiLU if activation -> (B, T, F).
    halo (B, w−1, F): the tokens before x (zeros when None), halo_segment_ids (B, w−1) their documents (None: x's
    first); segment_ids (B, T): taps never read another document. Gradients reach x, weight and halo.
    Raises ValueError naming the shapes."""
    ids = document_ids(x, weight, halo, segment_ids, halo_segment_ids)
    halo = None if halo is None else halo.to(x.dtype)
    return _ShortConv.apply(x, weight, halo, ids, activation)


def short_conv_naive(x, weight, *, activation=True, segment_ids=None, halo=None, halo_segment_ids=None):
    """The same op as plain autograd over [halo | x], one masked multiply-add per tap (the twin the tests use)."""
    ids = document_ids(x, weight, halo, segment_ids, halo_segment_ids)
    h, T = weight.shape[-1] - 1, x.shape[1]
    xe = torch.cat([x.new_zeros(x.shape[0], h, x.shape[2]) if halo is None else halo.to(x.dtype), x], dim=1)
    taps = weight[:, 0].t().to(x.dtype)
    y = xe[:, h:] * taps[h]
    for k in range(h):
        term = xe[:, k:k + T] * taps[k]
        y = y + (term if ids is None else term * (ids[:, k:k + T] == ids[:, h:]).unsqueeze(-1))
    return F.silu(y) if activation else y
