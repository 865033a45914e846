"""Ulysses softmax attention: all-to-all from sequence shards to head shards, full-sequence attention, and back.

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v), C = T/W in `layout`; after the
all-to-all each rank holds every rank's tokens (in rank order, T = W·C) for its H/W query heads and H_kv/W KV
heads: (B, T, H/W, D), rows in rank order; zigzag rows are permuted into global token order (an O(T) copy) so
that the whole sequence is ONE causal call of the tiled local op (kernels/softmax_attn.py), and back after.

    forward   [Q|K|V]_heads = AllToAll([Q|K|V]_seq)     ONE all-to-all for q, k and v together
              o_h, lse_h = attend(Q_h, K_h, V_h; key j ≤ query i, same document)   one causal call
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
from .engines import EngineSpec, attention_out_lse
from .local_attn import attend_backward, attend_forward, check_attention_inputs

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
    """Global positions (T,) of the head-sharded rows (every rank's tokens in rank order); None when that is
    already global order (contiguous)."""
    if layout == "contiguous":
        return None
    W = comm.group_size(group)
    return torch.cat([layouts.local_positions(seq_len, layout, r, W, device) for r in range(W)])


def _reorder(tensors, index):
    """index_select dim 1 of each tensor (None passes through); no-op when index is None."""
    return [x if x is None or index is None else x.index_select(1, index) for x in tensors]


def ulysses_forward(q, k, v, segment_ids, causal, layout, scale, group, backend="flash_cpu"):
    """-> (o (B, C, H, d_v), saved head-sharded tensors in global token order for the backward)."""
    q_h, k_h, v_h = _seq_to_heads([q, k, v], group)
    pos = _row_positions(q_h.shape[1], layout, group, q.device)
    seg = None                                                                     # (B, T): one all-gather
    if segment_ids is not None:
        seg = comm.all_gather(segment_ids.transpose(0, 1).contiguous(), group).transpose(0, 1)
    order = None if pos is None else torch.argsort(pos)
    q_h, k_h, v_h, seg = _reorder([q_h, k_h, v_h, seg], order)                    # global token order
    out_h, lse_h = attend_forward(q_h, k_h, v_h, seg, seg, [(slice(None), slice(None), causal)], scale, backend)
    out_h = out_h.to(q.dtype)
    return _heads_to_seq(_reorder([out_h], pos), group)[0], (q_h, k_h, v_h, seg, out_h, lse_h)


def ulysses_backward(q_h, k_h, v_h, seg, out_h, lse_h, do, causal, layout, scale, group, backend="flash_cpu"):
    """-> (dq, dk, dv) local sequence shards: one all-to-all for do, one for dq|dk|dv."""
    do_h = _seq_to_heads([do], group)[0]
    pos = _row_positions(q_h.shape[1], layout, group, q_h.device)
    do_h, = _reorder([do_h], None if pos is None else torch.argsort(pos))
    grads = attend_backward(q_h, k_h, v_h, out_h, lse_h, do_h, seg, seg, [(slice(None), slice(None), causal)],
                            scale, backend)
    return tuple(_heads_to_seq(_reorder([g.to(q_h.dtype) for g in grads], pos), group))


class _Ulysses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group, backend):
        out, saved = ulysses_forward(q, k, v, segment_ids, causal, layout, scale, group, backend)
        ctx.save_for_backward(*saved)
        ctx.config = (causal, layout, scale, group, backend)
        return out

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = ulysses_backward(*ctx.saved_tensors, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


def ulysses_kv_replication(num_heads, num_kv_heads, world):
    """R = lcm(H_kv, W)/H_kv copies of each KV head so that W divides them; ValueError when W ∤ H."""
    if num_heads % world:
        raise ValueError(f"Ulysses needs the {world} sequence-parallel ranks to divide the query heads "
                         f"({num_heads}) and the (replicated) KV heads ({num_kv_heads})")
    return math.lcm(num_kv_heads, world) // num_kv_heads


def ulysses_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None,
                      backend=None):
    """Ulysses softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·) -> o (B, C, H, d_v).

    Needs W | H; KV heads are replicated R = lcm(H_kv, W)/H_kv times when W ∤ H_kv (see the module docstring).
    layout "contiguous" or "zigzag"; scale None = D^-1/2; segment_ids (B, C) integer document ids.
    group None = the mesh's sequence-parallel group (else the default group). backend: the local kernel
    (kernels.SOFTMAX_BACKENDS; None = the device's tiled one, "torch" = the dense twin). Raises ValueError naming
    the sizes, before any collective, on W ∤ H, mismatched shapes/dtypes, H % H_kv ≠ 0, a zigzag local length
    that is odd, segment_ids that are not an integer (B, C) tensor, or a backend the device cannot run.
    """
    default_scale, backend = check_attention_inputs(q, k, v, segment_ids, layout, backend)
    group = mesh.sp_group() if group is None else group
    copies = ulysses_kv_replication(q.shape[2], k.shape[2], comm.group_size(group))
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=2), v.repeat_interleave(copies, dim=2)
    scale = default_scale if scale is None else float(scale)
    return _Ulysses.apply(q, k, v, segment_ids, causal, layout, scale, group, backend)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes: q, k, v on H/sp heads × T tokens (= H × C; KV heads
    replicated so sp divides them, ValueError unless sp | H); backward: their fp32 gradients; all-to-all buffers."""
    copies = ulysses_kv_replication(s.H, s.H_kv, s.sp)
    heads_saved = s.B * s.C * (s.H * s.d_k + copies * s.H_kv * (s.d_k + s.d_v)) * s.a
    return heads_saved + attention_out_lse(s), 2 * heads_saved * 4 / s.a, 2 * heads_saved


ENGINE = EngineSpec("ulysses", "softmax", ulysses_attention, ("contiguous", "zigzag"),
                    "q, k, v: one all-to-all sequence → heads; o back; the same two for the gradients", _memory,
                    splits_heads=True)
