"""LASP-2: sequence-parallel linear attention with ONE all-gather of states forward and ONE backward.

Shapes: local shards q (B, T_local, H, d_k), k (B, T_local, H_kv, d_k), v (B, T_local, H_kv, d_v) with H a
multiple of H_kv (query head i reads K/V head i // (H/H_kv)); states (B, H_kv, d_k, d_v) in float32 (float64 for
float64 inputs): the messages count the distinct K/V heads only. A rank's tokens are n segments of c tokens
(n = 1 contiguous, 2 zigzag) with global sub-chunk indices g (parallel/layout.py); N = W·n sub-chunks in all.
Causal, λ = exp(log_decay):

  forward   M_g = Σ_t λ^{c−1−t} k_tᵀ v_t                  each segment's state, decayed to its end
            [M_0 … M_{N−1}] = AllGather(M_g)               started async; the intra-chunk term runs meanwhile
            P_g = Σ_{j<g} λ^{c(g−1−j)} M_j                  = the fold P ← λ^c P + M_j over earlier sub-chunks
            o_t = O_intra,t + λ^{t+1} q_t P_g
  backward  dM_g = Σ_t λ^{t+1} q_tᵀ dO_t                   ONE all-gather, overlapped with the intra backward
            G_g = Σ_{j>g} λ^{c(j−1−g)} dM_j                  weighted suffix
            dq_t += λ^{t+1} dO_t P_gᵀ,  dk_t += λ^{c−1−t} v_t G_gᵀ,  dv_t += λ^{c−1−t} k_t G_g
  non-causal (λ = 1): o = Q Σ_j M_j;  dq = dO (Σ_j M_j)ᵀ,  dk = V (Σ_j dM_j)ᵀ,  dv = K Σ_j dM_j.

The gathered payload carries each rank's (T_local, n) as a two-number header, so ranks holding different
lengths raise the same ValueError everywhere instead of computing a wrong answer. Bytes received per rank and
pass: (W−1)·n·B·H·d_k·d_v·4 (+ the header), independent of T.
"""
import torch

from kernels import resolve_backend, state_dtype
from parallel import comm, layout as layouts, mesh

from .common import (add_prefix_output, add_state_grads, check_engine_inputs, constant_decay, from_segments,
                     intra_backward, intra_forward, local_state, state_grad, to_segments)

__all__ = ["lasp2", "lasp2_forward", "lasp2_backward"]


def _gather_states(states, n, layout, group, header=None):
    """Start the all-gather of (B·n, H, d_k, d_v) local states (+ header). Returns a finisher giving (N, B, ...)."""
    W = comm.group_size(group)
    per_rank = states.unflatten(0, (-1, n)).transpose(0, 1).contiguous()      # (n, B, H, d_k, d_v)
    payload = per_rank.flatten() if header is None else torch.cat([per_rank.flatten(), header])
    out, work = comm.all_gather(payload, group, async_op=True)

    def finish():
        work.wait()
        rows = out.view(W, -1)
        if header is not None:
            heads = rows[:, per_rank.numel():]
            if not bool((heads == heads[0]).all()):
                lens = heads[:, 0].long().tolist()
                raise ValueError(f"LASP-2 ranks hold different local lengths {lens} or layouts: every rank of the "
                                 f"sequence-parallel group must hold T/W tokens in layout {layout!r}")
        by_rank = rows[:, :per_rank.numel()].reshape(W * n, *per_rank.shape[1:])
        order = [g for r in range(W) for g in layouts.segment_indices(layout, r, W)]
        return by_rank[torch.argsort(torch.tensor(order))]                    # (N, B, H, d_k, d_v), global order
    return finish


def _fold_weights(log_decay, c, local_idx, N, H, dtype, device, suffix):
    """A[s, j, h] = λ_h^{c·(g_s−1−j)} for j < g_s (prefix) or λ_h^{c·(j−1−g_s)} for j > g_s (suffix)."""
    g = torch.tensor(local_idx, device=device)[:, None]
    j = torch.arange(N, device=device)[None, :]
    gap = (j - 1 - g) if suffix else (g - 1 - j)                              # number of whole sub-chunks skipped
    mask = (j > g) if suffix else (j < g)
    if log_decay is None:
        return mask.to(dtype)[:, :, None].expand(-1, -1, H)
    w = torch.exp(c * gap.clamp(min=0).to(dtype)[:, :, None] * log_decay.to(dtype)[None, None, :])
    return w * mask[:, :, None]


