"""Ring linear attention with the LEFT product: the baseline LASP-2 is measured against (no state trick).

K/V blocks travel around the ring exactly as in ring softmax attention, and every block is attended with the
quadratic left product, so cost per rank is O(T·C) instead of LASP's O(C²/chunk + C):

Shapes: local shards q, k (B, C, H, d_k), v (B, C, H, d_v), C = T/W tokens per rank, contiguous layout; the
travelling block is K|V (B, C, H, d_k + d_v); scores A (B, H, C, C) in the compute dtype (float32, or float64
for float64 inputs). At step s = 0..W−1 rank r holds the block of rank src = r − s (mod W). With global
positions p_i (queries, rank r) and p_j (keys, rank src) and λ = exp(log_decay) per head:

    D_ij = λ^{p_i − p_j} if p_j ≤ p_i else 0          (non-causal: D = 1; the mask uses GLOBAL positions)
    forward   A = (Q Kᵀ_src) ⊙ D,   O += A V_src                          W−1 K|V exchanges
    backward  dA = (dO Vᵀ_src) ⊙ D,  dQ += dA K_src,  dK_src += dAᵀ Q,  dV_src += Aᵀ dO
              the dK|dV accumulator of each block travels with it and comes home after W hops,
              so W−1 K|V exchanges and W accumulator exchanges (none on W = 1).

Causal blocks from later ranks (src > r) are all masked: they are skipped, but every rank still joins every
exchange so nothing hangs. Each exchange is posted before the current block is computed, so transfer overlaps
compute. Bytes received per rank and pass: (W−1)·B·C·H·(d_k+d_v)·itemsize, growing with T (LASP-2's do not).
"""
import torch

from lasp.kernels import state_dtype
from lasp.parallel import comm, layout as layouts, mesh
from lasp.parallel.engines import EngineSpec, linear_saved

from .common import check_engine_inputs, constant_decay

__all__ = ["ring_linear_attention", "ring_linear_forward", "ring_linear_backward"]


def _decay_mask(q_pos, k_pos, log_decay, causal, dtype):
    """D (H or 1, C_q, C_k) from global positions: λ^{p_i − p_j} where p_j ≤ p_i (everything if not causal)."""
    gap = (q_pos[:, None] - k_pos[None, :]).to(dtype)
    if not causal:
        return torch.ones_like(gap)[None]
    allowed = (gap >= 0).to(dtype)[None]
    if log_decay is None:
        return allowed
    return torch.exp(gap.clamp(min=0)[None] * log_decay.to(dtype)[:, None, None]) * allowed  # underflow -> 0


def _ring_blocks(q, causal, group):
    """Yield (step, (query positions, key positions) or None to skip the block); shared by both passes."""
    W, rank = comm.group_size(group), comm.group_rank(group)
    C = q.shape[1]
    q_pos = layouts.local_positions(W * C, "contiguous", rank, W, q.device)
    for step in range(W):
        src = (rank - step) % W
        k_pos = layouts.local_positions(W * C, "contiguous", src, W, q.device)
        yield step, (None if causal and src > rank else (q_pos, k_pos))


def ring_linear_forward(q, k, v, log_decay, causal, group):
    """-> o (B, C, H, d_v) in q's dtype. A left-product block per ring step."""
    W, d_k, cdt = comm.group_size(group), k.shape[-1], state_dtype(q.dtype)
    block, qc = torch.cat([k, v], dim=-1), q.to(cdt)
    out = torch.zeros((*q.shape[:3], v.shape[-1]), dtype=cdt, device=q.device)
    for step, pos in _ring_blocks(q, causal, group):
        works, incoming = comm.ring_shift([block], group) if step < W - 1 else ([], [None])  # overlaps this block
        if pos is not None:
            k_b, v_b = block.to(cdt).split([d_k, v.shape[-1]], dim=-1)
            scores = torch.einsum("bihk,bjhk->bhij", qc, k_b) * _decay_mask(*pos, log_decay, causal, cdt)
            out += torch.einsum("bhij,bjhv->bihv", scores, v_b)
        comm.wait_all(works)
        block = incoming[0]
    return out.to(q.dtype)


