"""Linear-Llama3 (LASP-2 paper): Llama-3 blocks whose attention is linear in the layers marked L of a pattern.

Differences from Llama-3: layer i uses `pattern[i % len(pattern)]`, L = linear attention (no RoPE, feature map on
q/k, per-head RMSNorm on the output, swish output gate; models/common.LinearAttention), N = normal softmax
attention (GQA, RoPE base 500000). "L" is pure linear, "LLLN" the 1/4 hybrid. RMSNorm pre-norm, SwiGLU, untied
embeddings, no biases. Variant (not in the paper): linear_decay="gated" gives every linear layer a data-dependent
forget gate per token and head, g = logsigmoid(x W_f + b_f)/τ (fla's simple GLA; common.LinearAttention), with
the only bias of the model. short_conv = w > 0: a causal depthwise convolution of width w + SiLU on the projected
q, k and v of every linear layer (fla's ShortConvolution; common.ShortConvolution), weights (C, 1, w).

BAM (models/bam.py) is a configuration of these blocks, not another family: parallel_block (u = RMSNorm(x);
y = x + A(u) + F(u)), soft Mixture-of-Attention experts (n_attn_experts, kv_sharing; common.LinearAttention /
SoftmaxAttention as one wide attention of N·H heads) and top-k routed SwiGLU experts (n_ffn_experts, top_k;
models/moe.py) whose router losses `loss` adds. The defaults are Linear-Llama3, parameter for parameter.

Shapes: tokens (B, T) local shard; positions (T,) or (B, T) GLOBAL positions (RoPE sees them, so both sequence
layouts give the same model); segment_ids (B, T) document ids or None: softmax layers attend within a document,
linear layers empty their state at each document's first token; hidden (B, T, D).
"""
from dataclasses import dataclass

import torch
from torch import nn

from .common import (FEATURE_MAPS, MIXER_DECAYS, LinearAttention, RMSNorm, SoftmaxAttention, SwiGLU,
                     chunked_cross_entropy, init_linear_weights, normalize_positions)
from .moe import MoEFeedForward

__all__ = ["LinearLlamaConfig", "PRESETS", "LinearLlamaBlock", "LinearLlama"]


