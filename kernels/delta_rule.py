"""TEMPORARY stand-in (branch qwen3next only): the delta-rule kernel comes from branch `delta`; replaced at merge."""
import torch


def gated_delta_attn(q, k, v, beta, *, log_gate=None, initial_state=None, output_final_state=False,
                     segment_ids=None, backend=None):
    B, T, H, dk = q.shape
    dv = v.shape[-1]
    sdt = torch.promote_types(q.dtype, torch.float32)
    S = torch.zeros(B, H, dk, dv, dtype=sdt) if initial_state is None else initial_state.to(sdt)
    out = []
    for t in range(T):
        if segment_ids is not None and t > 0:
            keep = (segment_ids[:, t] == segment_ids[:, t - 1]).to(sdt)[:, None, None, None]
            S = S * keep
        if log_gate is not None:
            S = S * log_gate[:, t].to(sdt).exp()[..., None, None]
        kt, vt, bt = k[:, t].to(sdt), v[:, t].to(sdt), beta[:, t].to(sdt)
        kv = torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, (vt - kv) * bt[..., None])
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(sdt), S))
    return torch.stack(out, 1).to(q.dtype), (S if output_final_state else None)
