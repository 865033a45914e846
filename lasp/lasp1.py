"""LASP-1: the ring baseline. States travel rank to rank, one hop at a time (contiguous layout only).

Shapes: local shards q, k (B, C, H, d_k), v (B, C, H, d_v); states (B, H, d_k, d_v) in float32 (float64 for
float64 inputs). With M_r = Σ_t λ^{C−1−t} k_tᵀ v_t and dM_r = Σ_t λ^{t+1} q_tᵀ dO_t (lasp/common.py):

  forward   rank r receives P_r from r−1 (P_0 = 0), sends P_{r+1} = λ^C P_r + M_r to r+1,
            o_t = O_intra,t + λ^{t+1} q_t P_r
  backward  rank r receives G_r from r+1 (G_{W−1} = 0), sends G_{r−1} = λ^C G_r + dM_r to r−1, then the same
            cross terms as LASP-2. Non-causal (λ = 1): a prefix ring and a suffix ring each way, total = P+M+G.

W−1 sequential hops per ring, each one state: the same bytes per rank as LASP-2 but serialised latency, which
is what LASP-2's single all-gather removes.
"""
import torch

from kernels import resolve_backend
from parallel import comm, mesh

from .common import (add_prefix_output, add_state_grads, check_engine_inputs, constant_decay, intra_backward,
                     intra_forward, local_state, state_grad)

__all__ = ["lasp1", "lasp1_forward", "lasp1_backward"]


def _ring_scan(states, log_decay, C, group, reverse):
    """Exclusive scan X_r = Σ over earlier ranks s (later ones if reverse) of λ^{C·(|r−s|−1)} M_s, by P2P hops."""
    W, r = comm.group_size(group), comm.group_rank(group)
    src, dst = (r + 1, r - 1) if reverse else (r - 1, r + 1)
    carried = torch.zeros_like(states)
    if 0 <= src < W:                                   # everyone but the first rank of the ring waits
        comm.recv(carried, src, group)
    if 0 <= dst < W:                                   # everyone but the last rank passes its fold on
        decay = 1.0 if log_decay is None else torch.exp(C * log_decay.to(states.dtype)).view(1, -1, 1, 1)
        comm.send(decay * carried + states, dst, group)
    return carried


def lasp1_forward(q, k, v, log_decay, causal, group, backend):
    """-> (o, prefix) where prefix is P_r (causal) or the total Σ_s M_s (non-causal)."""
    C = q.shape[1]
    states = local_state(k, v, log_decay)
    prefix = _ring_scan(states, log_decay, C, group, reverse=False)
    if causal:
        o_intra = intra_forward(q, k, v, log_decay, backend)
        return add_prefix_output(o_intra, q, prefix, log_decay), prefix
    total = prefix + states + _ring_scan(states, None, C, group, reverse=True)
    return add_prefix_output(q.new_zeros(*q.shape[:3], v.shape[-1]), q, total, None), total


def lasp1_backward(q, k, v, log_decay, prefix, do, causal, group, backend):
    C = q.shape[1]
    dstates = state_grad(q, do, log_decay, k.shape[2])
    suffix = _ring_scan(dstates, log_decay, C, group, reverse=True)
    if causal:
        dq, dk, dv = intra_backward(q, k, v, log_decay, do, backend)
    else:
        suffix = suffix + dstates + _ring_scan(dstates, None, C, group, reverse=False)
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
    return add_state_grads(dq, dk, dv, q, k, v, do, prefix, suffix, log_decay)


class _LASP1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, causal, group, backend):
        o, prefix = lasp1_forward(q, k, v, log_decay, causal, group, backend)
        ctx.save_for_backward(q, k, v, log_decay, prefix)
        ctx.config = (causal, group, backend)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, prefix = ctx.saved_tensors
        dq, dk, dv = lasp1_backward(q, k, v, log_decay, prefix, do.contiguous(), *ctx.config)
        return dq, dk, dv, None, None, None, None


def lasp1(q, k, v, *, log_decay=None, causal=True, group=None, backend=None):
    """LASP-1 ring linear attention on contiguous local shards (B, C, H, D) -> o (B, C, H, d_v).

    Same arguments (grouped K/V heads included) and errors as `lasp.lasp2` (no layout: contiguous only).
    """
    check_engine_inputs(q, k, v, log_decay, causal, "contiguous")
    group = mesh.sp_group() if group is None else group
    backend = resolve_backend(backend, q.device)
    log_decay = constant_decay(log_decay, q)
    return _LASP1.apply(q, k, v, log_decay, causal, group, backend)