@dataclass
class LinearLlamaConfig:
    vocab_size: int = 128256        # tokens (set by the tokenizer: data.vocab_size in the launcher)
    dim: int = 2048                 # model width D
    n_layers: int = 16              # blocks
    n_heads: int = 32               # attention heads (head dim = dim / n_heads, even)
    n_kv_heads: int = 8             # softmax (N) layers only; linear layers use n_heads for k and v
    ffn_dim: int = 8192             # SwiGLU hidden width
    pattern: str = "L"              # repeated over the layers: L = linear, N = normal softmax attention
    linear_decay: str = "none"      # "none" (basic linear attention) | "lightning" | "retention" | "gated"
    gate_logit_normalizer: float = 16.0  # "gated": g = logsigmoid(x W_f + b)/τ with this τ (fla's simple GLA)
    feature_map: str = "silu"       # "identity" | "elu+1" | "silu"
    rope_base: float = 500000.0     # rotary base θ of the softmax layers
    norm_eps: float = 1e-5          # RMSNorm epsilon
    init_std: float = 0.02          # normal init std (out/down projections: std / sqrt(2·n_layers))
    loss_chunk_tokens: int = 1024   # tokens per chunk of the chunked cross-entropy
    parallel_block: bool = False    # BAM/GPT-J block: u = RMSNorm(x); y = x + mixer(u) + MLP(u) (False: Llama's)
    n_attn_experts: int = 1         # N soft Mixture-of-Attention experts, one wide attention of N·H heads (1: dense)
    kv_sharing: bool = False        # the attention experts share one k and v (own q, gate and output projection)
    n_ffn_experts: int = 1          # E top-k routed SwiGLU experts (models/moe.py; 1: the dense SwiGLU)
    top_k: int = 1                  # FFN experts per token (between 1 and n_ffn_experts)
    normalize_top1: bool = False    # top-1 routing weight 1 (softmax over the top-k) instead of Switch's raw p
    balance_loss_weight: float = 0.01   # weight of the Switch balancing loss that `loss` adds (FFN experts only)
    z_loss_weight: float = 0.001    # weight of the router z-loss that `loss` adds (FFN experts only)
    short_conv: int = 0             # width w of a causal depthwise conv + SiLU on q, k, v of linear layers (0: none)

    def __post_init__(self):
        if not self.pattern or set(self.pattern) - {"L", "N"}:
            raise ValueError(f"pattern must be a non-empty string of 'L' (linear) and 'N' (softmax) letters, "
                             f"got {self.pattern!r}")
        if self.n_layers % len(self.pattern):
            raise ValueError(f"pattern {self.pattern!r} (length {len(self.pattern)}) must tile n_layers="
                             f"{self.n_layers}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim} into an even head dim")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.linear_decay not in MIXER_DECAYS:
            raise ValueError(f"linear_decay must be one of {MIXER_DECAYS}, got {self.linear_decay!r}")
        if not self.gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {self.gate_logit_normalizer!r}")
        if self.short_conv < 0:
            raise ValueError(f"short_conv must be >= 0 (a convolution width; 0 = none), got {self.short_conv}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {self.feature_map!r}")
        self._check_experts()

    def _check_experts(self):
        if self.n_attn_experts < 1 or self.n_ffn_experts < 1:
            raise ValueError(f"n_attn_experts and n_ffn_experts must be >= 1, got {self.n_attn_experts}, "
                             f"{self.n_ffn_experts}")
        if not 1 <= self.top_k <= self.n_ffn_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_ffn_experts={self.n_ffn_experts}")
        if self.n_attn_experts > 1 and self.linear_decay == "gated":
            raise ValueError(f"linear_decay='gated' has no attention experts (n_attn_experts="
                             f"{self.n_attn_experts}); use 'none', 'lightning' or 'retention'")

    def layer_types(self):
        """One letter per layer, e.g. 'LLLNLLLN'."""
        return (self.pattern * (self.n_layers // len(self.pattern)))[:self.n_layers]


# Size names are nominal (128256-token untied vocabulary; a linear layer has q, k, v, gate, out at full width as
# released, 2.5·D² more than GQA softmax attention): pure-linear counts are 0.48B / 1.67B / 9.37B, and
# pattern "N" gives Llama-3-8B's 8.03B for the 8B shape. "gated" adds H·(D + 1) per linear layer (W_f, b_f).
PRESETS = {
    "linear-llama3-0.3b": LinearLlamaConfig(n_layers=12, dim=1024, n_heads=16, ffn_dim=4096),
    "linear-llama3-0.3b-hybrid": LinearLlamaConfig(n_layers=12, dim=1024, n_heads=16, ffn_dim=4096, pattern="LLLN"),
    # the released scripts use 32 heads (the paper text says 16)
    "linear-llama3-1b": LinearLlamaConfig(),
    "linear-llama3-1b-hybrid": LinearLlamaConfig(pattern="LLLN"),
    "linear-llama3-8b": LinearLlamaConfig(n_layers=32, dim=4096, n_heads=32, ffn_dim=14336),
    "linear-llama3-8b-hybrid": LinearLlamaConfig(n_layers=32, dim=4096, n_heads=32, ffn_dim=14336, pattern="LLLN"),
    # trains in minutes on a CPU (byte-level vocabulary)
    "linear-llama3-tiny": LinearLlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=8, n_kv_heads=4,
                                            ffn_dim=384, pattern="LLLN", loss_chunk_tokens=512),
    # data-dependent forget gate per token and head (linear_decay="gated", common.LinearAttention): pure, 1/4 hybrid
    "linear-llama3-tiny-gated": LinearLlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=8, n_kv_heads=4,
                                                  ffn_dim=384, pattern="L", linear_decay="gated",
                                                  loss_chunk_tokens=512),
    "linear-llama3-tiny-gated-hybrid": LinearLlamaConfig(vocab_size=256, dim=128, n_layers=4, n_heads=8,
                                                         n_kv_heads=4, ffn_dim=384, pattern="LLLN",
                                                         linear_decay="gated", loss_chunk_tokens=512),
    "linear-llama3-1b-gated-hybrid": LinearLlamaConfig(pattern="LLLN", linear_decay="gated"),
}


