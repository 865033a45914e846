"""Top-k routed SwiGLU experts (Switch / GShard routing, dropless) for the BAM mixture models.

Shape legend: S = B·T tokens held by this process, D model width, F expert hidden width, E experts in all, E_l
experts held here (E without expert parallelism), k experts per token. Per token t, with logits l_t = x_t W_rᵀ:

    p_t = softmax(l_t) (E,)                      in at least float32
    chosen = top-k of p_t;  w = p of the chosen experts, renormalised to sum 1 when k > 1 (GShard, DeepSpeed);
             top-1 keeps the raw p (Switch: the LM loss then trains the router) unless normalize_top1
    y_t = Σ_{e ∈ chosen} w_e SwiGLU_e(x_t)       every route is computed: no capacity, no dropped tokens
    balance = E · Σ_i f_i P_i                    f_i = routes to i / all routes, counted over EVERY rank of the
                                                 step (count_reduce); P_i = mean over this rank's tokens of p_ti
    z = mean_t (logsumexp l_t)²                  router z-loss (ST-MoE)

Tokens reach the experts through the attribute `expert_dispatch(x, expert_ids, run_experts, n_experts)`
(S, D), (S, k) -> (S, k, D): the default below sorts the S·k routes by expert and runs each expert on its rows,
O(S·k·D) memory, never a dense (S × E × capacity) tensor; parallel.experts replaces it by an all-to-all over an
expert group. `count_reduce(counts)` sums the (E,) route counts over ranks; the default keeps them local. Nothing
here knows about ranks.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["local_expert_dispatch", "keep_local_counts", "MoEFeedForward"]


def local_expert_dispatch(x, expert_ids, run_experts, n_experts):
    """All experts on this process: x (S, D), expert_ids (S, k) -> (S, k, D), each chosen expert's output.

    run_experts(rows, counts) runs the experts on rows grouped by expert (counts: rows per expert, E ints).
    """
    S, k = expert_ids.shape
    order = expert_ids.flatten().argsort(stable=True)                  # routes grouped by expert
    counts = torch.bincount(expert_ids.flatten(), minlength=n_experts).tolist()
    y = run_experts(x[order // k], counts)                             # (S·k, D) in expert order
    return y[order.argsort()].view(S, k, -1)                           # back to (token, route) order


def keep_local_counts(counts):
    """The default `count_reduce`: the route counts of this process only."""
    return counts


class MoEFeedForward(nn.Module):
    """E SwiGLU experts stacked on a leading axis and a top-k router. (B, T, D) -> (B, T, D).

    E = 1 is a dense SwiGLU (no router, no router losses); the expert axis stays, so dense seeds and MoEs share
    parameter names: gate_proj, up_proj (E_l, F, D), down_proj (E_l, D, F), router (E, D). After each forward,
    `aux` holds {"balance", "z"} (None without a router) and `route_counts` the (E,) counts over all ranks.
    """
    expert_dispatch = staticmethod(local_expert_dispatch)
    count_reduce = staticmethod(keep_local_counts)

    def __init__(self, dim, hidden_dim, n_experts=1, top_k=1, *, normalize_top1=False, init_std=0.02,
                 residual_std=0.02):
        super().__init__()
        self.n_experts, self.top_k, self.normalize_top1 = n_experts, top_k, normalize_top1
        self.init_std, self.residual_std = init_std, residual_std
        self.gate_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None
        self.aux, self.route_counts = None, None

    def init_weights(self):
        """Experts only: Normal(0, init_std), down_proj Normal(0, residual_std); the router is a Linear."""
        for w in (self.gate_proj, self.up_proj):
            nn.init.normal_(w, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.residual_std)

    def run_experts(self, x, counts):
        """x (n, D) rows grouped by the experts held here, in order; counts: rows per expert -> (n, D)."""
        out = [F.linear(F.silu(F.linear(rows, self.gate_proj[e])) * F.linear(rows, self.up_proj[e]),
                        self.down_proj[e]) for e, rows in enumerate(x.split(counts))]
        return torch.cat(out) if out else x[:0]

    def route(self, x):
        """x (S, D) -> (logits (S, E), probs (S, E), weights (S, k), expert ids (S, k)); weights in probs' dtype."""
        cdt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):           # routing decisions in full precision
            logits = F.linear(x.to(cdt), self.router.weight.to(cdt))
        probs = logits.softmax(-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.top_k > 1 or self.normalize_top1:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, probs, weights, ids

    def router_losses(self, logits, probs, ids):
        """{"balance": E·Σ f_i P_i, "z": mean (logsumexp)²}; f from the route counts summed by `count_reduce`."""
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts)
        self.route_counts = self.count_reduce(counts)
        f = self.route_counts.to(probs.dtype) / self.route_counts.sum().clamp_min(1)
        return {"balance": self.n_experts * (f * probs.mean(0)).sum(),
                "z": torch.logsumexp(logits, -1).pow(2).mean()}

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        if self.router is None:
            return self.run_experts(x, [x.shape[0]]).view(shape)
        logits, probs, weights, ids = self.route(x)
        routed = self.expert_dispatch(x, ids, self.run_experts, self.n_experts)     # (S, k, D)
        y = (routed.to(weights.dtype) * weights.unsqueeze(-1)).sum(1).to(x.dtype)   # routes summed in >= fp32
        self.aux = self.router_losses(logits, probs, ids)
        return y.view(shape)
