"""BAM (Branch-Attend-Mix): parallel-attention blocks whose attention and FFN are mixtures of upcycled experts.

Differences from Linear-Llama3 (same mixers, per-layer L/N pattern, RMSNorm, SwiGLU, untied embeddings):
  block      u = RMSNorm(x);  y = x + A(u) + F(u)         (parallel_block=False: Llama's sequential block)
  attention  soft Mixture-of-Attention over N experts: g = softmax(u W_rᵀ) (B, T, N), A = Σ_j g_j Attn_j(u). It is
             ONE wide attention of N·H heads whose head groups are scaled by g_j before a concatenated output
             projection, so the sequence-parallel engines (`linear_attn` / `softmax_attn`, set from outside) run
             it unchanged. KV experts: each expert has its own q, k, v, o. kv_sharing: own q, o; one k, v.
  FFN        E top-k routed SwiGLU experts with Switch balancing and router z-losses (models/moe.py).
N = E = 1 is the dense seed: no routers, and the same parameter names with an expert axis of length 1, so
`upcycle` builds the MoE by concatenating N seeds' tensors along that axis and averaging everything else.

Shapes: tokens (B, T) local shard; positions (T,)/(B, T) global; hidden (B, T, D); heads (B, T, N·H, d) with head
j·H + h for expert j, except the queries of a KV-sharing softmax layer, ordered h·N + j so that GQA maps query
head (h, j) onto the shared kv head of h. A linear KV-sharing layer runs its N·H query heads as groups of N on the
H shared k, v heads (grouped heads in the LASP engines), so its states and messages are the seed's size.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (FEATURE_MAPS, LINEAR_DECAYS, RMSNorm, _cached_softmax_attention, apply_rotary,
                     chunked_cross_entropy, init_linear_weights, lightning_log_decay, local_linear_attention,
                     local_softmax_attention, normalize_positions, retention_log_decay, rotary_cos_sin,
                     run_linear_attention)
from .moe import MoEFeedForward

__all__ = ["BAMConfig", "PRESETS", "ATTENTION_MODES", "LinearMixtureOfAttention", "SoftmaxMixtureOfAttention",
           "BAMBlock", "BAM", "expert_axis", "upcycle"]


@dataclass
class BAMConfig:
    vocab_size: int = 32000
    dim: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 8             # softmax (N) layers; linear layers use n_heads for k and v
    ffn_dim: int = 4096
    pattern: str = "L"              # repeated over the layers: L = linear, N = normal softmax attention
    linear_decay: str = "none"      # "none" | "lightning" | "retention"
    feature_map: str = "silu"       # "identity" | "elu+1" | "silu"
    rope_base: float = 500000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    loss_chunk_tokens: int = 1024
    parallel_block: bool = True     # y = x + A(u) + F(u); False: x += A(norm x); x += F(norm' x) (not upcyclable)
    n_attn_experts: int = 1         # N: soft Mixture-of-Attention experts (1 = dense attention)
    kv_sharing: bool = False        # attention experts share one k and v
    n_ffn_experts: int = 1          # E: routed FFN experts (1 = dense SwiGLU)
    top_k: int = 1                  # FFN experts per token
    normalize_top1: bool = False    # top-1 weight 1 (softmax over the top-k) instead of Switch's raw p
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"L", "N"} or self.n_layers % len(self.pattern):
            raise ValueError(f"pattern must be 'L'/'N' letters tiling n_layers={self.n_layers}, got {self.pattern!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim} into an even head dim and be a "
                             f"multiple of n_kv_heads={self.n_kv_heads}")
        if self.linear_decay not in LINEAR_DECAYS or self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear_decay must be one of {LINEAR_DECAYS} and feature_map one of "
                             f"{tuple(FEATURE_MAPS)}, got {self.linear_decay!r}, {self.feature_map!r}")
        if self.n_attn_experts < 1 or self.n_ffn_experts < 1:
            raise ValueError(f"n_attn_experts and n_ffn_experts must be >= 1, got {self.n_attn_experts}, "
                             f"{self.n_ffn_experts}")
        if not 1 <= self.top_k <= self.n_ffn_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_ffn_experts={self.n_ffn_experts}")

    def layer_types(self):
        """One letter per layer, e.g. 'LLLNLLLN'."""
        return (self.pattern * (self.n_layers // len(self.pattern)))[:self.n_layers]


# Dense parallel-block seeds (N = E = 1) for the upcycling recipe; `upcycle` turns N of them into an MoE.
PRESETS = {
    "bam-seed-tiny": BAMConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192,
                               pattern="L", linear_decay="lightning", loss_chunk_tokens=512),
    "bam-seed-tiny-hybrid": BAMConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192,
                                      pattern="LLLN", linear_decay="lightning", loss_chunk_tokens=512),
    # an MoE that trains from scratch straight from the launcher: 2 attention experts, 4 top-2 FFN experts
    "bam-moe-tiny": BAMConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=192,
                              pattern="LLLN", linear_decay="lightning", loss_chunk_tokens=512, n_attn_experts=2,
                              n_ffn_experts=4, top_k=2),
}


def _soft_gates(router, u, o):
    """Scale expert j's slice of o (B, T, N, ...) by g_j = softmax(u W_rᵀ)_j; no router (N = 1): o unchanged."""
    if router is None:
        return o
    cdt = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        g = F.linear(u.to(cdt), router.weight.to(cdt)).softmax(-1).to(o.dtype)     # (B, T, N)
    return o * g.view(*g.shape, *[1] * (o.dim() - 3))