def _mlp(cfg):
    """The dense SwiGLU, or E > 1 routed SwiGLU experts (stacked weights, a router)."""
    if cfg.n_ffn_experts == 1:
        return SwiGLU(cfg.dim, cfg.ffn_dim)
    return MoEFeedForward(cfg.dim, cfg.ffn_dim, cfg.n_ffn_experts, cfg.top_k, normalize_top1=cfg.normalize_top1,
                          init_std=cfg.init_std, residual_std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)


class LinearLlamaBlock(nn.Module):
    """x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x)). kind 'L' or 'N'. parallel_block: u = RMSNorm(x) (attn_norm)
    feeds both, x + mixer(u) + MLP(u), and there is no mlp_norm. (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg, layer_idx, kind):
        super().__init__()
        self.kind = kind
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        experts = dict(n_experts=cfg.n_attn_experts, kv_sharing=cfg.kv_sharing)
        if kind == "L":
            self.mixer = LinearAttention(cfg.dim, cfg.n_heads, feature_map=cfg.feature_map, decay=cfg.linear_decay,
                                         layer_idx=layer_idx, n_layers=cfg.n_layers, eps=cfg.norm_eps,
                                         gate_logit_normalizer=cfg.gate_logit_normalizer,
                                         short_conv=cfg.short_conv, **experts)
        else:
            self.mixer = SoftmaxAttention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.rope_base, **experts)
        self.mlp_norm = None if cfg.parallel_block else RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = _mlp(cfg)

    def forward(self, x, positions, segment_ids=None, cache=None):
        u = self.attn_norm(x)
        if self.mlp_norm is None:
            return x + self.mixer(u, positions, segment_ids, cache) + self.mlp(u)
        x = x + self.mixer(u, positions, segment_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class LinearLlama(nn.Module):
    """Embedding -> blocks -> final RMSNorm; `logits`/`loss` apply the untied output head."""
    family = "linear-llama3"
    cross_entropy = staticmethod(chunked_cross_entropy)  # parallel/tensor.py sets a vocabulary-parallel one

    def __init__(self, cfg: LinearLlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(LinearLlamaBlock(cfg, i, kind) for i, kind in enumerate(cfg.layer_types()))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std); projections into the residual stream get init_std/√(2·n_layers); norms 1."""
        cfg = self.config
        init_linear_weights(self, cfg.init_std, cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.norm.init_weights()

    def forward(self, tokens, positions, segment_ids=None, cache=None):
        """tokens (B, T), positions (T,)/(B, T) global, segment_ids (B, T) or None -> hidden (B, T, D).

        cache: None for training, else the list from `new_cache()` (decoding continues from it).
        """
        positions = normalize_positions(positions, *tokens.shape)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, segment_ids, None if cache is None else cache[i])
        return self.norm(x)

    def new_cache(self):
        """Empty decoding cache: one dict per layer (linear: recurrent state; softmax: keys/values)."""
        return [{} for _ in self.layers]

    def logits(self, hidden):
        """(B, T, D) -> (B, T, V)."""
        return self.lm_head(hidden)

    def aux_loss(self):
        """Σ over MoE layers of balance_loss_weight·balance + z_loss_weight·z from the last forward (this rank's
        tokens, route counts as `count_reduce` summed them); a zero tensor without FFN experts."""
        cfg, total = self.config, self.lm_head.weight.new_zeros(())
        for m in self.modules():                     # routed FFN layers (models/moe.py), wherever a block holds one
            aux = getattr(m, "aux", None) if isinstance(m, MoEFeedForward) else None
            if aux is not None:
                total = total + cfg.balance_loss_weight * aux["balance"] + cfg.z_loss_weight * aux["z"]
        return total

    def loss(self, hidden, labels, loss_mask=None, with_aux=True):
        """-> (loss_sum, token_count) over local tokens; see common.chunked_cross_entropy. With FFN experts (and
        with_aux) the sum adds aux_loss()·count, so that a caller dividing the sums over ranks by the counts over
        ranks adds the label-weighted mean of the ranks' router losses (exactly the global one when every rank holds
        as many labelled tokens)."""
        ce, count = self.cross_entropy(hidden, self.lm_head.weight, labels, loss_mask, self.config.loss_chunk_tokens)
        if not with_aux or not any(isinstance(m, MoEFeedForward) and m.router is not None for m in self.modules()):
            return ce, count
        return ce + self.aux_loss().to(ce.dtype) * count, count
