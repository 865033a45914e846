"""All-gather KV softmax attention under sequence parallelism (LASP-2H, Llama-3 style).

Shapes: local shards q (B, C, H, D), k (B, C, H_kv, D), v (B, C, H_kv, d_v), C = T/W tokens per rank in
`layout` (parallel/layout.py); segment_ids (B, C) document ids or None. Gathered K|V (T, B, H_kv, D + d_v),
sequence first because gloo gathers along dim 0, then put in global token order (zigzag: one O(T) permutation).

    forward   [K|V]_all = AllGather(K|V)            ONE gather, H_kv heads (never repeated to H before it)
              (+ AllGather(segment_ids) when given, issued alongside, small)
              each local segment (1 contiguous, 2 zigzag) of global sub-chunk g, c tokens:
                  full call against the keys of sub-chunks 0..g−1,  causal call against sub-chunk g itself,
                  merged by lse; keys after it are skipped, not masked (non-causal: one full call on all T keys)
    backward  the same calls given the final o and lse; their dK, dV add into the gathered buffer (T, ...), then
              [dK|dV] = ReduceScatter(dK_all|dV_all)   ONE reduce-scatter: every rank's queries touch other keys.

Memory O(T·H_kv·(D + d_v)) for the gathered block (kept from the forward, so the backward needs no second
gather) plus the local op's O(C) working set: the kernel tiles scores, no C × T tensor. Gradients are
reduce-scattered in the compute dtype (float32 for 16-bit inputs) to keep the sum exact.
"""
import torch

from . import comm, layout as layouts, mesh
from .engines import EngineSpec, attention_out_lse
from .local_attn import attend_backward, attend_forward, check_attention_inputs, compute_dtype

__all__ = ["allgather_attention", "allgather_attention_forward", "allgather_attention_backward"]


def _gathered_positions(local_len, layout, group, device):
    """Global positions (T,) of the gathered rows, which are in rank order; None when that is already global."""
    if layout == "contiguous":
        return None
    W = comm.group_size(group)
    return torch.cat([layouts.local_positions(W * local_len, layout, r, W, device) for r in range(W)])


def _calls(local_len, layout, causal, group):
    """[(query slice, key slice of the globally ordered keys, causal)] of this rank's queries (local_attn)."""
    W = comm.group_size(group)
    if not causal:
        return [(slice(None), slice(None), False)]
    c = layouts.check_local_len(local_len, layout)
    calls = []
    for s, g in enumerate(layouts.segment_indices(layout, comm.group_rank(group), W)):
        queries = slice(s * c, (s + 1) * c)
        if g > 0:
            calls.append((queries, slice(0, g * c), False))
        calls.append((queries, slice(g * c, (g + 1) * c), True))
    return calls


def allgather_attention_forward(q, k, v, segment_ids, causal, layout, scale, group, backend="flash_cpu"):
    """-> (o (B, C, H, d_v) in q's dtype, lse (B, C, H), K (B, T, H_kv, D), V, ids (B, T)), all in global order.

    K and V are copied out of the gathered K|V once: the kernels' backward reads packed rows ~1.4× faster."""
    kv_local = torch.cat([k, v], dim=-1).transpose(0, 1)                       # (C, B, H_kv, D + d_v)
    kv_all, work = comm.all_gather(kv_local, group, async_op=True)
    seg_all = None
    if segment_ids is not None:                                                # (T, B)
        seg_all = comm.all_gather(segment_ids.transpose(0, 1).contiguous(), group)
    positions = _gathered_positions(q.shape[1], layout, group, q.device)
    work.wait()
    if positions is not None:                                                  # rank order -> global order
        order = torch.argsort(positions)
        kv_all = kv_all.index_select(0, order)
        seg_all = None if seg_all is None else seg_all.index_select(0, order)
    seg_all = None if seg_all is None else seg_all.transpose(0, 1)            # (B, T)
    k_all, v_all = (x.contiguous() for x in kv_all.transpose(0, 1).split([k.shape[-1], v.shape[-1]], dim=-1))
    del kv_all
    out, lse = attend_forward(q, k_all, v_all, segment_ids, seg_all, _calls(q.shape[1], layout, causal, group),
                              scale, backend)
    return out.to(q.dtype), lse, k_all, v_all, seg_all


