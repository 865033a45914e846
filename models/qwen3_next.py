"""Qwen3-Next (transformers' `Qwen3NextForCausalLM`, 2025-09): Gated DeltaNet layers and gated softmax layers, 3 : 1.

Differences from Llama-3, each as transformers 5.25 builds it (models/qwen3_next/modeling_qwen3_next.py):
- layer i is softmax attention when (i + 1) % full_attention_interval == 0, else a Gated DeltaNet layer;
- RMSNorms are zero-centred, y = x̂·(1 + w) with w initialised to 0 (the output norm of Gated DeltaNet is not);
- Gated DeltaNet (SPEC §3c): one fused projection gives q, k (H_k heads of d_k), v, z (H_v heads of d_v, grouped by
  the k head they share), another gives b, a (H_v each); a causal depthwise convolution (width w, SiLU) runs over
  the concatenated q, k, v channels; q and k are L2-normalised, q scaled by d_k^(−1/2); β = sigmoid(b),
  g = −e^{A_log}·softplus(a + dt_bias) per v head; S_t = e^{g_t}(I − β_t k_tᵀk_t)S_{t−1} + β_t k_tᵀv_t, o_t = q_t S_t
  (each k head serves H_v/H_k consecutive v heads); out = W_out·(RMSNorm_head(o)·w ⊙ silu(z));
- softmax attention doubles q_proj into (q, gate) per head, RMS-normalises q and k per head (zero-centred), rotates
  only the first partial_rotary_factor of each head (rotate-half, base rope_base), and multiplies the output by
  sigmoid(gate) before o_proj; GQA with n_kv_heads;
- MLP: SwiGLU, or (n_experts > 0) top-k routed SwiGLU experts (models/moe.py: softmax router, top-k weights
  renormalised) plus a shared SwiGLU expert scaled by sigmoid(x·w_shared).

Shapes: tokens (B, T) local shard; positions (T,) or (B, T) GLOBAL positions (RoPE); segment_ids (B, T) document
ids (softmax masks, delta-rule state resets, convolution taps stop); hidden (B, T, D). Module names follow this
project (mixer, attn_norm, mlp_norm); models/hf_qwen3_next.py maps them to transformers' names.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lasp.kernels import gated_delta_attn

from .common import (ShortConvolution, SwiGLU, _cached_softmax_attention, apply_rotary, chunked_cross_entropy,
                     local_softmax_attention, rotary_cos_sin)
from .linear_llama import LinearLlama
from .moe import MoEFeedForward

__all__ = ["Qwen3NextConfig", "PRESETS", "Qwen3Next", "local_delta_attention"]


@dataclass
class Qwen3NextConfig:
    vocab_size: int = 151936
    dim: int = 2048                   # hidden_size
    n_layers: int = 48
    full_attention_interval: int = 4  # every 4th layer is softmax attention
    n_heads: int = 16                 # softmax layers: query heads
    n_kv_heads: int = 2               # softmax layers: key/value heads
    head_dim: int = 256               # softmax layers
    partial_rotary_factor: float = 0.25
    rope_base: float = 10_000_000.0
    linear_key_heads: int = 16        # Gated DeltaNet: H_k (q and k)
    linear_value_heads: int = 32      # Gated DeltaNet: H_v (v, z, β, g), a multiple of H_k
    linear_key_dim: int = 128         # d_k
    linear_value_dim: int = 128       # d_v
    conv_width: int = 4               # linear_conv_kernel_dim
    ffn_dim: int = 5120               # dense SwiGLU (intermediate_size)
    n_experts: int = 0                # routed experts (0: every MLP dense)
    top_k: int = 10                   # experts per token
    expert_dim: int = 512             # moe_intermediate_size
    shared_expert_dim: int = 512      # shared_expert_intermediate_size
    norm_eps: float = 1e-6            # rms_norm_eps
    init_std: float = 0.02            # initializer_range
    balance_loss_weight: float = 0.001   # router_aux_loss_coef
    z_loss_weight: float = 0.0
    loss_chunk_tokens: int = 1024

    def __post_init__(self):
        if self.full_attention_interval < 1 or self.n_layers < 1:
            raise ValueError(f"n_layers={self.n_layers} and full_attention_interval={self.full_attention_interval} "
                             f"must be >= 1")
        if self.n_heads % self.n_kv_heads or self.linear_value_heads % self.linear_key_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} and "
                             f"linear_key_heads={self.linear_key_heads} must divide linear_value_heads="
                             f"{self.linear_value_heads}")
        rotary = int(self.head_dim * self.partial_rotary_factor)
        if rotary < 2 or rotary % 2 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} · partial_rotary_factor={self.partial_rotary_factor} must "
                             f"give an even rotary width >= 2, got {rotary}")
        if self.conv_width < 1:
            raise ValueError(f"conv_width must be >= 1, got {self.conv_width}")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")

    def layer_types(self):
        """One letter per layer: L = linear attention (Gated DeltaNet), N = softmax attention, e.g. 'LLLNLLLN'."""
        return "".join("N" if (i + 1) % self.full_attention_interval == 0 else "L" for i in range(self.n_layers))


PRESETS = {
    # Qwen3-Next-80B-A3B (config.json of Qwen/Qwen3-Next-80B-A3B-Instruct): 48 layers, 512 experts, top-10
    "qwen3-next-80b-a3b": Qwen3NextConfig(n_experts=512),
    # trains in minutes on a CPU (byte-level vocabulary); 8 layers LLLN LLLN, dense MLP
    "qwen3-next-tiny": Qwen3NextConfig(vocab_size=256, dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32,
                                       linear_key_heads=2, linear_value_heads=4, linear_key_dim=32,
                                       linear_value_dim=32, ffn_dim=384, loss_chunk_tokens=512),
    # the same with 4 routed experts (top-2) and a shared expert, as the published model's MLPs
    "qwen3-next-tiny-moe": Qwen3NextConfig(vocab_size=256, dim=128, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=32,
                                           linear_key_heads=2, linear_value_heads=4, linear_key_dim=32,
                                           linear_value_dim=32, ffn_dim=384, n_experts=4, top_k=2, expert_dim=96,
                                           shared_expert_dim=96, loss_chunk_tokens=512),
}


# ---------------------------------------------------------------------------------------------- leaf modules
def _float(x):
    """Norms run in at least float32 (float64 stays float64), as transformers' x.float()."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class ZeroCentredRMSNorm(nn.Module):
    """y = x·rsqrt(mean(x²) + eps)·(1 + w), w initialised to 0. (..., D) -> same dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self):
        nn.init.zeros_(self.weight)

    def forward(self, x):
        xf = _float(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + _float(self.weight))).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Gated DeltaNet's output norm per head: (x̂·w) ⊙ silu(z), w initialised to 1. (..., d), (..., d) -> (..., d)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self):
        nn.init.ones_(self.weight)

    def forward(self, x, z):
        xf = _float(x)
        y = (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype))
        return (y * F.silu(_float(z))).to(x.dtype)


def _l2norm(x, eps=1e-6):
    """x·rsqrt(Σx² + eps) over the last dim (fla's and transformers' l2norm), in at least float32."""
    xf = _float(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def local_delta_attention(q, k, v, *, beta, log_gate=None, segment_ids=None):
    """Gated delta rule on one process (kernels.gated_delta_attn): q, k (B, T, H, d_k), v (B, T, H, d_v), beta and
    log_gate (B, T, H) -> o (B, T, H, d_v). The LASP engines take the same arguments (lasp.apply binds them)."""
    return gated_delta_attn(q, k, v, beta, log_gate=log_gate, segment_ids=segment_ids)[0]


# ---------------------------------------------------------------------------------------------- mixers
class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention mixer (module docstring). (B, T, D) -> (B, T, D).

    in_proj_qkvz rows per k head h: [q_h (d_k), k_h (d_k), v (r·d_v), z (r·d_v)] with r = H_v/H_k (transformers'
    layout, kept so conversion is a rename); in_proj_ba rows per k head: [b (r), a (r)].
    """
    delta_attn = staticmethod(local_delta_attention)    # lasp.apply replaces it by a LASP engine (beta=...)

    def __init__(self, cfg):
        super().__init__()
        self.h_k, self.h_v = cfg.linear_key_heads, cfg.linear_value_heads
        self.d_k, self.d_v = cfg.linear_key_dim, cfg.linear_value_dim
        r = self.h_v // self.h_k
        self.in_proj_qkvz = nn.Linear(cfg.dim, self.h_k * (2 * self.d_k + 2 * r * self.d_v), bias=False)
        self.in_proj_ba = nn.Linear(cfg.dim, self.h_k * 2 * r, bias=False)
        channels = self.h_k * 2 * self.d_k + self.h_v * self.d_v
        self.conv = ShortConvolution(channels, cfg.conv_width)   # over [q | k | v], SiLU; SP: halo exchange
        self.dt_bias = nn.Parameter(torch.empty(self.h_v))
        self.A_log = nn.Parameter(torch.empty(self.h_v))
        self.norm = GatedRMSNorm(self.d_v, cfg.norm_eps)
        self.out_proj = nn.Linear(self.h_v * self.d_v, cfg.dim, bias=False)

    def init_weights(self):
        """conv as nn.Conv1d's default (uniform ±1/√w); dt_bias 1; A = e^{A_log} ~ U(0.01, 16) (transformers)."""
        self.conv.init_weights()
        nn.init.ones_(self.dt_bias)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.norm.init_weights()

    def _project(self, x):
        """(B, T, D) -> q, k (B, T, H_k·d_k), v (B, T, H_v·d_v), z (B, T, H_v, d_v), b, a (B, T, H_v)."""
        B, T, _ = x.shape
        r = self.h_v // self.h_k
        qkvz = self.in_proj_qkvz(x).view(B, T, self.h_k, -1)
        q, k, v, z = qkvz.split([self.d_k, self.d_k, r * self.d_v, r * self.d_v], dim=-1)
        b, a = self.in_proj_ba(x).view(B, T, self.h_k, 2 * r).split([r, r], dim=-1)
        return (q.flatten(2), k.flatten(2), v.flatten(2), z.reshape(B, T, self.h_v, self.d_v),
                b.reshape(B, T, self.h_v), a.reshape(B, T, self.h_v))

    def forward(self, x, positions=None, segment_ids=None, cache=None):
        B, T, _ = x.shape
        q, k, v, z, b, a = self._project(x)
        mixed = self.conv(torch.cat([q, k, v], dim=-1), segment_ids, cache)
        q, k, v = mixed.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        r = self.h_v // self.h_k                                  # each k head serves r consecutive v heads
        q = (_l2norm(q.view(B, T, self.h_k, self.d_k)) * self.d_k ** -0.5).repeat_interleave(r, dim=2)
        k = _l2norm(k.view(B, T, self.h_k, self.d_k)).repeat_interleave(r, dim=2)
        v = v.view(B, T, self.h_v, self.d_v)
        beta = torch.sigmoid(b)
        g = -_float(self.A_log).exp() * F.softplus(_float(a) + self.dt_bias)    # (B, T, H_v) ≤ 0
        if cache is None:
            o = self.delta_attn(q, k, v, beta=beta, log_gate=g, segment_ids=segment_ids)
        else:
            o, cache["state"] = gated_delta_attn(q, k, v, beta, log_gate=g, initial_state=cache.get("state"),
                                                 output_final_state=True)
        return self.out_proj(self.norm(o, z).flatten(2))


