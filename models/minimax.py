"""MiniMax-01 (MiniMax-Text-01, arXiv 2501.08313), built as transformers' MiniMaxForCausalLM (5.25) builds it.

Differences from Llama:
- layer i is lightning (L) or softmax (N) attention by `pattern[i % len(pattern)]`; the release is "LLLLLLLN".
- every FFN is a top-k MoE of SwiGLU experts: p = softmax(x W_rᵀ) in float32, w = top-k of p renormalised to
  sum 1 (models/moe.py with normalize_top1), y = Σ w_e SwiGLU_e(x); no shared expert.
- residuals are taken AFTER the norm and scaled (DeepNorm-like; the release: α = (2·80)^(1/4) ≈ 3.557, β = 1):
      u = RMSNorm(x);  x = α_mix·u + β_mix·mixer(u);   u = RMSNorm(x);  x = α_mlp·u + β_mlp·MoE(u)
  with α_mix, β_mix the linear or the softmax pair by the layer's kind.
- lightning layers (MiniMaxLightningAttention): q, k, v = silu(x W_q), silu(x W_k), silu(x W_v) (SiLU on all three,
  no 1/√d); o = lightning(q, k, v) with a constant decay per head and layer,
      log λ_{h,l} = −(2^(−8/H))^(h+1) · (1 − l/(L − 1 + 1e−5) + 1e−5)       (H not a power of two: no interleave)
  out = (sigmoid(x W_g) ⊙ RMSNorm_{H·d}(o)) W_o, the norm over all heads together with eps 1e−6 (hard-wired there).
  Its width H·d need not be D (the release: 64 heads × 128 = 8192, D = 6144).
- softmax layers: GQA with their own head_dim and RoPE on the first `rotary_dim` dims of each head (0: all, as
  transformers; the release's remote code rotates 64 of 128), no q/k norm.
- untied embeddings and output head, final RMSNorm.

Weights map one to one onto transformers' except the fused qkv_proj (split per head here, so tensor parallelism
slices whole heads) and the experts' gate_up_proj (gate_proj | up_proj here): models/hf_minimax.py.

Shapes: tokens (B, T) local shard; positions (T,) or (B, T) GLOBAL positions; segment_ids (B, T) document ids:
softmax layers keep attention inside a document, lightning layers reset their state at a document start; hidden (B, T, D); per-head tensors (B, T, H, d).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (RMSNorm, _cached_softmax_attention, apply_rotary, chunked_cross_entropy, init_linear_weights,
                     local_linear_attention, local_softmax_attention, rotary_cos_sin, run_linear_attention)
from .linear_llama import LinearLlama
from .moe import MoEFeedForward

__all__ = ["MiniMaxConfig", "PRESETS", "LIGHTNING_NORM_EPS", "minimax_log_decay",
           "LightningAttention", "MiniMaxSoftmaxAttention", "MiniMaxBlock", "MiniMax"]

LIGHTNING_NORM_EPS = 1e-6       # transformers builds the lightning output norm with MiniMaxRMSNorm's default eps


@dataclass
class MiniMaxConfig:
    vocab_size: int = 200064        # tokens (set by the tokenizer: data.vocab_size in the launcher)
    dim: int = 6144                 # model width D (transformers: hidden_size)
    n_layers: int = 80              # blocks
    n_heads: int = 64               # query heads of both kinds of layer
    n_kv_heads: int = 8             # softmax (N) layers' key/value heads; lightning layers use n_heads
    head_dim: int = 128             # d of both kinds (not D / n_heads in general)
    rotary_dim: int = 64            # RoPE on the first rotary_dim dims of a softmax head; 0 = all (transformers)
    rope_base: float = 10000000.0   # rotary base θ
    ffn_dim: int = 9216             # each expert's SwiGLU width (transformers: intermediate_size)
    n_ffn_experts: int = 32         # routed experts per MoE layer (transformers: num_local_experts)
    top_k: int = 2                  # experts per token (transformers: num_experts_per_tok)
    pattern: str = "LLLLLLLN"       # repeated over the layers: L = lightning, N = softmax (transformers: layer_types)
    linear_alpha: float = 3.5565588200778455    # residual = α·RMSNorm(x) + β·mixer after a lightning layer
    linear_beta: float = 1.0
    softmax_alpha: float = 3.5565588200778455   # ... after a softmax layer
    softmax_beta: float = 1.0
    mlp_alpha: float = 3.5565588200778455       # ... after the MoE
    mlp_beta: float = 1.0
    norm_eps: float = 1e-5          # the block and final RMSNorm epsilon (the lightning norm: LIGHTNING_NORM_EPS)
    init_std: float = 0.02          # Normal(0, init_std) for every weight, as transformers initialises
    loss_chunk_tokens: int = 1024   # tokens per chunk of the chunked cross-entropy
    balance_loss_weight: float = 0.001  # Switch balancing loss weight (transformers: router_aux_loss_coef)
    z_loss_weight: float = 0.0      # router z-loss weight (transformers has none)

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"L", "N"}:
            raise ValueError(f"pattern must be a non-empty string of 'L' (lightning) and 'N' (softmax) letters, "
                             f"got {self.pattern!r}")
        if self.n_layers % len(self.pattern):
            raise ValueError(f"pattern {self.pattern!r} (length {len(self.pattern)}) must tile n_layers="
                             f"{self.n_layers}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2 or not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} and rotary_dim={self.rotary_dim} must be even, "
                             f"0 <= rotary_dim <= head_dim")
        if not 1 <= self.top_k <= self.n_ffn_experts or self.n_ffn_experts < 2:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_ffn_experts={self.n_ffn_experts} (>= 2)")

    def layer_types(self):
        """One letter per layer, e.g. 'LLLLLLLN'."""
        return (self.pattern * (self.n_layers // len(self.pattern)))[:self.n_layers]


# MiniMax-Text-01: 456B parameters (45.9B active per token), the release's config.json (80 layers, 7:1, 32 experts
# top-2, DeepNorm α = (2·80)^(1/4)). minimax-tiny trains in minutes on a CPU: α = (2·8)^(1/4) = 2, full rotary
# (so a run here converts to transformers), 4 experts top-2.
PRESETS = {
    "minimax-text-01": MiniMaxConfig(),
    "minimax-tiny": MiniMaxConfig(vocab_size=256, dim=64, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=16,
                                  rotary_dim=0, rope_base=10000.0, ffn_dim=96, n_ffn_experts=4, top_k=2,
                                  linear_alpha=2.0, softmax_alpha=2.0, mlp_alpha=2.0, loss_chunk_tokens=512),
}


def minimax_log_decay(n_heads, layer_idx, n_layers, device=None, dtype=torch.float64):
    """MiniMax's lightning decay: log λ_{h,l} = −(2^(−8/H))^(h+1)·(1 − l/(L − 1 + 1e−5) + 1e−5). (H,) in `dtype`
    (float64 here; run_linear_attention casts to the activations' state dtype)."""
    slopes = (2.0 ** (-8.0 / n_heads)) ** torch.arange(1, n_heads + 1, dtype=dtype, device=device)
    return -slopes * (1.0 - layer_idx / (n_layers - 1 + 1e-5) + 1e-5)


def _rotate(x, cos, sin):
    """RoPE on the first 2·cos.shape[-1] dims of each head (B, T, H, d); the rest pass unchanged."""
    rotary = 2 * cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)


