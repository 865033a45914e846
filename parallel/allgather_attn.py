"""All-gather KV softmax attention under sequence parallelism (LASP-2H, Llama-3 style).

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v), C = T/W tokens per rank in
`layout` (parallel/layout.py); segment_ids (B, C) document ids or None. Gathered K|V (T, B, H_kv, D + d_v),
sequence first because gloo gathers along dim 0; rows are in rank order, each rank's block at its global
positions pos_k (so any layout works: the mask is built from global positions, not from row indices).

    forward   [K|V]_all = AllGather(K|V)            ONE gather, H_kv heads (never repeated to H before it)
              (+ AllGather(segment_ids) when given, issued alongside, small)
              o, lse = attend(Q_local, K_all, V_all; pos_k ≤ pos_q, same document)
    backward  dQ, dK_all, dV_all = attend'(…, final o and lse);  [dK|dV] = ReduceScatter(dK_all|dV_all)
              ONE reduce-scatter: every rank's queries touch every rank's keys, so their dK, dV sum over ranks.

Memory O(T·H_kv·(D + d_v)) for the gathered block; it is kept from the forward so the backward needs no second
gather. Gradients are reduce-scattered in the compute dtype (float32 for 16-bit inputs) to keep the sum exact.
"""
import torch

from . import comm, layout as layouts, mesh
from .local_attn import attention_block_backward, attention_block_forward, check_attention_inputs, output_delta

__all__ = ["allgather_attention", "allgather_attention_forward", "allgather_attention_backward"]


def _positions(local_len, layout, group, device):
    """(query positions (C,), key positions (T,) of the gathered rows in rank order)."""
    W, rank = comm.group_size(group), comm.group_rank(group)
    T = W * local_len
    keys = torch.cat([layouts.local_positions(T, layout, r, W, device) for r in range(W)])
    return layouts.local_positions(T, layout, rank, W, device), keys


def allgather_attention_forward(q, k, v, segment_ids, causal, layout, scale, group):
    """-> (o (B, C, H, d_v) in q's dtype, lse (B, C, H), gathered K|V (T, B, H_kv, D+d_v), gathered segments)."""
    kv_local = torch.cat([k, v], dim=-1).transpose(0, 1)                       # (C, B, H_kv, D + d_v)
    kv_all, work = comm.all_gather(kv_local, group, async_op=True)
    seg_all = None
    if segment_ids is not None:                                                # (T, B) -> (B, T)
        seg_all = comm.all_gather(segment_ids.transpose(0, 1), group).transpose(0, 1)
    q_pos, k_pos = _positions(q.shape[1], layout, group, q.device)
    work.wait()
    k_all, v_all = kv_all.transpose(0, 1).split([k.shape[-1], v.shape[-1]], dim=-1)
    out, lse = attention_block_forward(q, k_all, v_all, q_pos, k_pos, segment_ids, seg_all, causal, scale)
    return out.to(q.dtype), lse, kv_all, seg_all


def allgather_attention_backward(q, kv_all, segment_ids, seg_all, out, lse, do, d_k, causal, layout, scale, group):
    """-> (dq, dk, dv) local shards in q's dtype; one reduce-scatter of dK|dV over the gathered length."""
    q_pos, k_pos = _positions(q.shape[1], layout, group, q.device)
    k_all, v_all = kv_all.transpose(0, 1).split([d_k, kv_all.shape[-1] - d_k], dim=-1)
    dq, dk_all, dv_all = attention_block_backward(q, k_all, v_all, do, output_delta(do, out), lse,
                                                  q_pos, k_pos, segment_ids, seg_all, causal, scale)
    dkv_all = torch.cat([dk_all, dv_all], dim=-1).transpose(0, 1)              # (T, B, H_kv, D + d_v)
    dkv = comm.reduce_scatter(dkv_all, group).transpose(0, 1)                  # (B, C, H_kv, D + d_v)
    dk, dv = dkv.split([d_k, dkv.shape[-1] - d_k], dim=-1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group):
        out, lse, kv_all, seg_all = allgather_attention_forward(q, k, v, segment_ids, causal, layout, scale, group)
        ctx.save_for_backward(q, kv_all, segment_ids, seg_all, out, lse)
        ctx.config = (k.shape[-1], causal, layout, scale, group)
        return out

    @staticmethod
    def backward(ctx, do):
        q, kv_all, segment_ids, seg_all, out, lse = ctx.saved_tensors
        dq, dk, dv = allgather_attention_backward(q, kv_all, segment_ids, seg_all, out, lse, do.contiguous(),
                                                  *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def allgather_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None):
    """Softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·), against the all-gathered K, V.

    -> o (B, C, H, d_v). scale None = D^-1/2; segment_ids (B, C) integer document ids: tokens attend only within
    their document, across rank boundaries. group None = the mesh's sequence-parallel group (else the default).
    Raises ValueError naming the sizes, before any collective, on mismatched shapes/dtypes, H % H_kv ≠ 0, a
    zigzag local length that is odd, or segment_ids that are not an integer (B, C) tensor.
    """
    default_scale = check_attention_inputs(q, k, v, segment_ids, layout)
    group = mesh.sp_group() if group is None else group
    scale = default_scale if scale is None else float(scale)
    return _AllGatherAttention.apply(q, k, v, segment_ids, causal, layout, scale, group)
