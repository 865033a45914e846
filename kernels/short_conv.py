"""Causal depthwise short convolution on one device (fla's ShortConvolution: depthwise nn.Conv1d of width w, no
bias, then SiLU), with document boundaries and a halo: an op with an explicit backward and its naive torch twin.

Shapes: x (B, T, F) F channels, weight (F, 1, w), h = w − 1; halo (B, h, F) the h tokens before x (zeros when
absent; under sequence parallelism another rank's tail, parallel/short_conv.py); segment_ids (B, T) and
halo_segment_ids (B, h) document ids. xe = [halo | x] (R, h + T, F), ids = [halo ids | ids] (R, h + T).

    pre_t = Σ_{k<w} W[f, 0, k] · xe_{t+k} · [ids_{t+k} = ids_{t+h}]        (tap k reads token t − h + k)
    y_t   = SiLU(pre_t)  (or pre_t without the activation)
    dxe_{t+k} += W_k · dpre_t · mask,   dW_k = Σ_{r,t} dpre_t · xe_{t+k} · mask

Computed in x's dtype (a float32 weight under bf16 autocast is cast, as nn.Conv1d would run), the weight gradient
summed in at least float32. The backward writes one dxe buffer tap by tap, where autograd through the naive
form's slices (`short_conv_naive`, the twin the tests compare against) allocates and adds a zero tensor of xe's
size per tap.
"""
import torch
import torch.nn.functional as F

__all__ = ["short_conv", "short_conv_naive", "conv_forward", "conv_backward", "silu_backward", "extend_inputs"]


def _tap_masks(ids, h, T):
    """[(R, T, 1) bool: tap k of token t stays in t's document] for k < h, or None without documents."""
    if ids is None:
        return None
    return [(ids[:, k:k + T] == ids[:, h:]).unsqueeze(-1) for k in range(h)]


def conv_forward(xe, weight, ids):
    """Pre-activation (R, T, F) of xe (R, h + T, F) = [halo | x], ids (R, h + T) or None."""
    h = weight.shape[-1] - 1
    T = xe.shape[1] - h
    taps, masks = weight[:, 0].t().to(xe.dtype), _tap_masks(ids, h, T)               # (w, F)
    pre = xe[:, h:] * taps[h]
    for k in range(h):
        xs = xe[:, k:k + T] if masks is None else xe[:, k:k + T] * masks[k]
        pre.addcmul_(xs, taps[k])
    return pre


def conv_backward(xe, weight, ids, dpre):
    """-> dxe (R, h + T, F), dweight (F, 1, w) of conv_forward, given dpre (R, T, F)."""
    h = weight.shape[-1] - 1
    T = xe.shape[1] - h
    taps, masks = weight[:, 0].t().to(xe.dtype), _tap_masks(ids, h, T)
    acc = torch.promote_types(xe.dtype, torch.float32)                  # weight sums over R·T tokens
    dxe = torch.empty_like(xe)
    dxe[:, :h].zero_()
    torch.mul(dpre, taps[h], out=dxe[:, h:])
    dtaps = [None] * (h + 1)
    dtaps[h] = (dpre * xe[:, h:]).sum((0, 1), dtype=acc)
    for k in range(h):
        dk = dpre if masks is None else dpre * masks[k]
        dxe[:, k:k + T].addcmul_(dk, taps[k])
        dtaps[k] = (dk * xe[:, k:k + T]).sum((0, 1), dtype=acc)
    return dxe, torch.stack(dtaps, dim=1).unsqueeze(1).to(weight.dtype)


def silu_backward(pre, dy):
    """dy · SiLU'(pre) = dy · σ(pre)·(1 + pre·(1 − σ(pre))), aten's fused kernel (one pass, not six)."""
    return torch.ops.aten.silu_backward(dy, pre)


def extend_inputs(x, weight, halo=None, segment_ids=None, halo_segment_ids=None):
    """-> xe (B, h + T, F), ids (B, h + T) or None; ValueError naming the shapes. The halo's ids default to x's
    first document (an absent halo is zeros: any id would do)."""
    B, T, Fch = x.shape
    w = weight.shape[-1]
    if weight.dim() != 3 or weight.shape != (Fch, 1, w) or w < 1:
        raise ValueError(f"short_conv: weight must be (F, 1, w) = ({Fch}, 1, w) for x {tuple(x.shape)}, "
                         f"got {tuple(weight.shape)}")
    halo = x.new_zeros(B, w - 1, Fch) if halo is None else halo
    if halo.shape != (B, w - 1, Fch):
        raise ValueError(f"short_conv: halo must be (B, w-1, F) = ({B}, {w - 1}, {Fch}), got {tuple(halo.shape)}")
    xe = torch.cat([halo.to(x.dtype), x], dim=1)
    if segment_ids is None:
        return xe, None
    if segment_ids.shape != (B, T) or segment_ids.is_floating_point():
        raise ValueError(f"short_conv: segment_ids must be an integer (B, T) = ({B}, {T}) tensor, got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)}")
    first = segment_ids[:, :1].expand(B, w - 1) if halo_segment_ids is None else halo_segment_ids
    return xe, torch.cat([first.to(torch.int64), segment_ids.to(torch.int64)], dim=1)


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xe, weight, ids, activation):
        pre = conv_forward(xe, weight, ids)
        ctx.save_for_backward(xe, weight, ids, pre if activation else None)
        return F.silu(pre) if activation else pre

    @staticmethod
    def backward(ctx, dy):
        xe, weight, ids, pre = ctx.saved_tensors
        dpre = dy.contiguous() if pre is None else silu_backward(pre, dy)
        dxe, dweight = conv_backward(xe, weight, ids, dpre)
        return dxe, dweight, None, None


def short_conv(x, weight, *, activation=True, segment_ids=None, halo=None, halo_segment_ids=None):
    """Causal depthwise convolution of x (B, T, F) with weight (F, 1, w), then SiLU if activation -> (B, T, F).
    halo (B, w−1, F): the tokens before x (zeros when None), halo_segment_ids (B, w−1) their documents (None: x's
    first); segment_ids (B, T): taps never read another document. Gradients reach x, weight and halo.
    Raises ValueError naming the shapes."""
    xe, ids = extend_inputs(x, weight, halo, segment_ids, halo_segment_ids)
    return _ShortConv.apply(xe, weight, ids, activation)


def short_conv_naive(x, weight, *, activation=True, segment_ids=None, halo=None, halo_segment_ids=None):
    """The same op as plain autograd through one masked multiply-add per tap (the twin the tests compare)."""
    xe, ids = extend_inputs(x, weight, halo, segment_ids, halo_segment_ids)
    h, T = weight.shape[-1] - 1, x.shape[1]
    taps, masks = weight[:, 0].t().to(xe.dtype), _tap_masks(ids, h, T)
    y = xe[:, h:] * taps[h]
    for k in range(h):
        term = xe[:, k:k + T] * taps[k]
        y = y + (term if masks is None else term * masks[k])
    return F.silu(y) if activation else y