def _fold(gathered, weights, n):
    """Σ_j A[s, j] X_j for each local segment s: (N, B, H, d_k, d_v) -> (B·n, H, d_k, d_v)."""
    return torch.einsum("sjh,jbhkv->bshkv", weights, gathered).flatten(0, 1)


def _local_indices(layout, group):
    return layouts.segment_indices(layout, comm.group_rank(group), comm.group_size(group))


def lasp2_forward(q, k, v, log_decay, causal, layout, group, backend):
    """-> (o (B, T_local, H, d_v), prefix states (B·n, H, d_k, d_v)) for the backward."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs = (to_segments(x, n) for x in (q, k, v))
    c, H, sdt = qs.shape[1], k.shape[2], state_dtype(q.dtype)
    header = torch.tensor([q.shape[1], n], dtype=sdt, device=q.device)
    finish = _gather_states(local_state(ks, vs, log_decay), n, layout, group, header)
    if causal:
        o_intra = intra_forward(qs, ks, vs, log_decay, backend)                # overlaps the gather
    gathered = finish()
    idx = _local_indices(layout, group)
    if causal:
        prefix = _fold(gathered, _fold_weights(log_decay, c, idx, gathered.shape[0], H, sdt, q.device, False), n)
        return from_segments(add_prefix_output(o_intra, qs, prefix, log_decay), n), prefix
    total = gathered.sum(0).repeat_interleave(n, dim=0)                       # Σ_j M_j for every segment row
    return from_segments(add_prefix_output(qs.new_zeros(*qs.shape[:3], vs.shape[-1]), qs, total, None), n), total


def lasp2_backward(q, k, v, log_decay, prefix, do, causal, layout, group, backend):
    """-> (dq, dk, dv) local shards."""
    n = layouts.segments_per_rank(layout)
    qs, ks, vs, dos = (to_segments(x, n) for x in (q, k, v, do))
    c, H, sdt = qs.shape[1], k.shape[2], prefix.dtype
    finish = _gather_states(state_grad(qs, dos, log_decay, H), n, layout, group)
    if causal:
        dq, dk, dv = intra_backward(qs, ks, vs, log_decay, dos, backend)       # overlaps the gather
    else:
        dq, dk, dv = (torch.zeros_like(x) for x in (qs, ks, vs))
    gathered = finish()
    if causal:
        idx = _local_indices(layout, group)
        suffix = _fold(gathered, _fold_weights(log_decay, c, idx, gathered.shape[0], H, sdt, q.device, True), n)
    else:
        suffix = gathered.sum(0).repeat_interleave(n, dim=0)
    grads = add_state_grads(dq, dk, dv, qs, ks, vs, dos, prefix, suffix, log_decay)
    return tuple(from_segments(g, n) for g in grads)


class _LASP2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, causal, layout, group, backend):
        o, prefix = lasp2_forward(q, k, v, log_decay, causal, layout, group, backend)
        ctx.save_for_backward(q, k, v, log_decay, prefix)
        ctx.config = (causal, layout, group, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, prefix = ctx.saved_tensors
        dq, dk, dv = lasp2_backward(q, k, v, log_decay, prefix, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None, None


def lasp2(q, k, v, *, log_decay=None, causal=True, layout="contiguous", group=None, backend=None):
    """LASP-2 linear attention on local shards (B, T_local, H, D) -> o (B, T_local, H, d_v).

    k, v may have fewer heads H_kv (H % H_kv == 0, grouped as i // (H/H_kv)); log_decay: (H_kv,) of log λ ≤ 0, one
    per state (constant, no gradient), None = no decay; causal=False needs no decay.
    group=None: the mesh's sequence-parallel group, else the default group, else a single process.
    Raises ValueError (before any collective) on mismatched shapes/dtypes, bad log_decay, a local length the
    layout cannot split; and on every rank if ranks hold different lengths.
    """
    check_engine_inputs(q, k, v, log_decay, causal, layout)
    group = mesh.sp_group() if group is None else group
    backend = resolve_backend(backend, q.device)
    log_decay = constant_decay(log_decay, q)
    return _LASP2.apply(q, k, v, log_decay, causal, layout, group, backend)
