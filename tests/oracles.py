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