class LightningAttention(nn.Module):
    """MiniMax's lightning mixer (module docstring). (B, T, D) -> (B, T, D). Attributes read from outside:
    `linear_attn` (lasp.apply), n_heads / head_dim / log_decay / norm over H·d (parallel/tensor.py)."""
    linear_attn = staticmethod(local_linear_attention)

    def __init__(self, dim, n_heads, head_dim, layer_idx, n_layers):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_idx, self.n_layers = n_heads, head_dim, layer_idx, n_layers
        width = n_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, width, bias=False) for _ in range(3))
        self.g_proj = nn.Linear(dim, width, bias=False)           # transformers: output_gate
        self.norm = RMSNorm(width, LIGHTNING_NORM_EPS)
        self.out_proj = nn.Linear(width, dim, bias=False)

    def log_decay(self, device=None):
        """(H,) log λ_{h,l}: a constant of the architecture, not a parameter."""
        return minimax_log_decay(self.n_heads, self.layer_idx, self.n_layers, device)

    def forward(self, x, positions=None, segment_ids=None, cache=None):
        B, T, _ = x.shape
        # heads from the projection width: under tensor parallelism a rank holds H/tp of them
        q, k, v = (F.silu(p(x)).view(B, T, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        log_decay = self.log_decay(x.device)
        # training: the engine resets the state at each document start (segment_ids); decoding: one document
        o = run_linear_attention(self.linear_attn, q, k, v, log_decay, cache, None, segment_ids)
        return self.out_proj(torch.sigmoid(self.g_proj(x)) * self.norm(o.flatten(2)))


class MiniMaxSoftmaxAttention(nn.Module):
    """GQA softmax mixer with its own head_dim and partial RoPE on global positions. (B, T, D) -> (B, T, D);
    segment_ids (B, T) keep attention inside a document. Attribute `softmax_attn` (lasp.apply)."""
    softmax_attn = staticmethod(local_softmax_attention)

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, rotary_dim, rope_base):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rotary_dim, self.rope_base = rotary_dim or head_dim, rope_base
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, dim, bias=False)       # transformers: o_proj

    def forward(self, x, positions, segment_ids=None, cache=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rope_base, q.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is None:
            o = self.softmax_attn(q, k, v, causal=True, scale=None, segment_ids=segment_ids)
        else:
            o = _cached_softmax_attention(q, k, v, positions, cache)
        return self.out_proj(o.flatten(2))


class MiniMaxBlock(nn.Module):
    """u = RMSNorm(x); x = α·u + β·mixer(u); u = RMSNorm(x); x = α_mlp·u + β_mlp·MoE(u). kind 'L' or 'N'."""

    def __init__(self, cfg, layer_idx, kind):
        super().__init__()
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if kind == "L":
            self.mixer = LightningAttention(cfg.dim, cfg.n_heads, cfg.head_dim, layer_idx, cfg.n_layers)
            self.alpha, self.beta = cfg.linear_alpha, cfg.linear_beta
        else:
            self.mixer = MiniMaxSoftmaxAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rotary_dim,
                                                 cfg.rope_base)
            self.alpha, self.beta = cfg.softmax_alpha, cfg.softmax_beta
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_ffn_experts, cfg.top_k, normalize_top1=True,
                                  init_std=cfg.init_std, residual_std=cfg.init_std)
        self.mlp_alpha, self.mlp_beta = cfg.mlp_alpha, cfg.mlp_beta

    def forward(self, x, positions, segment_ids=None, cache=None):
        u = self.attn_norm(x)
        x = self.alpha * u + self.beta * self.mixer(u, positions, segment_ids, cache)
        u = self.mlp_norm(x)
        return self.mlp_alpha * u + self.mlp_beta * self.mlp(u)


class MiniMax(nn.Module):
    """Embedding -> blocks -> final RMSNorm; `logits`/`loss` apply the untied output head."""
    family = "minimax"
    cross_entropy = staticmethod(chunked_cross_entropy)  # parallel/tensor.py sets a vocabulary-parallel one

    def __init__(self, cfg: MiniMaxConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(MiniMaxBlock(cfg, i, kind) for i, kind in enumerate(cfg.layer_types()))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) for every weight (experts and router too), norms 1: transformers' _init_weights."""
        init_linear_weights(self, self.config.init_std, self.config.init_std)
        self.norm.init_weights()

    # embedding -> blocks -> norm, decoding caches, the head and the router losses (config fields of the same
    # names): Linear-Llama3's, shared, not copied
    forward, new_cache, logits = LinearLlama.forward, LinearLlama.new_cache, LinearLlama.logits
    aux_loss, loss = LinearLlama.aux_loss, LinearLlama.loss