class LinearMixtureOfAttention(nn.Module):
    """N Linear-Llama3 linear-attention experts as one attention of N·H heads (see common.LinearAttention):

        q_j, k_j = φ(u W_q,j)/√d, φ(u W_k,j);  v_j = u W_v,j;  o = linear_attn(q, k, v) over all N·H heads
        A = Σ_j g_j (RMSNorm_head,j(o_j) ⊙ silu(u W_g,j)) W_o,j

    Weights: q_proj, g_proj (N·D, D); k_proj, v_proj (N_kv·D, D) with N_kv = 1 under kv_sharing; norm_weight
    (N, d); out_proj (D, N·D); router (N, D) when N > 1. (B, T, D) -> (B, T, D).
    """
    linear_attn = staticmethod(local_linear_attention)

    def __init__(self, dim, n_heads, n_experts=1, kv_sharing=False, *, feature_map="silu", decay="none",
                 layer_idx=0, n_layers=1, eps=1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.n_experts = n_heads, dim // n_heads, n_experts
        self.n_kv = 1 if kv_sharing else n_experts
        self.feature_map, self.decay, self.layer_idx, self.n_layers = feature_map, decay, layer_idx, n_layers
        self.q_proj, self.g_proj = (nn.Linear(dim, n_experts * dim, bias=False) for _ in range(2))
        self.k_proj, self.v_proj = (nn.Linear(dim, self.n_kv * dim, bias=False) for _ in range(2))
        self.norm = RMSNorm(self.head_dim, eps, weight=False)
        self.norm_weight = nn.Parameter(torch.empty(n_experts, self.head_dim))
        self.out_proj = nn.Linear(n_experts * dim, dim, bias=False)
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None

    def init_weights(self):
        nn.init.ones_(self.norm_weight)

    def log_decay(self, device=None):
        """(N·H,) log λ: every expert uses the seed's per-head decay of this layer; None without decay."""
        if self.decay == "lightning":
            base = lightning_log_decay(self.n_heads, self.layer_idx, self.n_layers, device)
        elif self.decay == "retention":
            base = retention_log_decay(self.n_heads, device)
        else:
            return None
        return base.repeat(self.n_experts)

    def forward(self, u, positions=None, segment_ids=None, cache=None):
        B, T, _ = u.shape
        N, H, phi = self.n_experts, self.n_heads, FEATURE_MAPS[self.feature_map]
        q = phi(self.q_proj(u).view(B, T, N * H, -1)) * self.head_dim ** -0.5
        k = phi(self.k_proj(u).view(B, T, self.n_kv * H, -1))
        v = self.v_proj(u).view(B, T, self.n_kv * H, -1)
        log_decay = self.log_decay(u.device)
        if self.n_kv < N:       # shared k, v: grouped heads, query head (j, h) reordered to h·N + j reads K/V head h
            q = q.unflatten(2, (N, H)).transpose(2, 3).flatten(2, 3)
            log_decay = None if log_decay is None else log_decay[:H]       # the decay of each shared state
        o = run_linear_attention(self.linear_attn, q, k, v, log_decay, cache)
        if self.n_kv < N:
            o = o.unflatten(2, (H, N)).transpose(2, 3).flatten(2, 3)     # back to expert-major (j, h)
        o = self.norm(o).view(B, T, N, H, -1) * self.norm_weight[:, None, :]
        o = o.flatten(3) * F.silu(self.g_proj(u)).view(B, T, N, -1)         # (B, T, N, D)
        return self.out_proj(_soft_gates(self.router, u, o).flatten(2))


class SoftmaxMixtureOfAttention(nn.Module):
    """N GQA softmax-attention experts with RoPE as one attention of N·H query heads (see common.SoftmaxAttention).

    Weights: q_proj (N·H·d, D); k_proj, v_proj (N_kv·H_kv·d, D), N_kv = 1 under kv_sharing; out_proj
    (D, N·H·d); router (N, D) when N > 1. KV experts keep heads expert-major (query j·H + h reads kv head
    j·H_kv + h·H_kv/H); shared kv orders the queries h·N + j so that GQA's groups of N·H/H_kv queries read kv
    head h·H_kv/H. (B, T, D), positions (B, T) global -> (B, T, D).
    """
    softmax_attn = staticmethod(local_softmax_attention)

    def __init__(self, dim, n_heads, n_kv_heads, n_experts=1, kv_sharing=False, rope_base=500000.0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_experts, self.n_kv, self.rope_base = n_experts, 1 if kv_sharing else n_experts, rope_base
        d = self.head_dim
        self.q_proj = nn.Linear(dim, n_experts * n_heads * d, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(dim, self.n_kv * n_kv_heads * d, bias=False) for _ in range(2))
        self.out_proj = nn.Linear(n_experts * n_heads * d, dim, bias=False)
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None

    def forward(self, u, positions, segment_ids=None, cache=None):
        B, T, _ = u.shape
        N, H, shared = self.n_experts, self.n_heads, self.n_kv < self.n_experts
        q = self.q_proj(u).view(B, T, N * H, -1)
        k = self.k_proj(u).view(B, T, self.n_kv * self.n_kv_heads, -1)
        v = self.v_proj(u).view(B, T, self.n_kv * self.n_kv_heads, -1)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if shared:
            q = q.view(B, T, N, H, -1).transpose(2, 3).flatten(2, 3)          # (h, j) head-major
        if cache is None:
            o = self.softmax_attn(q, k, v, causal=True, scale=None, segment_ids=segment_ids)
        else:
            o = _cached_softmax_attention(q, k, v, positions, cache)
        o = o.view(B, T, H, N, -1).transpose(2, 3) if shared else o.view(B, T, N, H, -1)
        return self.out_proj(_soft_gates(self.router, u, o.flatten(3)).flatten(2))


class BAMBlock(nn.Module):
    """u = RMSNorm(x); x + MoA(u) + MoE(u) (parallel) or Llama's sequential block. (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg, layer_idx, kind):
        super().__init__()
        N, kv = cfg.n_attn_experts, cfg.kv_sharing
        self.kind = kind
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if kind == "L":
            self.attn = LinearMixtureOfAttention(cfg.dim, cfg.n_heads, N, kv, feature_map=cfg.feature_map,
                                                 decay=cfg.linear_decay, layer_idx=layer_idx,
                                                 n_layers=cfg.n_layers, eps=cfg.norm_eps)
        else:
            self.attn = SoftmaxMixtureOfAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, N, kv, cfg.rope_base)
        self.ffn_norm = None if cfg.parallel_block else RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_ffn_experts, cfg.top_k,
                                  normalize_top1=cfg.normalize_top1, init_std=cfg.init_std,
                                  residual_std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def forward(self, x, positions, segment_ids=None, cache=None):
        u = self.norm(x)
        if self.ffn_norm is None:
            return x + self.attn(u, positions, segment_ids, cache) + self.ffn(u)
        x = x + self.attn(u, positions, segment_ids, cache)
        return x + self.ffn(self.ffn_norm(x))


class BAM(nn.Module):
    """Embedding -> BAM blocks -> final RMSNorm; `logits` / `loss` apply the untied output head."""
    family = "bam"

    def __init__(self, cfg: BAMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(BAMBlock(cfg, i, kind) for i, kind in enumerate(cfg.layer_types()))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std); projections into the residual stream init_std/√(2·n_layers); norms 1."""
        cfg = self.config
        init_linear_weights(self, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.norm.init_weights()

    def forward(self, tokens, positions, segment_ids=None, cache=None):
        """tokens (B, T), positions (T,)/(B, T) global, segment_ids (B, T) or None -> hidden (B, T, D)."""
        positions = normalize_positions(positions, *tokens.shape)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, segment_ids, None if cache is None else cache[i])
        return self.norm(x)

    def new_cache(self):
        return [{} for _ in self.layers]

    def logits(self, hidden):
        return self.lm_head(hidden)

    def aux_loss(self):
        """Σ over MoE layers of balance_loss_weight·balance + z_loss_weight·z from the last forward (this rank's
        tokens, counts from all ranks); a zero tensor without FFN experts."""
        cfg, total = self.config, self.lm_head.weight.new_zeros(())
        for layer in self.layers:
            aux = layer.ffn.aux
            if aux is not None:
                total = total + cfg.balance_loss_weight * aux["balance"] + cfg.z_loss_weight * aux["z"]
        return total

    def loss(self, hidden, labels, loss_mask=None, with_aux=True):
        """-> (loss_sum, token_count) over local tokens: cross-entropy sum + aux_loss()·count, so that a caller
        dividing the sums over ranks by the counts over ranks adds the label-weighted mean of the ranks' router
        losses (exactly the global one when every rank holds as many labelled tokens). with_aux=False: CE only."""
        ce, count = chunked_cross_entropy(hidden, self.lm_head.weight, labels, loss_mask, self.config.loss_chunk_tokens)
        return (ce + self.aux_loss().to(ce.dtype) * count, count) if with_aux else (ce, count)


# ---------------------------------------------------------------------------------------------- upcycling
ATTENTION_MODES = ("experts", "kv-sharing", "average")     # BAM KV experts, BAM KV sharing, BTX (averaged)


def expert_axis(name, cfg):
    """The axis along which `name` of a cfg-shaped model stacks its experts, or None (averaged / router)."""
    leaf = name.rsplit(".", 2)
    if ".ffn." in name:
        return 0 if leaf[-1] in ("gate_proj", "up_proj", "down_proj") else None
    if ".attn." not in name or cfg.n_attn_experts == 1 or ".router." in name:
        return None
    proj = leaf[-2] if leaf[-1] == "weight" else leaf[-1]
    if proj in ("k_proj", "v_proj"):
        return None if cfg.kv_sharing else 0
    return 1 if proj == "out_proj" else 0                         # q_proj, g_proj, norm_weight stack on rows


def _check_seed(cfg):
    if not isinstance(cfg, BAMConfig):
        raise ValueError(f"the seed is a {type(cfg).__name__} model with sequential blocks; BAM upcycles dense "
                         f"BAM seeds with parallel-attention blocks (BAMConfig, parallel_block=True)")
    if not cfg.parallel_block:
        raise ValueError("the seed has sequential blocks (parallel_block=False); BAM mixes attention and FFN "
                         "experts of parallel-attention blocks: train the seeds with parallel_block=True")
    if cfg.n_attn_experts != 1 or cfg.n_ffn_experts != 1:
        raise ValueError(f"the seed must be dense (n_attn_experts = n_ffn_experts = 1), got "
                         f"{cfg.n_attn_experts} and {cfg.n_ffn_experts}")


def _check_states(cfg, expert_states):
    """ValueError naming the expert and keys whose names or shapes differ from a dense `cfg` model's."""
    from . import build_model
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    for i, state in enumerate(expert_states):
        found = {k: tuple(v.shape) for k, v in state.items()}
        bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        if bad:
            raise ValueError(f"expert {i}: weights do not fit the seed config; expected shapes "
                             f"{ {k: expected.get(k) for k in bad[:4]} }, found { {k: found.get(k) for k in bad[:4]} }")


@torch.no_grad()
def upcycle(seed_config, expert_states, *, attention="experts", top_k=1, router_seed=0, **moe_fields):
    """N dense expert state dicts of `seed_config` -> a BAM MoE model (cpu, the experts' dtype).

    FFN_i -> FFN expert i; attention: "experts" (attention_i -> expert i), "kv-sharing" (own q, o; k, v
    averaged) or "average" (BTX: one attention, averaged); every other weight averaged; routers drawn from
    `init_weights` under torch.manual_seed(router_seed); moe_fields: other BAMConfig fields of the MoE (e.g.
    normalize_top1, balance_loss_weight). ValueError for a seed that is not a dense parallel-block BAMConfig,
    fewer than 2 experts, mismatched weights, an unknown mode, or top_k > N.
    """
    from . import build_model
    _check_seed(seed_config)
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    n = len(expert_states)
    if n < 2:
        raise ValueError(f"upcycling needs at least 2 expert checkpoints, got {n}")
    cfg = dataclasses.replace(seed_config, n_attn_experts=1 if attention == "average" else n,
                              kv_sharing=attention == "kv-sharing", n_ffn_experts=n, top_k=top_k, **moe_fields)
    _check_states(seed_config, expert_states)
    torch.manual_seed(router_seed)
    model = build_model(cfg).to(expert_states[0]["embed.weight"].dtype)
    state = model.state_dict()
    for name in state:
        if ".router." in name:
            continue
        parts = [s[name] for s in expert_states]
        axis = expert_axis(name, cfg)
        state[name] = (torch.cat(parts, axis) if axis is not None
                       else torch.stack([p.double() for p in parts]).mean(0).to(parts[0].dtype))
    model.load_state_dict(state)
    return model
