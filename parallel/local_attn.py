"""Softmax attention of one query block against one key block, masked by global positions and documents.

Shared by the sequence-parallel engines (all-gather KV, ring, Ulysses); plain torch math, runs anywhere.
Shapes: q (B, Tq, H, D), k (B, Tk, H_kv, D), v (B, Tk, H_kv, d_v) with H = G·H_kv (query head h reads KV head
h // G, the `repeat_interleave` convention); q_pos (Tq,), k_pos (Tk,) global token positions; q_seg (B, Tq),
k_seg (B, Tk) document ids or None. out (B, Tq, H, d_v) and lse (B, Tq, H) are in the compute dtype: float32,
or float64 for float64 inputs (the sequence dim comes second everywhere, so layouts slice one dim).

    s_ij  = scale·q_i·k_j if allowed(i, j) else −∞,   allowed(i, j) = (k_pos_j ≤ q_pos_i if causal)
                                                                      ∧ (q_seg_i = k_seg_j)
    lse_i = log Σ_j e^{s_ij},   p_ij = e^{s_ij − lse_i},   out_i = Σ_j p_ij v_j
A row with no allowed key has lse = −∞ and out = 0, never NaN. Results over disjoint key blocks merge as

    lse' = logaddexp(lse, lse_b),   out' = e^{lse−lse'} out + e^{lse_b−lse'} out_b

Backward, given the FINAL out and lse over all keys (so p is the true probability of every block) and
δ_i = do_i·out_i:  dv_j = Σ_i p_ij do_i,  ds_ij = p_ij (do_i·v_j − δ_i),  dq_i = scale Σ_j ds_ij k_j,
dk_j = scale Σ_i ds_ij q_i, with dk, dv summed over the G query heads of each KV head. Blocks' terms add up.
"""
import torch

from . import layout as layouts

__all__ = ["compute_dtype", "check_attention_inputs", "attention_block_forward", "attention_block_backward",
           "merge_partial", "output_delta"]


def compute_dtype(dtype):
    """Scores, lse and accumulators: float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_attention_inputs(q, k, v, segment_ids, layout):
    """ValueError naming the sizes (raised before any collective); returns the default scale D^-1/2."""
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
    return q.shape[3] ** -0.5


def _allowed(q_pos, k_pos, q_seg, k_seg, causal):
    """Boolean mask broadcastable to the scores (B, H_kv, G, Tq, Tk), or None when every pair is allowed."""
    mask = (k_pos[None, :] <= q_pos[:, None])[None] if causal else None        # (1, Tq, Tk)
    if q_seg is not None:
        same_doc = q_seg[:, :, None] == k_seg[:, None, :]                        # (B, Tq, Tk)
        mask = same_doc if mask is None else mask & same_doc
    return None if mask is None else mask[:, None, None]


def _scores(q, k, mask, scale):
    """Masked scores (B, H_kv, G, Tq, Tk) in the compute dtype; q is split into (H_kv, G) head groups."""
    cdt = compute_dtype(q.dtype)
    qg = q.unflatten(2, (k.shape[2], -1)).to(cdt)                                # (B, Tq, H_kv, G, D)
    s = torch.einsum("bqjgd,bkjd->bjgqk", qg, k.to(cdt)) * scale
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def _probs(s, lse):
    """p = e^{s − lse} with lse (B, Tq, H); rows with lse = −∞ give p = 0 instead of e^{−∞+∞} = NaN."""
    lse = lse.transpose(1, 2).unflatten(1, (s.shape[1], s.shape[2]))[..., None]  # (B, H_kv, G, Tq, 1)
    return torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))


def attention_block_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal, scale):
    """-> (out (B, Tq, H, d_v), lse (B, Tq, H)) of q against this key block only, in the compute dtype."""
    s = _scores(q, k, _allowed(q_pos, k_pos, q_seg, k_seg, causal), scale)
    lse = torch.logsumexp(s, dim=-1)                                             # (B, H_kv, G, Tq), −∞ if empty
    lse = lse.flatten(1, 2).transpose(1, 2)                                      # (B, Tq, H)
    out = torch.einsum("bjgqk,bkjd->bqjgd", _probs(s, lse), v.to(s.dtype)).flatten(2, 3)
    return out, lse


def attention_block_backward(q, k, v, do, delta, lse, q_pos, k_pos, q_seg, k_seg, causal, scale):
    """This key block's share of the gradients, given the final lse and δ = output_delta(do, out).

    -> dq (B, Tq, H, D), dk (B, Tk, H_kv, D), dv (B, Tk, H_kv, d_v) in the compute dtype.
    """
    s = _scores(q, k, _allowed(q_pos, k_pos, q_seg, k_seg, causal), scale)
    p = _probs(s, lse)                                                           # (B, H_kv, G, Tq, Tk)
    cdt = s.dtype
    dog = do.unflatten(2, (k.shape[2], -1)).to(cdt)                              # (B, Tq, H_kv, G, d_v)
    dv = torch.einsum("bjgqk,bqjgd->bkjd", p, dog)
    dp = torch.einsum("bqjgd,bkjd->bjgqk", dog, v.to(cdt))
    d = delta.transpose(1, 2).unflatten(1, (k.shape[2], -1))[..., None]         # (B, H_kv, G, Tq, 1)
    ds = p * (dp - d) * scale
    dq = torch.einsum("bjgqk,bkjd->bqjgd", ds, k.to(cdt)).flatten(2, 3)
    dk = torch.einsum("bjgqk,bqjgd->bkjd", ds, q.unflatten(2, (k.shape[2], -1)).to(cdt))
    return dq, dk, dv


def output_delta(do, out):
    """δ_i = do_i·out_i per head: (B, Tq, H) in the compute dtype (the softmax backward's row term)."""
    cdt = compute_dtype(do.dtype)
    return (do.to(cdt) * out.to(cdt)).sum(-1)


def merge_partial(out, lse, out_b, lse_b):
    """Online-softmax merge of two partial results over disjoint key sets -> (out', lse').

    lse' = logaddexp(lse, lse_b); out' = e^{lse−lse'} out + e^{lse_b−lse'} out_b. When both are empty
    (lse = lse_b = −∞) the shift is taken as 0 so the weights are e^{−∞} = 0, not NaN.
    """
    new = torch.logaddexp(lse, lse_b)
    shift = torch.where(torch.isinf(new), 0.0, new)
    merged = torch.exp(lse - shift)[..., None] * out + torch.exp(lse_b - shift)[..., None] * out_b
    return merged, new