def ring_linear_backward(q, k, v, do, log_decay, causal, group):
    """-> (dq, dk, dv) local shards in q's dtype; the scores are recomputed, nothing but q, k, v is saved."""
    W, d_k, cdt = comm.group_size(group), k.shape[-1], state_dtype(q.dtype)
    block, qc, doc = torch.cat([k, v], dim=-1), q.to(cdt), do.to(cdt)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dkv = torch.zeros(block.shape, dtype=cdt, device=q.device)     # accumulator of the block held now
    for step, pos in _ring_blocks(q, causal, group):
        works, incoming = comm.ring_shift([block], group) if step < W - 1 else ([], [None])
        if pos is not None:
            k_b, v_b = block.to(cdt).split([d_k, v.shape[-1]], dim=-1)
            mask = _decay_mask(*pos, log_decay, causal, cdt)
            scores = torch.einsum("bihk,bjhk->bhij", qc, k_b) * mask
            dscores = torch.einsum("bihv,bjhv->bhij", doc, v_b) * mask
            dq += torch.einsum("bhij,bjhk->bihk", dscores, k_b)
            dkv += torch.cat([torch.einsum("bhij,bihk->bjhk", dscores, qc),
                              torch.einsum("bhij,bihv->bjhv", scores, doc)], dim=-1)
        # the accumulator follows its block to the next rank; after step W−1 it arrives back home
        dkv_works, dkv_in = comm.ring_shift([dkv], group) if W > 1 else ([], [dkv])
        comm.wait_all(works)
        comm.wait_all(dkv_works)
        block, dkv = incoming[0], dkv_in[0]
    dk, dv = dkv.split([d_k, v.shape[-1]], dim=-1)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _RingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, causal, group):
        ctx.save_for_backward(q, k, v, log_decay)
        ctx.config = (causal, group)
        return ring_linear_forward(q, k, v, log_decay, causal, group)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay = ctx.saved_tensors
        dq, dk, dv = ring_linear_backward(q, k, v, do.contiguous(), log_decay, *ctx.config)
        return dq, dk, dv, None, None, None


def ring_linear_attention(q, k, v, *, log_decay=None, causal=True, group=None, segment_ids=None, beta=None):
    """Left-product ring linear attention on contiguous local shards (B, C, H, D) -> o (B, C, H, d_v).

    The paper's ring baseline; same semantics and errors as `lasp.lasp2` (contiguous layout only).
    log_decay (H,) of log λ_h ≤ 0 (constant), None = no decay. group None = the mesh's sequence-parallel group.
    segment_ids: refused (ValueError) — a benchmark baseline; packed documents need lasp2, lasp1 or allscan.
    beta (the delta rule) is refused: ValueError (its left product has no transition to carry).
    """
    if segment_ids is not None:
        raise ValueError(f"ring_linear_attention does not take segment_ids {tuple(segment_ids.shape)} (packed "
                         f"documents): use lasp2, lasp1 or allscan")
    if beta is not None:
        raise ValueError(f"ring_linear_attention does not run the delta rule (beta {tuple(beta.shape)}): use "
                         f"lasp2, lasp1 or allscan")
    check_engine_inputs(q, k, v, log_decay, causal, "contiguous")
    group = mesh.sp_group() if group is None else group
    log_decay = constant_decay(log_decay, q)
    return _RingLinear.apply(q, k, v, log_decay, causal, group)


# ---------------------------------------------------------------------------------------------- declaration
def _memory(s):
    """(saved, backward working set, exchange buffer) bytes: q, k, v; scores, their gradient and the decay mask
    (3·B·H·C²·4); K|V blocks and accumulators in flight."""
    return linear_saved(s), 3 * s.B * s.H * s.C * s.C * 4, 4 * s.B * s.C * s.H * (s.d_k + s.d_v) * 4


ENGINE = EngineSpec("ring_linear", "linear", ring_linear_attention, ("contiguous",),
                    "K|V blocks around the ring: W−1 hops forward; W−1 K|V and W dK|dV hops backward", _memory,
                    baseline=True)
