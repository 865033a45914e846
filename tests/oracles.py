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


def gated_linear_attention(q, k, v, log_gate=None, log_decay=None, initial_state=None):
    """Gated causal linear attention, dense: (o (B,T,H,d_v), final state (B,H,d_k,d_v)), float64, differentiable.

    a_t = log_gate (B,T,H) + log_decay (H,) (either may be None), G = inclusive cumsum of a over T:
    o_i = Σ_{j≤i} e^{G_i − G_j} (q_i·k_j) v_j + e^{G_i} q_i S0,  S_T = e^{G_{T−1}} S0 + Σ_j e^{G_{T−1} − G_j} k_jᵀ v_j.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, d_k = q.shape
    a = torch.zeros(B, T, H, dtype=torch.float64, device=q.device)
    if log_gate is not None:
        a = a + log_gate.double()
    if log_decay is not None:
        a = a + log_decay.double().to(q.device)
    G = a.cumsum(1).transpose(1, 2)                                            # (B, H, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weight = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()   # (B, H, T, T)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * weight
    o = torch.einsum("bhij,bjhd->bihd", scores, v)
    G_end = G[..., -1] if T else torch.zeros(B, H, dtype=torch.float64, device=q.device)
    to_end = (G_end[..., None] - G).exp()                                      # e^{G_{T−1} − G_j}, (B, H, T)
    final = torch.einsum("bhj,bjhk,bjhd->bhkd", to_end, k, v)
    if initial_state is not None:
        S0 = initial_state.double()
        o = o + torch.einsum("bhi,bihk,bhkd->bihd", G.exp(), q, S0)
        final = final + G_end.exp()[..., None, None] * S0
    return o, final


def softmax_block_dense(q, k, v, allowed, scale):
    """(out, lse) of q (B,Tq,H,D) against k, v (B,Tk,H_kv,·) over allowed (B or 1, Tq, Tk) bool; float64.

    A row with no allowed key gives out 0 and lse −∞ (and zero gradients, not NaN). Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    allowed = allowed[:, None]
    row_max = scores.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)  # stability shift only
    weights = torch.exp((scores - row_max).masked_fill(~allowed, float("-inf")))     # masked: exactly 0
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = torch.where(denom > 0, torch.log(torch.where(denom > 0, denom, torch.ones_like(denom))) + row_max,
                      torch.full_like(denom, float("-inf")))
    return torch.einsum("bhij,bjhd->bihd", probs, v), lse[..., 0].transpose(1, 2)


def documents_alone(q, k, v, segment_ids, log_gate=None, log_decay=None, initial_state=None):
    """Packed documents, each run ALONE from a zero state: o (B,T,H,d_v) float64, differentiable.

    segment_ids (B,T) non-decreasing; every maximal run of equal ids is one document, run through
    `gated_linear_attention` on its own tokens (an initial_state (B,H,d_k,d_v) enters the first document only).
    k, v may have H_kv < H heads (repeated as query head h reads K/V head h // (H/H_kv)); log_gate (B,T,H_kv),
    log_decay (H_kv,) per K/V head likewise."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    if log_gate is not None:
        log_gate = log_gate.repeat_interleave(groups, dim=2)
    if log_decay is not None:
        log_decay = log_decay.repeat_interleave(groups)
    rows = []
    for b in range(q.shape[0]):
        ids = segment_ids[b].tolist()
        starts = [t for t in range(len(ids)) if t == 0 or ids[t] != ids[t - 1]] + [len(ids)]
        parts = []
        for i, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
            state = None if initial_state is None or i > 0 else initial_state[b:b + 1]
            gate = None if log_gate is None else log_gate[b:b + 1, s:e]
            parts.append(gated_linear_attention(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e], gate, log_decay,
                                                state)[0])
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0)

def delta_rule_documents(q, k, v, beta, log_gate=None, initial_state=None, segment_ids=None):
    """The (gated) delta rule, token by token in float64, every document run alone: (o (B,T,H,d_v), final states
    (B,H,d_k,d_v) of each row's last document), differentiable.

    q, k (B,T,H_k,d_k), v (B,T,H,d_v), beta, log_gate (B,T,H); value head h reads key head h // (H/H_k).
    S_t = e^{g_t} (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t, o_t = q_t S_t; each document starts from 0, except
    a row's first, which starts from initial_state (0 if None)."""
    B, T, H_k, d_k = k.shape
    H, d_v = v.shape[2], v.shape[3]
    q, k = (x.double().repeat_interleave(H // H_k, dim=2) for x in (q, k))
    v, beta = v.double(), beta.double()
    ids = torch.zeros(B, T, dtype=torch.long) if segment_ids is None else segment_ids.cpu()
    rows, finals = [], []
    for b in range(B):
        outs, start = [], 0
        while start < T:
            end = start + int((ids[b, start:] == ids[b, start]).long().cumprod(0).sum())
            S = (initial_state[b].double() if (start == 0 and initial_state is not None)
                 else torch.zeros(H, d_k, d_v, dtype=torch.float64))
            for t in range(start, end):
                decay = 1.0 if log_gate is None else log_gate[b, t].double().exp()[:, None, None]
                kt = k[b, t][:, :, None]                                           # (H, d_k, 1)
                S = decay * (S - beta[b, t][:, None, None] * kt @ (kt.transpose(1, 2) @ S))
                S = S + beta[b, t][:, None, None] * kt @ v[b, t][:, None, :]
                outs.append((q[b, t][:, None, :] @ S)[:, 0])
            start = end
        rows.append(torch.stack(outs) if outs else torch.zeros(0, H, d_v, dtype=torch.float64))
        finals.append(S if T else torch.zeros(H, d_k, d_v, dtype=torch.float64))
    return torch.stack(rows), torch.stack(finals)
