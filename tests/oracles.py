"""Float64 oracles: dense O(T²) definitions on the full sequence, obviously right, slow. Tests only."""
import torch


def linear_attention_dense(q, k, v, log_decay=None, causal=True):
    """o_i = Σ_{j≤i} λ^{i−j} (q_i·k_j) v_j (causal) or Σ_j (q_i·k_j) v_j. (B,T,H,D) in, float64 out."""
    q, k, v = q.double(), k.double(), v.double()
    T, H = q.shape[1], q.shape[2]
    scores = torch.einsum("bihd,bjhd->bhij", q, k)
    i = torch.arange(T)
    gap = (i[:, None] - i[None, :]).double()
    if causal:
        ld = torch.zeros(H, dtype=torch.float64) if log_decay is None else log_decay.double().cpu()
        weight = torch.exp(gap.clamp(min=0)[None] * ld[:, None, None]) * (gap >= 0)
        scores = scores * weight[None]
    return torch.einsum("bhij,bjhd->bihd", scores, v)


def softmax_attention_dense(q, k, v, causal=True, scale=None, segment_ids=None):
    """o_i = Σ_j softmax_j(scale·q_i·k_j over allowed j) v_j, allowed = (j ≤ i if causal) ∧ same document.

    q (B,T,H,D), k (B,T,H_kv,D), v (B,T,H_kv,d_v), H % H_kv == 0 (KV head h // (H/H_kv) serves query head h);
    segment_ids (B,T) or None; scale None = D^-1/2. Float64 out; a row with no allowed key gives 0. Differentiable.
    """
    q, k, v = q.double(), k.double(), v.double()
    T, group = q.shape[1], q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(T, T, dtype=torch.bool)
    allowed = allowed[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    row_max = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # stability shift only
    weights = torch.exp((scores - row_max).masked_fill(~allowed, float("-inf")))     # masked: exactly 0
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.einsum("bhij,bjhd->bihd", probs, v)
