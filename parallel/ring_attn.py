"""Ring softmax attention under sequence parallelism: K/V blocks travel around the ring, partial results merge.

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v) in `layout`; the travelling block
is K|V (B, C, H_kv, D + d_v) (+ segment ids (B, C) when given); lse (B, C, H) in the compute dtype (float32, or
float64 for float64 inputs). At step s = 0..W−1 rank r holds the block of rank src = r − s (mod W).

    forward   post the exchange of the block for step s+1 BEFORE computing step s (the transfer overlaps it)
              o_b, lse_b = attend(Q_slice, block_slice);  lse' = logaddexp(lse, lse_b)
              o' = e^{lse−lse'} o + e^{lse_b−lse'} o_b                       W−1 exchanges in all
    backward  recompute p with the FINAL lse and δ = do·o; dq accumulates at home, while the dK|dV accumulator of
              each block travels with it (one more hop after each step) and comes home after W hops.

Each step is one call of the local op (parallel/local_attn.py) of one of three kinds (non-causal: full):
    contiguous  src = r: causal (the diagonal);  src < r: full;  src > r: skipped (the exchange still runs, so
                every rank joins every exchange and nothing hangs)
    zigzag      src = r: causal over the whole local block (its two halves are in increasing global order);
                src < r: full, all queries vs the first K/V half (sub-chunk src);
                src > r: full, the second query half (sub-chunk 2W−1−r) vs all K/V. Each step has C²/2 pairs.
The local op is tiled (kernels/softmax_attn.py): no C × C score tensor; documents split into runs, no mask.
"""
import torch

from . import comm, mesh
from .engines import EngineSpec, attention_out_lse
from .local_attn import attend_backward, attend_forward, check_attention_inputs, compute_dtype

__all__ = ["ring_attention", "ring_attention_forward", "ring_attention_backward"]

_ALL = slice(None)


def _block_plan(layout, causal, rank, src, local_len):
    """(query slice, key slice, causal) of the block from `src` that holds allowed pairs, or None to skip it."""
    if not causal or src == rank:
        return _ALL, _ALL, causal
    if layout == "contiguous":
        return (_ALL, _ALL, False) if src < rank else None
    half = local_len // 2
    return (_ALL, slice(0, half), False) if src < rank else (slice(half, None), _ALL, False)


def _ring_steps(q, causal, layout, group):
    """Yield (step, plan) per ring step; shared by forward and backward."""
    W, rank = comm.group_size(group), comm.group_rank(group)
    for step in range(W):
        yield step, _block_plan(layout, causal, rank, (rank - step) % W, q.shape[1])


def _block_kv(block, d_k):
    """The held block -> (k_b, v_b, its segment ids or None); k_b, v_b copied out of K|V (the kernels' backward
    reads packed rows ~1.4× faster; C·H_kv·(D + d_v) per step)."""
    k_b, v_b = (x.contiguous() for x in block[0].split([d_k, block[0].shape[-1] - d_k], dim=-1))
    return k_b, v_b, (block[1] if len(block) > 1 else None)


def ring_attention_forward(q, k, v, segment_ids, causal, layout, scale, group, backend="flash_cpu"):
    """-> (o (B, C, H, d_v) in q's dtype, lse (B, C, H) in the compute dtype)."""
    W, d_k = comm.group_size(group), k.shape[-1]
    block = [torch.cat([k, v], dim=-1)] + ([segment_ids] if segment_ids is not None else [])
    out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=compute_dtype(q.dtype))
    lse = torch.full(q.shape[:3], float("-inf"), dtype=out.dtype, device=q.device)
    for step, plan in _ring_steps(q, causal, layout, group):
        works, incoming = comm.ring_shift(block, group) if step < W - 1 else ([], None)  # overlaps this step's compute
        if plan is not None:
            k_b, v_b, seg_b = _block_kv(block, d_k)
            attend_forward(q, k_b, v_b, segment_ids, seg_b, [plan], scale, backend, out, lse)
        comm.wait_all(works)
        block = incoming
    return out.to(q.dtype), lse


def ring_attention_backward(q, k, v, segment_ids, out, lse, do, causal, layout, scale, group, backend="flash_cpu"):
    """-> (dq, dk, dv) local shards in q's dtype. Exchanges: W−1 for K|V (+ ids), W for dK|dV (none on W = 1)."""
    W, d_k = comm.group_size(group), k.shape[-1]
    block = [torch.cat([k, v], dim=-1)] + ([segment_ids] if segment_ids is not None else [])
    dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
    dkv = torch.zeros(block[0].shape, dtype=lse.dtype, device=q.device)       # accumulator of the held block
    for step, plan in _ring_steps(q, causal, layout, group):
        works, incoming = comm.ring_shift(block, group) if step < W - 1 else ([], None)
        if plan is not None:
            k_b, v_b, seg_b = _block_kv(block, d_k)
            dk_b, dv_b = dkv.split([d_k, v.shape[-1]], dim=-1)                  # views: the terms add into dkv
            attend_backward(q, k_b, v_b, out, lse, do, segment_ids, seg_b, [plan], scale, backend, (dq, dk_b, dv_b))
        # the accumulator follows its block to the next rank; after step W−1 it arrives back home
        dkv_works, dkv_in = comm.ring_shift([dkv], group) if W > 1 else ([], [dkv])
        comm.wait_all(works)
        comm.wait_all(dkv_works)
        block, dkv = incoming, dkv_in[0]
    dk, dv = dkv.split([d_k, v.shape[-1]], dim=-1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group, backend):
        out, lse = ring_attention_forward(q, k, v, segment_ids, causal, layout, scale, group, backend)
        ctx.save_for_backward(q, k, v, segment_ids, out, lse)
        ctx.config = (causal, layout, scale, group, backend)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, segment_ids, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_attention_backward(q, k, v, segment_ids, out, lse, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


def ring_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None,
                   backend=None):
    """Ring softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·) -> o (B, C, H, d_v).

    K/V keep their H_kv heads on the wire. scale None = D^-1/2; segment_ids (B, C) integer document ids travel
    with their block. group None = the mesh's sequence-parallel group (else the default group).
    backend: the local kernel (kernels.SOFTMAX_BACKENDS; None = the device's tiled one, "torch" = the dense twin).
    Raises ValueError naming the sizes, before any exchange, on mismatched shapes/dtypes, H % H_kv ≠ 0, a
    zigzag local length that is odd, segment_ids that are not an integer (B, C) tensor, or a backend the
    device cannot run (naming backend and device).
    """
    default_scale, backend = check_attention_inputs(q, k, v, segment_ids, layout, backend)
    group = mesh.sp_group() if group is None else group
    scale = default_scale if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, segment_ids, causal, layout, scale, group, backend)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes. Saved: q, k, v, out, lse. Backward: 2 blocks and 2
    accumulators in flight (4·C·kv·4) and one step's kernel gradients (dq, dk, dv: C·(H·d_k + kv)·4)."""
    kv = s.B * s.H_kv * (s.d_k + s.d_v)
    return (s.B * s.C * s.H * s.d_k * s.a + s.C * kv * s.a + attention_out_lse(s),
            4 * s.C * kv * 4 + s.B * s.C * s.H * s.d_k * 4 + s.C * kv * 4, 4 * s.C * kv * s.a)


ENGINE = EngineSpec("ring", "softmax", ring_attention, ("contiguous", "zigzag"),
                    "K|V blocks around the ring: W−1 hops forward; W−1 K|V and W dK|dV hops backward", _memory)
