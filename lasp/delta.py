"""The delta-rule transition kind of the linear engines: a rank's local math, shared by LASP-2, LASP-1 and All-Scan.

Shapes: local shards q, k (B, T_local, H_k, d_k), v (B, T_local, H, d_v), beta, log_gate (B, T_local, H), H a
multiple of H_k (value head h reads key head h // (H/H_k), as in Qwen3-Next); segment_ids (B, T_local). A rank's
tokens are n segments of c tokens (n = 1 contiguous, 2 zigzag) handled as B·n rows. States, transitions and every
message are per value head: S, M, dP, G (B·n, H, d_k, d_v), A (B·n, H, d_k, d_k), float32 (float64 for float64
inputs). Per segment (SPEC.md §3c), from the kernel's chunk pieces (kernels/delta_rule.py):

    S_out = A·S_in + M          A, M: the chunk maps folded from [0 | I]; A = 0 when the segment holds a reset
    dP = Σ_t A_{≤t}ᵀ q_tᵀ dO_t  what its outputs ask of the entering state (reverse fold, leaving gradient 0)
    the local kernel from S_in = P (forward) and from (S_in = P, dS_out = G) (backward): every local gradient.

Documents: resets inside a segment are the kernel's masks. Whether a segment's FIRST token starts a document
depends on the last id of the segment before it in global order (another rank's): a flag f. With f the entering
state is forgotten, so the engines use (1 − f)·P as the entering state, (1 − f)·A in their folds and chains and
(1 − f)·dP as the gradient sent back; the kernel's own pieces never depend on another rank.
"""
import math

import torch

from lasp.kernels.delta_rule import (DeltaInputs, check_delta_inputs, delta_backward, delta_entry_grad,
                                     delta_entry_queries, delta_outputs, delta_pieces, delta_transition,
                                     document_resets)
from lasp.parallel import comm, layout as layouts

from .common import from_segments, to_segments
from .documents import segment_ends

__all__ = ["check_delta_engine_inputs", "delta_segments", "segment_bounds", "first_flags", "local_first_flags", "gather_first_flags",
           "keep", "global_order", "fold_segments", "local_transition", "local_forward",
           "local_entry_grad", "local_backward", "saved_pieces", "delta_memory"]


def check_delta_engine_inputs(q, k, v, beta, log_gate, log_decay, causal, layout, segment_ids):
    """ValueError naming the sizes, before any collective. Returns the segment length c."""
    check_delta_inputs(q, k, v, beta, log_gate, None, segment_ids)
    if log_decay is not None:
        raise ValueError(f"log_decay {tuple(log_decay.shape)} with beta: the delta rule takes its decay as log_gate "
                         f"(B, T_local, H) = {tuple(beta.shape)}")
    if not causal:
        raise ValueError("beta (the delta rule) needs causal=True: the state update is defined in token order")
    return layouts.check_local_len(q.shape[1], layout)


def delta_segments(q, k, v, beta, log_gate, segment_ids, n):
    """The rank's n segments as one batch of B·n kernel rows, the resets inside each segment only."""
    segs = [None if x is None else to_segments(x, n) for x in (q, k, v, beta, log_gate, segment_ids)]
    return DeltaInputs(*segs[:5], document_resets(segs[5]))


def segment_bounds(segment_ids, n):
    """(n, B, 2, 1) int64: the first and last id of each local segment (documents.segment_ends, segment-major)."""
    return segment_ends(to_segments(segment_ids, n)).unflatten(0, (-1, n)).transpose(0, 1)[..., None]


def first_flags(bounds):
    """bounds (N, B, 2, m) in global segment order (m numbers per id) -> f (N, B) bool: segment g's first token
    starts a document (its first id differs from the last id of segment g − 1; never for g = 0)."""
    f = torch.zeros(bounds.shape[:2], dtype=torch.bool, device=bounds.device)
    f[1:] = (bounds[1:, :, 0] != bounds[:-1, :, 1]).any(-1)
    return f


def global_order(per_rank, layout, W):
    """(W·n, ...) gathered in rank order -> global sub-chunk order."""
    order = torch.argsort(torch.tensor([g for r in range(W) for g in layouts.segment_indices(layout, r, W)]))
    return per_rank[order.to(per_rank.device)]


def local_first_flags(bounds, layout, group):
    """bounds (N, B, 2, m) every segment's first and last id in global order -> this rank's flags (B·n,) bool,
    rows in the kernel's segment order (b·n + s)."""
    W, r = comm.group_size(group), comm.group_rank(group)
    return first_flags(bounds)[layouts.segment_indices(layout, r, W)].transpose(0, 1).flatten()


