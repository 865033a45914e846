"""Ulysses softmax attention: all-to-all from sequence shards to head shards, full-sequence attention, and back.

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v), C = T/W in `layout`; after the
all-to-all each rank holds every rank's tokens (in rank order, T = W·C) for its H/W query heads and H_kv/W KV
heads: (B, T, H/W, D). Rows stay in rank order: the causal mask comes from their global positions, so zigzag
needs no reordering.

    forward   [Q|K|V]_heads = AllToAll([Q|K|V]_seq)     ONE all-to-all for q, k and v together
              o_h, lse_h = attend(Q_h, K_h, V_h; pos_k ≤ pos_q, same document)
              o = AllToAll(o_h)                          back to sequence shards
    backward  do_h = AllToAll(do);  dQ_h, dK_h, dV_h = attend'(…, o_h, lse_h);  [dQ|dK|dV] = AllToAll(…)
Segment ids (when given) are all-gathered once (every rank needs all T of them). Bytes per rank shrink as 1/W.

Heads: W must divide H. When W does not divide H_kv the KV heads are replicated R = lcm(H_kv, W)/H_kv times
(`repeat_interleave`, so query head h still reads a copy of KV head h // (H/H_kv)); autograd sums the copies'
gradients. This always works when W | H, since lcm(H_kv, W) divides H. It costs R× the KV bytes.

Why not DeepSpeed's DistributedAttention: it calls deepspeed.comm directly (our comm accounting would not see
it), sends q, k, v in three all-to-alls, and has no lse, global-position mask or segment ids; this is ~40 lines.
"""
import math

import torch

from . import comm, layout as layouts, mesh
from .local_attn import attention_block_backward, attention_block_forward, check_attention_inputs, output_delta

__all__ = ["ulysses_attention", "ulysses_forward", "ulysses_backward", "ulysses_kv_replication"]


def _seq_to_heads(tensors, group):
    """[(B, C, h_i, D_i)] -> one all-to-all -> [(B, W·C, h_i/W, D_i)]: head block j goes to rank j."""
    W = comm.group_size(group)
    B, C = tensors[0].shape[:2]
    parts = [x.reshape(B, C, W, -1).permute(2, 1, 0, 3) for x in tensors]        # (W, C, B, h_i/W·D_i)
    received = comm.all_to_all(torch.cat(parts, dim=-1).flatten(0, 1), group)     # (W·C, B, Σ) rank order
    chunks = received.transpose(0, 1).split([p.shape[-1] for p in parts], dim=-1)
    return [c.unflatten(-1, (x.shape[2] // W, x.shape[3])) for c, x in zip(chunks, tensors)]


def _heads_to_seq(tensors, group):
    """Inverse of _seq_to_heads: [(B, W·C, h_i/W, D_i)] -> one all-to-all -> [(B, C, h_i, D_i)]."""
    W = comm.group_size(group)
    B, C = tensors[0].shape[0], tensors[0].shape[1] // W
    parts = [x.reshape(B, W, C, -1).permute(1, 2, 0, 3) for x in tensors]        # (W, C, B, h_i/W·D_i)
    received = comm.all_to_all(torch.cat(parts, dim=-1).flatten(0, 1), group)     # block i: rank i's heads
    received = received.unflatten(0, (W, C)).permute(2, 1, 0, 3)                  # (B, C, W, Σ)
    chunks = received.split([p.shape[-1] for p in parts], dim=-1)
    return [c.reshape(B, C, W * x.shape[2], x.shape[3]) for c, x in zip(chunks, tensors)]


def _row_positions(seq_len, layout, group, device):
    """Global positions (T,) of the head-sharded rows, which hold every rank's tokens in rank order."""
    W = comm.group_size(group)
    return torch.cat([layouts.local_positions(seq_len, layout, r, W, device) for r in range(W)])


def ulysses_forward(q, k, v, segment_ids, causal, layout, scale, group):
    """-> (o (B, C, H, d_v), saved head-sharded tensors for the backward)."""
    q_h, k_h, v_h = _seq_to_heads([q, k, v], group)
    pos = _row_positions(q_h.shape[1], layout, group, q.device)
    seg = None                                                                     # (B, T): one all-gather
    if segment_ids is not None:
        seg = comm.all_gather(segment_ids.transpose(0, 1), group).transpose(0, 1)
    out_h, lse_h = attention_block_forward(q_h, k_h, v_h, pos, pos, seg, seg, causal, scale)
    out_h = out_h.to(q.dtype)
    return _heads_to_seq([out_h], group)[0], (q_h, k_h, v_h, seg, out_h, lse_h)


def ulysses_backward(q_h, k_h, v_h, seg, out_h, lse_h, do, causal, layout, scale, group):
    """-> (dq, dk, dv) local sequence shards: one all-to-all for do, one for dq|dk|dv."""
    do_h = _seq_to_heads([do], group)[0]
    pos = _row_positions(q_h.shape[1], layout, group, q_h.device)
    grads = attention_block_backward(q_h, k_h, v_h, do_h, output_delta(do_h, out_h), lse_h, pos, pos, seg, seg,
                                     causal, scale)
    return tuple(_heads_to_seq([g.to(q_h.dtype) for g in grads], group))


class _Ulysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group):
        out, saved = ulysses_forward(q, k, v, segment_ids, causal, layout, scale, group)
        ctx.save_for_backward(*saved)
        ctx.config = (causal, layout, scale, group)
        return out

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = ulysses_backward(*ctx.saved_tensors, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def ulysses_kv_replication(num_heads, num_kv_heads, world):
    """R = lcm(H_kv, W)/H_kv copies of each KV head so that W divides them; ValueError when W ∤ H."""
    if num_heads % world:
        raise ValueError(f"Ulysses needs the {world} sequence-parallel ranks to divide the query heads "
                         f"({num_heads}) and the (replicated) KV heads ({num_kv_heads})")
    return math.lcm(num_kv_heads, world) // num_kv_heads


def ulysses_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None):
    """Ulysses softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·) -> o (B, C, H, d_v).

    Needs W | H; KV heads are replicated R = lcm(H_kv, W)/H_kv times when W ∤ H_kv (see the module docstring).
    layout "contiguous" or "zigzag"; scale None = D^-1/2; segment_ids (B, C) integer document ids.
    group None = the mesh's sequence-parallel group (else the default group). Raises ValueError naming the
    sizes, before any collective, on W ∤ H, mismatched shapes/dtypes, H % H_kv ≠ 0, a zigzag local length that
    is odd, or segment_ids that are not an integer (B, C) tensor.
    """
    default_scale = check_attention_inputs(q, k, v, segment_ids, layout)
    group = mesh.sp_group() if group is None else group
    copies = ulysses_kv_replication(q.shape[2], k.shape[2], comm.group_size(group))
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    scale = default_scale if scale is None else float(scale)
    return _Ulysses.apply(q, k, v, segment_ids, causal, layout, scale, group)
