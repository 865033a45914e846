"""Ring softmax attention under sequence parallelism: K/V blocks travel around the ring, partial results merge.

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v) in `layout`; the travelling block
is K|V (B, C, H_kv, D + d_v) (+ segment ids (B, C) when given); lse (B, C, H) in the compute dtype (float32, or
float64 for float64 inputs). At step s = 0..W−1 rank r holds the block of rank src = r − s (mod W).

    forward   post the exchange of the block for step s+1 BEFORE computing step s (the transfer overlaps it)
              o_b, lse_b = attend(Q_slice, block_slice);  lse' = logaddexp(lse, lse_b)
              o' = e^{lse−lse'} o + e^{lse_b−lse'} o_b                       W−1 exchanges in all
    backward  recompute p with the FINAL lse and δ = do·o; dq accumulates at home, while the dK|dV accumulator of
              each block travels with it (one more hop after each step) and comes home after W hops.

Which part of a block can be attended (causal; non-causal takes everything):
    contiguous  src = r: causal;  src < r: everything;  src > r: nothing (skipped, but the exchange still runs,
                so every rank joins every exchange and nothing hangs)
    zigzag      src = r: causal over both halves;  src < r: all queries vs the first K/V half (sub-chunk src);
                src > r: the second query half (sub-chunk 2W−1−r) vs all K/V. Each step has C²/2 allowed pairs.
The mask still comes from global positions inside each slice, so the plan only skips work, never decides it.
"""
import torch

from . import comm, layout as layouts, mesh
from .local_attn import (attention_block_backward, attention_block_forward, check_attention_inputs,
                         compute_dtype, merge_partial, output_delta)

__all__ = ["ring_attention", "ring_attention_forward", "ring_attention_backward"]

_ALL = slice(None)


def _block_plan(layout, causal, rank, src, local_len):
    """(query slice, key slice) of the block from `src` that holds allowed pairs, or None to skip it."""
    if not causal or src == rank:
        return _ALL, _ALL
    if layout == "contiguous":
        return (_ALL, _ALL) if src < rank else None
    half = local_len // 2
    return (_ALL, slice(0, half)) if src < rank else (slice(half, None), _ALL)


def _ring_steps(q, causal, layout, group):
    """Yield (step, plan, q_pos, k_pos) per ring step; shared by forward and backward."""
    W, rank = comm.group_size(group), comm.group_rank(group)
    T = W * q.shape[1]
    q_pos = layouts.local_positions(T, layout, rank, W, q.device)
    for step in range(W):
        src = (rank - step) % W
        k_pos = layouts.local_positions(T, layout, src, W, q.device)
        yield step, _block_plan(layout, causal, rank, src, q.shape[1]), q_pos, k_pos


def _block_inputs(block, plan, segment_ids, d_k):
    """Slice the held block by the plan -> (k_b, v_b, query segment ids, key segment ids)."""
    qs, ks = plan
    k_b, v_b = block[0][:, ks].split([d_k, block[0].shape[-1] - d_k], dim=-1)
    seg_q, seg_k = (None, None) if segment_ids is None else (segment_ids[:, qs], block[1][:, ks])
    return k_b, v_b, seg_q, seg_k


def ring_attention_forward(q, k, v, segment_ids, causal, layout, scale, group):
    """-> (o (B, C, H, d_v) in q's dtype, lse (B, C, H) in the compute dtype)."""
    W, d_k = comm.group_size(group), k.shape[-1]
    block = [torch.cat([k, v], dim=-1)] + ([segment_ids] if segment_ids is not None else [])
    out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=compute_dtype(q.dtype))
    lse = torch.full(q.shape[:3], float("-inf"), dtype=out.dtype, device=q.device)
    for step, plan, q_pos, k_pos in _ring_steps(q, causal, layout, group):
        works, incoming = comm.ring_shift(block, group) if step < W - 1 else ([], None)  # overlaps this step's compute
        if plan is not None:
            qs, ks = plan
            k_b, v_b, seg_q, seg_k = _block_inputs(block, plan, segment_ids, d_k)
            out_b, lse_b = attention_block_forward(q[:, qs], k_b, v_b, q_pos[qs], k_pos[ks], seg_q, seg_k,
                                                   causal, scale)
            out[:, qs], lse[:, qs] = merge_partial(out[:, qs], lse[:, qs], out_b, lse_b)
        comm.wait_all(works)
        block = incoming
    return out.to(q.dtype), lse


def ring_attention_backward(q, k, v, segment_ids, out, lse, do, causal, layout, scale, group):
    """-> (dq, dk, dv) local shards in q's dtype. Exchanges: W−1 for K|V (+ ids), W for dK|dV (none on W = 1)."""
    W, d_k = comm.group_size(group), k.shape[-1]
    block = [torch.cat([k, v], dim=-1)] + ([segment_ids] if segment_ids is not None else [])
    delta = output_delta(do, out)                                              # (B, C, H), from the final o
    dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
    dkv = torch.zeros(block[0].shape, dtype=lse.dtype, device=q.device)       # accumulator of the held block
    for step, plan, q_pos, k_pos in _ring_steps(q, causal, layout, group):
        works, incoming = comm.ring_shift(block, group) if step < W - 1 else ([], None)
        if plan is not None:
            qs, ks = plan
            k_b, v_b, seg_q, seg_k = _block_inputs(block, plan, segment_ids, d_k)
            dq_b, dk_b, dv_b = attention_block_backward(q[:, qs], k_b, v_b, do[:, qs], delta[:, qs], lse[:, qs],
                                                        q_pos[qs], k_pos[ks], seg_q, seg_k, causal, scale)
            dq[:, qs] += dq_b
            dkv[:, ks] += torch.cat([dk_b, dv_b], dim=-1)
        # the accumulator follows its block to the next rank; after step W−1 it arrives back home
        dkv_works, dkv_in = comm.ring_shift([dkv], group) if W > 1 else ([], [dkv])
        comm.wait_all(works)
        comm.wait_all(dkv_works)
        block, dkv = incoming, dkv_in[0]
    dk, dv = dkv.split([d_k, v.shape[-1]], dim=-1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group):
        out, lse = ring_attention_forward(q, k, v, segment_ids, causal, layout, scale, group)
        ctx.save_for_backward(q, k, v, segment_ids, out, lse)
        ctx.config = (causal, layout, scale, group)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, segment_ids, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(q, k, v, segment_ids, out, lse, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None):
    """Ring softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·) -> o (B, C, H, d_v).

    K/V keep their H_kv heads on the wire. scale None = D^-1/2; segment_ids (B, C) integer document ids travel
    with their block. group None = the mesh's sequence-parallel group (else the default group).
    Raises ValueError naming the sizes, before any exchange, on mismatched shapes/dtypes, H % H_kv ≠ 0, a
    zigzag local length that is odd, or segment_ids that are not an integer (B, C) tensor.
    """
    default_scale = check_attention_inputs(q, k, v, segment_ids, layout)
    group = mesh.sp_group() if group is None else group
    scale = default_scale if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, segment_ids, causal, layout, scale, group)