def gather_first_flags(segment_ids, layout, group):
    """LASP-1 with documents (it has no all-gather to ride in): one tiny all-gather of every segment's first and
    last id (int64, 16 bytes per segment and row) -> this rank's flags (B·n,) bool."""
    W, n = comm.group_size(group), layouts.segments_per_rank(layout)
    bounds = global_order(comm.all_gather(segment_bounds(segment_ids, n).contiguous(), group), layout, W)
    return local_first_flags(bounds, layout, group)


def fold_segments(A_all, X_all, local_idx, suffix):
    """Prefix P_g = fold P ← Ã_j P + M_j over j < g, or suffix G_g = fold G ← dP̃_j + Ã_jᵀ G over j > g (from the
    last), for the local segments g -> (B·n, H, d_k, d_v)."""
    N = A_all.shape[0]
    X, found = torch.zeros_like(X_all[0]), {}
    for j in (range(N - 1, -1, -1) if suffix else range(N)):
        found[j] = X
        X = X_all[j] + (A_all[j].transpose(-1, -2) @ X if suffix else A_all[j] @ X)
    return torch.stack([found[g] for g in local_idx], 1).flatten(0, 1)


def keep(flags, x):
    """(1 − f)·x per row: x (B·n, ...) with flags (B·n,) bool, or x itself without flags."""
    return x if flags is None else x * (~flags).to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def local_transition(inp):
    """-> (pieces (with each chunk's entering map), A (B·n, H, d_k, d_k), M (B·n, H, d_k, d_v)) from the kernel's
    chunk pieces."""
    pieces = delta_pieces(inp)
    A, M, entering = delta_transition(pieces, keep_entering=True)
    return (pieces, entering), A, M


def local_forward(inp, pieces, prefix, n):
    """Outputs entering every segment with `prefix` -> (o (B, T_local, H, d_v), block states for the backward)."""
    o, _, states = delta_outputs(pieces[0], prefix, inp.v.dtype, entering=pieces[1])
    return from_segments(o, n), states


def saved_pieces(pieces):
    """What the backward's entry gradient reads of the forward: Q̃ = Q̂ A_{<n} of every block (d_k numbers per token
    and head)."""
    return [q[3] for q in delta_entry_queries(*pieces)]


def local_entry_grad(inp, saved, do, n):
    """dP (B·n, H, d_k, d_v) from the forward's saved Q̃ and the local dO."""
    queries = [(s, m, c, Qt) for (s, m, c), Qt in zip(inp.blocks(), saved)]
    return delta_entry_grad(queries, to_segments(do, n))


def local_backward(inp, block_states, do, suffix, n):
    """The kernel's backward entering from the forward's states and leaving with `suffix` -> (dq, dk, dv, dbeta,
    dlog_gate or None) on the local shards, and the gradient of the entering state (B·n, H, d_k, d_v)."""
    *grads, dstate = delta_backward(inp, block_states, to_segments(do, n), suffix)
    return tuple(None if g is None else from_segments(g, n) for g in grads), dstate


def delta_memory(s, engine):
    """(saved, backward working set, exchange buffer) bytes of one delta-rule call (s: a parallel.engines.CallShape
    with H value heads, H_kv key heads). Saved: q, k (H_kv heads), v, β, g (H heads) in a bytes; in fp32 the state
    entering each 1,024-token block, the forward's A_n and Q̂ for the entry gradient (C/32·d_k² + C·d_k per head)
    and the transitions Ã (LASP-2: all W·n segments'; the chains: their own n). Working set: one 1,024-token block
    of the backward's WY products, about 12 c×c (c = 32) and 16 d-wide fp32 tensors per token and head.
    Buffer: LASP-2 the gathered (A, M) of W·n segments; the chains two states."""
    from lasp.kernels.delta_rule import BLOCK_CHUNKS, CHUNK_LEN
    n, block = layouts.segments_per_rank(s.layout), CHUNK_LEN * BLOCK_CHUNKS
    heads, lasp2 = s.B * s.H, engine == "lasp2"
    saved = s.B * s.C * (2 * s.H_kv * s.d_k + s.H * (s.d_v + 2)) * s.a
    saved += heads * 4 * (math.ceil(s.C / block) * s.d_k * s.d_v + math.ceil(s.C / CHUNK_LEN) * s.d_k ** 2
                          + s.C * s.d_k + (s.sp * n if lasp2 else n) * s.d_k ** 2)
    work = heads * 4 * min(s.C, block) * (12 * CHUNK_LEN + 16 * max(s.d_k, s.d_v))
    buffer = heads * 4 * (s.sp * n * (s.d_k ** 2 + s.d_k * s.d_v) if lasp2 else 2 * s.d_k * s.d_v)
    return saved, work, buffer