class GatedAttention(nn.Module):
    """Qwen3-Next's softmax mixer: q_proj gives (q, gate) per head; zero-centred RMSNorm on q and k per head;
    partial rotary; GQA; output ⊙ sigmoid(gate), then o_proj. (B, T, D), positions (B, T) -> (B, T, D)."""
    softmax_attn = staticmethod(local_softmax_attention)

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.rope_base = cfg.head_dim, cfg.rope_base
        self.rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim * 2, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = ZeroCentredRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = ZeroCentredRMSNorm(cfg.head_dim, cfg.norm_eps)

    def _rotate(self, x, cos, sin):
        """RoPE on the first rotary_dim channels of each head only."""
        rot, keep = x.split([self.rotary_dim, x.shape[-1] - self.rotary_dim], dim=-1)
        return torch.cat([apply_rotary(rot, cos, sin), keep], dim=-1)

    def forward(self, x, positions, segment_ids=None, cache=None):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, -1, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim))
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rope_base, q.dtype)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        if cache is None:
            o = self.softmax_attn(q, k, v, causal=True, scale=None, segment_ids=segment_ids)
        else:
            o = _cached_softmax_attention(q, k, v, positions, cache)
        return self.out_proj((o * torch.sigmoid(gate)).flatten(2))


class SharedExpertMoE(nn.Module):
    """Qwen3-Next's sparse MLP: routed experts (models/moe.py) + sigmoid(x·w_shared)·SwiGLU_shared(x)."""

    def __init__(self, cfg):
        super().__init__()
        residual_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.experts = MoEFeedForward(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.top_k, init_std=cfg.init_std,
                                      residual_std=residual_std)
        self.shared = SwiGLU(cfg.dim, cfg.shared_expert_dim)
        self.shared_gate = nn.Linear(cfg.dim, 1, bias=False)

    def forward(self, x):
        return self.experts(x) + torch.sigmoid(self.shared_gate(x)) * self.shared(x)


