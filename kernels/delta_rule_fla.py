"""The CUDA path of `gated_delta_attn`: fla-core's Triton `chunk_gated_delta_rule` (a dependency made for exactly
this op; `pip install fla-core --no-deps`, so that it does not replace torch), with our conventions mapped onto its.

Ours: q, k (B, T, H_k, d_k), v (B, T, H, d_v), beta, log_gate (B, T, H), no scale inside, documents as segment_ids
(B, T) with the initial state continuing each row's first document. fla's: the same head layout (its GVA: v heads
a multiple of q/k heads), g in log space, `scale` (we pass 1.0), and documents as cu_seqlens over one row of B·T
tokens with one initial/final state per document. So with documents the batch is flattened, every row start and
document start begins a sequence, row b's initial state goes to the sequence of its first token and its final
state is that of its last document. Only the op goes through fla: the engines' pieces (A_r, M_r, dP) are the
torch chunk code's (kernels/delta_rule.py), which fla does not expose.
"""
import torch

__all__ = ["fla_gated_delta_attn", "documents_to_cu_seqlens"]


def documents_to_cu_seqlens(segment_ids):
    """(B, T) ids -> (cu_seqlens (N+1,) int64 over the flattened B·T tokens, first (B,) and last (B,) sequence index
    of every row)."""
    B, T = segment_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    flat = starts.flatten().nonzero()[:, 0]
    cu = torch.cat([flat, flat.new_tensor([B * T])])
    per_row = starts.sum(1).cumsum(0)
    return cu, per_row - starts.sum(1), per_row - 1


def _chunk_gated_delta_rule():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise ValueError("gated_delta_attn backend 'triton' needs fla-core: pip install fla-core --no-deps "
                         f"(then triton must already be installed beside torch); import failed: {e}") from e
    return chunk_gated_delta_rule


def fla_gated_delta_attn(q, k, v, beta, log_gate, initial_state, segment_ids):
    """-> (o (B, T, H, d_v), final state (B, H, d_k, d_v) float32) through fla's chunk_gated_delta_rule."""
    fla_op = _chunk_gated_delta_rule()
    B, T, H = beta.shape
    g = torch.zeros_like(beta) if log_gate is None else log_gate
    if segment_ids is None:
        return fla_op(q, k, v, g, beta, scale=1.0, initial_state=initial_state, output_final_state=True)
    cu, first, last = documents_to_cu_seqlens(segment_ids)
    h0 = None
    if initial_state is not None:
        h0 = initial_state.new_zeros(len(cu) - 1, *initial_state.shape[1:]).index_copy(0, first, initial_state)
    flat = (x.flatten(0, 1)[None] for x in (q, k, v, g, beta))
    o, ht = fla_op(*flat, scale=1.0, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    return o.view(B, T, *o.shape[2:]), ht[last]
