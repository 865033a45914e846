"""What the softmax engines share: input checks, and attending a list of (query slice, key slice) calls.

The local op is kernels/softmax_attn.py (tiled: no Tq × Tk tensor; the dense `torch` twin for tests). Each engine
turns its layout into calls of two shapes only, so that keys a query cannot see are skipped, never masked:
    full     the query slice sees every key of the key slice (keys earlier in the sequence, or non-causal)
    causal   query and key slices are the same tokens, positions increasing: key j ≤ query i
Shapes: q (B, Tq, H, D); k (B, Tk, H_kv, D), v (B, Tk, H_kv, d_v) in GLOBAL token order within each slice;
segment ids (B, Tq) / (B, Tk) or None; out (B, Tq, H, d_v) and lse (B, Tq, H) in the compute dtype (float32, or
float64 for float64 inputs). Partial results over disjoint keys merge by lse (kernels.merge_partial); the
backward of every call gets the FINAL out and lse, so the calls' gradient terms simply add up.
"""
import torch

from lasp.kernels.softmax_attn import (compute_dtype, merge_partial, output_delta, resolve_softmax_backend,
                                  softmax_attn_bwd, softmax_attn_fwd)

from . import layout as layouts

__all__ = ["compute_dtype", "check_attention_inputs", "attend_forward", "attend_backward", "merge_partial",
           "output_delta"]


def check_attention_inputs(q, k, v, segment_ids, layout, backend=None):
    """ValueError naming the sizes or the backend and device (raised before any collective).

    -> (default scale D^-1/2, resolved backend name)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, T_local, heads, D), got shape {tuple(x.shape)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(f"q, k, v must share (B, T_local): got {tuple(q.shape[:2])}, {tuple(k.shape[:2])}, "
                         f"{tuple(v.shape[:2])}")
    if k.shape[2] != v.shape[2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of the KV heads, and k, v must have the same "
                         f"number of heads: got k {k.shape[2]}, v {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device: got {q.dtype}/{k.dtype}/{v.dtype}, "
                         f"{q.device}/{k.device}/{v.device}")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != tuple(q.shape[:2]):
            raise ValueError(f"segment_ids must be (B, T_local) = {tuple(q.shape[:2])}, "
                             f"got {tuple(segment_ids.shape)}")
        if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.device != q.device:
            raise ValueError(f"segment_ids must be an integer tensor on {q.device}, "
                             f"got {segment_ids.dtype} on {segment_ids.device}")
    layouts.check_local_len(q.shape[1], layout)
    backend = resolve_softmax_backend(backend, q.device, q.dtype, max(q.shape[3], v.shape[3]))
    return q.shape[3] ** -0.5, backend


def _slices(x, s):
    return None if x is None else x[:, s]


def attend_forward(q, k, v, q_seg, k_seg, calls, scale, backend, out=None, lse=None):
    """calls [(query slice, key slice, causal)] -> (out, lse) merged over the calls; rows no call reaches: 0, −∞.

    out, lse: partial results over other keys to merge into (in place); empty (0, −∞) when None."""
    cdt = compute_dtype(q.dtype)
    out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=cdt) if out is None else out
    lse = torch.full(q.shape[:3], float("-inf"), dtype=cdt, device=q.device) if lse is None else lse
    for qs, ks, causal in calls:
        out_b, lse_b = softmax_attn_fwd(q[:, qs], k[:, ks], v[:, ks], causal=causal, scale=scale,
                                        q_segment_ids=_slices(q_seg, qs), k_segment_ids=_slices(k_seg, ks),
                                        backend=backend)
        out[:, qs], lse[:, qs] = merge_partial(out[:, qs], lse[:, qs], out_b, lse_b)
    return out, lse


def attend_backward(q, k, v, out, lse, do, q_seg, k_seg, calls, scale, backend, into=(None, None, None)):
    """The same calls' gradients given the final out, lse: -> (dq, dk, dv) in the compute dtype.

    into: accumulators (dq, dk, dv), views allowed, that the terms are added into; zeros for each None."""
    cdt = compute_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=cdt, device=q.device) if acc is None else acc
                  for x, acc in zip((q, k, v), into))
    for qs, ks, causal in calls:
        dq_b, dk_b, dv_b = softmax_attn_bwd(q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, qs], do[:, qs],
                                            causal=causal, scale=scale, q_segment_ids=_slices(q_seg, qs),
                                            k_segment_ids=_slices(k_seg, ks), backend=backend)
        dq[:, qs] += dq_b
        dk[:, ks] += dk_b
        dv[:, ks] += dv_b
    return dq, dk, dv