# ---------------------------------------------------------------------------------------------- model
class Qwen3NextBlock(nn.Module):
    """x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x)), zero-centred norms. kind 'L' (Gated DeltaNet) or 'N'."""

    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.attn_norm = ZeroCentredRMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = GatedDeltaNet(cfg) if kind == "L" else GatedAttention(cfg)
        self.mlp_norm = ZeroCentredRMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SharedExpertMoE(cfg) if cfg.n_experts else SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, positions, segment_ids=None, cache=None):
        x = x + self.mixer(self.attn_norm(x), positions, segment_ids, cache)
        return x + self.mlp(self.mlp_norm(x))


class Qwen3Next(nn.Module):
    """Embedding -> blocks -> final zero-centred RMSNorm; `logits`/`loss` apply the untied output head."""
    family = "qwen3-next"
    cross_entropy = staticmethod(chunked_cross_entropy)

    def __init__(self, cfg: Qwen3NextConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Qwen3NextBlock(cfg, kind) for kind in cfg.layer_types())
        self.norm = ZeroCentredRMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self):
        """Every Linear, Embedding and expert weight Normal(0, init_std) (transformers' _init_weights; no depth
        scaling), norms and Gated DeltaNet parameters by their own init_weights."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, MoEFeedForward):
                for w in (m.gate_proj, m.up_proj, m.down_proj):
                    nn.init.normal_(w, std=std)
            elif m is not self and hasattr(m, "init_weights"):
                m.init_weights()

    # embedding -> blocks -> norm, decoding caches, the head and the router losses: Linear-Llama3's, shared
    forward, new_cache, logits = LinearLlama.forward, LinearLlama.new_cache, LinearLlama.logits
    aux_loss, loss = LinearLlama.aux_loss, LinearLlama.loss