def allgather_attention_backward(q, k_all, v_all, segment_ids, seg_all, out, lse, do, causal, layout, scale, group,
                                 backend="flash_cpu"):
    """-> (dq, dk, dv) local shards in q's dtype; one reduce-scatter of dK|dV over the gathered length."""
    B, T, H_kv, d_k = k_all.shape
    dkv_all = torch.zeros((T, B, H_kv, d_k + v_all.shape[-1]), dtype=compute_dtype(q.dtype), device=q.device)
    dk_all, dv_all = dkv_all.transpose(0, 1).split([d_k, v_all.shape[-1]], dim=-1)       # views: added into
    dq, _, _ = attend_backward(q, k_all, v_all, out, lse, do, segment_ids, seg_all,
                               _calls(q.shape[1], layout, causal, group), scale, backend, (None, dk_all, dv_all))
    positions = _gathered_positions(q.shape[1], layout, group, q.device)
    if positions is not None:                                                  # global order -> rank order
        dkv_all = dkv_all.index_select(0, positions)
    dkv = comm.reduce_scatter(dkv_all, group).transpose(0, 1)                  # (B, C, H_kv, D + d_v)
    dk, dv = dkv.split([d_k, dkv.shape[-1] - d_k], dim=-1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, layout, scale, group, backend):
        out, lse, k_all, v_all, seg_all = allgather_attention_forward(q, k, v, segment_ids, causal, layout, scale,
                                                                      group, backend)
        ctx.save_for_backward(q, k_all, v_all, segment_ids, seg_all, out, lse)
        ctx.config = (causal, layout, scale, group, backend)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k_all, v_all, segment_ids, seg_all, out, lse = ctx.saved_tensors
        dq, dk, dv = allgather_attention_backward(q, k_all, v_all, segment_ids, seg_all, out, lse, do.contiguous(),
                                                  *ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


def allgather_attention(q, k, v, *, causal=True, layout="contiguous", group=None, scale=None, segment_ids=None,
                        backend=None):
    """Softmax attention of local shards (B, C, H, D), k/v (B, C, H_kv, ·), against the all-gathered K, V.

    -> o (B, C, H, d_v). scale None = D^-1/2; segment_ids (B, C) integer document ids: tokens attend only within
    their document, across rank boundaries. group None = the mesh's sequence-parallel group (else the default).
    backend: the local kernel (kernels.SOFTMAX_BACKENDS; None = the device's tiled one, "torch" = the dense twin).
    Raises ValueError naming the sizes, before any collective, on mismatched shapes/dtypes, H % H_kv ≠ 0, a
    zigzag local length that is odd, segment_ids that are not an integer (B, C) tensor, or a backend the
    device cannot run (naming backend and device).
    """
    default_scale, backend = check_attention_inputs(q, k, v, segment_ids, layout, backend)
    group = mesh.sp_group() if group is None else group
    scale = default_scale if scale is None else float(scale)
    return _AllGatherAttention.apply(q, k, v, segment_ids, causal, layout, scale, group, backend)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes. Saved: q, the gathered K|V, out, lse. Backward: the
    fp32 dK|dV buffer of the gathered length and the kernel's dK|dV of the earlier keys (2·T·kv·4), one more T·kv·4
    for zigzag's reordering. Buffer: the local K|V sent (the gathered K|V is the saved tensor, not counted twice)
    + the rank-order copy that zigzag's reordering keeps alive for a moment."""
    kv = s.B * s.H_kv * (s.d_k + s.d_v)
    reorder = s.T * kv * 4 if s.layout == "zigzag" else 0
    send = s.C * kv * s.a + (s.T * kv * s.a if s.layout == "zigzag" else 0)
    return s.B * s.C * s.H * s.d_k * s.a + s.T * kv * s.a + attention_out_lse(s), 2 * s.T * kv * 4 + reorder, send


ENGINE = EngineSpec("allgather", "softmax", allgather_attention, ("contiguous", "zigzag"),
                    "K|V: one all-gather forward, one reduce-scatter of dK|dV backward", _memory)
