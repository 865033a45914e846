"""TransNormerLLM (TNL), built as the released checkpoints are (docs/SPEC.md §5).

Differences from Llama: every layer is a gated linear attention (GLA) with a fixed per-head, per-layer decay
λ_{h,l} = exp(−s_h·(1 − l/(L−1) + 1e−5)), s_h the ALiBi slopes; one fused q/k/v/u projection; SiLU on q and k
only; no 1/√d scale; LRPE-d in layer 0 only (q, k widened to 2d: d_k = 2·d_v); SRMSNorm (no weight) everywhere,
including over the full hidden width of the attention output; a linear output gate u (no activation); an SGLU
channel mixer without activation; embeddings scaled by √D (or 1) and tied to the output head; token 0 is the
padding row (pad_token_id = 0, as the release's nn.Embedding(..., padding_idx=0)): zero at init and no gradient
from the lookup; it still gets the tied head's gradient, as in the release.

Shapes: tokens (B, T) local shard; positions (T,) or (B, T) GLOBAL positions (LRPE sees them, so both sequence
layouts give the same model); segment_ids (B, T) document ids or None: each linear layer empties its state at
every document's first token (packed documents stay apart); hidden (B, T, D).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (SGLU, RMSNorm, chunked_cross_entropy, init_linear_weights, lightning_log_decay,
                     local_linear_attention, normalize_positions, run_linear_attention)

__all__ = ["TNLConfig", "PRESETS", "LRPE", "NormLinearAttention", "TNLBlock", "TransNormerLLM"]


@dataclass
class TNLConfig:
    vocab_size: int = 64000         # tokens (set by the tokenizer: data.vocab_size in the launcher)
    dim: int = 1024                 # model width D
    n_layers: int = 24              # blocks
    n_heads: int = 8                # lightning-attention heads (per-head decay)
    glu_dim: int = 2816             # SGLU hidden width
    scale_embedding: bool = True    # x = embed(ids)·√D, else ·1 (released default: scaled)
    pad_token_id: int = 0           # the release's padding_idx: row zero at init, no gradient from the lookup; -1 none
    norm_eps: float = 1e-6          # RMSNorm (no weight) and mixer norm epsilon
    init_std: float = 0.02          # normal init std of every weight, as released
    loss_chunk_tokens: int = 1024   # tokens per chunk of the chunked cross-entropy

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if not -1 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} must be -1 (none) or a token id below "
                             f"vocab_size={self.vocab_size}")


PRESETS = {
    "tnl-385m": TNLConfig(dim=1024, n_layers=24, n_heads=8, glu_dim=2816),
    "tnl-1b": TNLConfig(dim=2048, n_layers=16, n_heads=16, glu_dim=5632),
    "tnl-3b": TNLConfig(dim=2560, n_layers=32, n_heads=20, glu_dim=6912),
    "tnl-7b": TNLConfig(dim=4096, n_layers=30, n_heads=32, glu_dim=11008),
    # trains in minutes on a CPU (byte-level vocabulary)
    "tnl-tiny": TNLConfig(vocab_size=256, dim=128, n_layers=4, n_heads=4, glu_dim=256, loss_chunk_tokens=512),
}


class LRPE(nn.Module):
    """LRPE-d: x (B, T, H, d), positions (B, T) -> [x·cos(θ n), x·sin(θ n)] (B, T, H, 2d), θ (H, d) learnable.

    θ starts at 10000^(−2i/(H·d)) over the flattened (head, dim) index i, as released.
    """

    def __init__(self, n_heads, head_dim):
        super().__init__()
        self.theta = nn.Parameter(torch.empty(n_heads, head_dim))

    @torch.no_grad()
    def init_weights(self):
        n = self.theta.numel()
        self.theta.copy_((10000.0 ** (-2.0 / n * torch.arange(n, dtype=torch.float64))).view_as(self.theta))

    def forward(self, x, positions):
        angles = positions.to(torch.float64)[:, :, None, None] * self.theta.to(torch.float64)  # float64: long T
        return torch.cat([x * angles.cos().to(x.dtype), x * angles.sin().to(x.dtype)], dim=-1)


class NormLinearAttention(nn.Module):
    """TNL's GLA token mixer. (B, T, D), positions (B, T) -> (B, T, D):

        q, k, v, u = split(x W_qkvu);  q, k = silu(q), silu(k);  [layer 0: q, k = LRPE(q), LRPE(k)]
        o = linear_attn(q, k, v, log_decay)   (no 1/√d);   out = (u ⊙ SRMSNorm(o over all heads)) W_out
    """
    linear_attn = staticmethod(local_linear_attention)

    def __init__(self, dim, n_heads, layer_idx, n_layers, eps=1e-6):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_idx, self.n_layers = n_heads, dim // n_heads, layer_idx, n_layers
        self.qkvu_proj = nn.Linear(dim, 4 * dim, bias=False)
        self.lrpe = LRPE(n_heads, dim // n_heads) if layer_idx == 0 else None
        self.norm = RMSNorm(dim, eps, weight=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def log_decay(self, device=None):
        """(H,) log λ_{h,l}: a constant of the architecture, not a parameter."""
        return lightning_log_decay(self.n_heads, self.layer_idx, self.n_layers, device)

    def forward(self, x, positions, segment_ids=None, cache=None):
        B, T, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k, v = (y.reshape(B, T, -1, self.head_dim) for y in (q, k, v))  # local heads under tensor parallelism
        q, k = F.silu(q), F.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)
        o = run_linear_attention(self.linear_attn, q, k, v, self.log_decay(x.device), cache, None, segment_ids)
        return self.out_proj(u * self.norm(o.flatten(2)))


class TNLBlock(nn.Module):
    """x += GLA(SRMSNorm(x)); x += SGLU(SRMSNorm(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.token_norm = RMSNorm(cfg.dim, cfg.norm_eps, weight=False)
        self.mixer = NormLinearAttention(cfg.dim, cfg.n_heads, layer_idx, cfg.n_layers, cfg.norm_eps)
        self.channel_norm = RMSNorm(cfg.dim, cfg.norm_eps, weight=False)
        self.mlp = SGLU(cfg.dim, cfg.glu_dim)

    def forward(self, x, positions, segment_ids=None, cache=None):
        x = x + self.mixer(self.token_norm(x), positions, segment_ids, cache)
        return x + self.mlp(self.channel_norm(x))


class TransNormerLLM(nn.Module):
    """Scaled embedding -> blocks -> final SRMSNorm; `logits`/`loss` use the tied embedding as the head."""
    family = "tnl"
    cross_entropy = staticmethod(chunked_cross_entropy)  # parallel/tensor.py sets a vocabulary-parallel one

    def __init__(self, cfg: TNLConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TNLBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, weight=False)
        self.embed_scale = cfg.dim ** 0.5 if cfg.scale_embedding else 1.0

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, init_std) for every weight, as released; the padding row zero; LRPE θ from its formula."""
        init_linear_weights(self, self.config.init_std, self.config.init_std)
        if self.config.pad_token_id >= 0:
            self.embed.weight[self.config.pad_token_id].zero_()

    def embed_tokens(self, tokens):
        """(B, T) -> (B, T, D) scaled embeddings. Lookups of the padding token pass no gradient to its row, as
        nn.Embedding(padding_idx=...) does; done here, not by padding_idx, so that it also holds when
        parallel/tensor.py replaces `embed` with its vocabulary-parallel lookup."""
        x = self.embed(tokens)
        pad = self.config.pad_token_id
        if pad >= 0:
            x = torch.where((tokens == pad)[..., None], x.detach(), x)
        return x * self.embed_scale

    def forward(self, tokens, positions, segment_ids=None, cache=None):
        """tokens (B, T), positions (T,)/(B, T) global -> hidden (B, T, D). cache: see `new_cache`."""
        positions = normalize_positions(positions, *tokens.shape)
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, segment_ids, None if cache is None else cache[i])
        return self.norm(x)

    def new_cache(self):
        """Empty decoding cache: one dict per layer, holding its recurrent state (B, H, 2d or d, d)."""
        return [{} for _ in self.layers]

    def logits(self, hidden):
        """(B, T, D) -> (B, T, V) with the tied embedding."""
        return F.linear(hidden, self.embed.weight)

    def loss(self, hidden, labels, loss_mask=None):
        """-> (loss_sum, token_count) over local tokens; see common.chunked_cross_entropy."""
        return self.cross_entropy(hidden, self.embed.weight, labels, loss_mask, self.config.loss_chunk_tokens)
