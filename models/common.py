"""Parts shared by the model families: norms, GLU MLPs, rotary, feature maps, decays, token mixers, local
attention defaults and the chunked cross-entropy.

Shape legend: B batch, T tokens held by this process (the local shard under sequence parallelism), D model width,
H query heads, H_kv key/value heads, d head dim, V vocabulary. Activations are (B, T, D); per-head tensors
(B, T, H, d); linear-attention states (B, H, d_k, d_v) in float32 (float64 for float64 inputs).

Mixers mix tokens only through the function held in their attribute `linear_attn` (linear mixers) or
`softmax_attn` (softmax mixers). The defaults below run on one process; `lasp.apply_sequence_parallel`
replaces them with sequence-parallel engines. Nothing here knows about ranks.

Attention experts (BAM's soft Mixture-of-Attention, models/bam.py): a mixer built with n_experts = N > 1 is ONE
wide attention of N·H heads, head j·H + h for expert j, whose per-expert head groups are scaled by the soft gates
g = softmax(x W_rᵀ) (B, T, N) before the concatenated output projection; so the engines run it unchanged.
kv_sharing: one k, v for all experts (own q, gate, out). N = 1 is the plain mixer, parameter for parameter.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lasp.kernels import lightning_attn, repeat_kv, softmax_attn, state_dtype
from lasp.kernels.short_conv import short_conv

__all__ = ["FEATURE_MAPS", "LINEAR_DECAYS", "MIXER_DECAYS", "RMSNorm", "SwiGLU", "SGLU", "rotary_cos_sin",
           "apply_rotary", "alibi_slopes", "lightning_log_decay", "retention_log_decay", "local_linear_attention",
           "local_softmax_attention", "dense_attention", "run_linear_attention", "LinearAttention",
           "SoftmaxAttention", "soft_expert_gates", "chunked_cross_entropy", "normalize_positions",
           "init_linear_weights", "short_conv", "ShortConvolution"]

FEATURE_MAPS = {"identity": lambda x: x, "elu+1": lambda x: F.elu(x) + 1.0, "silu": F.silu}
LINEAR_DECAYS = ("none", "lightning", "retention")       # constant per-head decays (every linear mixer)
MIXER_DECAYS = LINEAR_DECAYS + ("gated",)                # LinearAttention also takes a data-dependent gate


def _compute_dtype(x):
    """Norms and losses run in at least float32 (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------- norms, MLPs
class RMSNorm(nn.Module):
    """y = x·rsqrt(mean(x², last dim) + eps)·w. weight=False is TNL's SRMSNorm (no parameter). (..., D) -> same."""

    def __init__(self, dim, eps=1e-6, weight=True):
        super().__init__()
        self.dim, self.eps = dim, eps  # dim: the features normalised together (tensor parallelism reads it)
        self.weight = nn.Parameter(torch.empty(dim)) if weight else None

    def init_weights(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x):
        xf = x.to(_compute_dtype(x))
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if self.weight is None else y * self.weight


class SwiGLU(nn.Module):
    """Llama MLP: down(silu(gate(x)) ⊙ up(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SGLU(nn.Module):
    """TNL's simple GLU, no activation: down((x W_v) ⊙ (x W_u)). (B, T, D) -> (B, T, D)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.v_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.u_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(self.v_proj(x) * self.u_proj(x))


def init_linear_weights(module, std, residual_std):
    """Normal(0, std) for every Linear/Embedding weight (residual_std for `out_proj`/`down_proj`, which write into
    the residual stream), zero biases, and each submodule's own `init_weights()` (norms, LRPE)."""
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            last = name.rsplit(".", 1)[-1]
            nn.init.normal_(m.weight, std=residual_std if last in ("out_proj", "down_proj") else std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif m is not module and hasattr(m, "init_weights"):
            m.init_weights()


# ---------------------------------------------------------------------------------------------- positions
def normalize_positions(positions, batch, seq_len):
    """(T,) or (B, T) global token positions -> (B, T) long. ValueError if they do not match the tokens."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(0).expand(batch, -1)
    if positions.shape != (batch, seq_len):
        raise ValueError(f"positions must be (T,) or (B, T) = ({batch}, {seq_len}) to match the tokens, "
                         f"got {tuple(positions.shape)}")
    return positions


def rotary_cos_sin(positions, head_dim, base, dtype):
    """RoPE tables for (B, T) global positions -> cos, sin (B, T, 1, d/2) in `dtype`.

    Angles are formed in float64: at positions ~2M a float32 angle is off by ~0.1 rad.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE: (B, T, H, d) with (B, T, 1, d/2) tables -> (B, T, H, d)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------- decays
def alibi_slopes(n_heads):
    """ALiBi slopes s_h = 2^(−8(h+1)/H); for H not a power of two, the usual interleave (as TNL/ALiBi do)."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][:n_heads - closest]


# The decays are built in float64 (H scalars) and cast by run_linear_attention to the state dtype of the
# activations: a float64 model gets exact constants, a float32 one correctly rounded float32 ones. (Built in
# float32 they cost a float64 TNL ~1e-9 on the logits against a float64 reference.)
def lightning_log_decay(n_heads, layer_idx, n_layers, device=None, dtype=torch.float64):
    """TNL/Lightning decay: log λ_{h,l} = −s_h·(1 − l/(L−1) + 1e−5). (H,) in `dtype`."""
    depth = 1.0 - layer_idx / max(n_layers - 1, 1) + 1e-5
    return -torch.tensor(alibi_slopes(n_heads), dtype=dtype, device=device) * depth


def retention_log_decay(n_heads, device=None, dtype=torch.float64):
    """RetNet decay: λ_h = 1 − 2^(−5−h). (H,) in `dtype`."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=dtype, device=device))))


# ---------------------------------------------------------------------------------------------- attention
def local_linear_attention(q, k, v, *, log_decay=None, log_gate=None, causal=True, segment_ids=None):
    """Linear attention on one process: (B, T, H, d_k), (B, T, H_kv, d_k), (B, T, H_kv, d_v) -> (B, T, H, d_v).

    causal: o_i = Σ_{j≤i} e^{G_i − G_j} (q_i·k_j) v_j with G_i = Σ_{t≤i} (log λ + g_t) (lightning_attn); without
    log_gate that is λ^{i−j}. Non-causal (no decay, no gate): o_i = q_i Σ_j k_jᵀ v_j. H_kv < H: grouped K/V heads,
    log_decay (H_kv,) and log_gate (B, T, H_kv) per K/V head (the LASP engines take the same form).
    segment_ids (B, T): packed documents, j and i in the same one only (the state emptied at each start); causal.
    """
    k, v, log_decay = repeat_kv(q, k, v, log_decay)
    if causal:
        return lightning_attn(q, k, v, log_decay=log_decay, segment_ids=segment_ids, **_gate_kwargs(q, log_gate))[0]
    if segment_ids is not None:
        raise ValueError(f"segment_ids {tuple(segment_ids.shape)} need causal=True in linear attention")
    if log_decay is not None:
        raise ValueError("log_decay needs causal=True: decay is only defined for causal attention")
    if log_gate is not None:
        raise ValueError(f"log_gate {tuple(log_gate.shape)} needs causal=True: a gate is only defined for causal "
                         f"attention")
    return torch.einsum("bthk,bhkv->bthv", q, torch.einsum("bthk,bthv->bhkv", k, v))


def _gate_kwargs(q, log_gate):
    """{} without a gate (ungated mixers call lightning_attn as before), else {"log_gate": (B, T, H)}: the
    (B, T, H_kv) gate repeated to q's H heads as repeat_kv repeats K/V (query head i reads K/V head i // G)."""
    if log_gate is None:
        return {}
    return {"log_gate": log_gate.repeat_interleave(q.shape[2] // log_gate.shape[2], dim=2)}


def dense_attention(q, k, v, mask, scale=None):
    """Softmax attention with an explicit mask. q (B, Tq, H, d), k, v (B, Tk, H_kv, d), mask (B, Tq, Tk) bool or
    None -> (B, Tq, H, d). H_kv heads are shared by H/H_kv query heads each (GQA)."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))                          # (B, H, T, d)
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    attn_mask = None if mask is None else mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale).transpose(1, 2)


def local_softmax_attention(q, k, v, *, causal=True, scale=None, segment_ids=None):
    """Softmax attention on one process (tokens in order): q (B, T, H, d), k, v (B, T, H_kv, d) -> (B, T, H, d).

    Causal mask j ≤ i; with segment_ids (B, T), also same document. scale None = 1/√d. The tiled kernel
    (kernels.softmax_attn): no (T, T) score or mask tensor, memory linear in T.
    """
    return softmax_attn(q, k, v, causal=causal, scale=scale, segment_ids=segment_ids)


def run_linear_attention(attn_fn, q, k, v, log_decay, cache, log_gate=None, segment_ids=None):
    """Training: attn_fn(q, k, v, log_decay=..., causal=True), with log_gate=... (B, T, H_kv) added only for a
    gated mixer and segment_ids=... (B, T) only for packed documents (the state emptied at each document's first
    token), so other calls reach the engines exactly as before. Decoding (cache a dict, one document):
    lightning_attn from the cached state (B, H, d_k, d_v), storing the new final state (S_t = e^{log λ + g_t}
    S_{t−1} + k_tᵀ v_t), so a prefill continues exactly. log_decay is cast to the state dtype of q."""
    if log_decay is not None:
        log_decay = log_decay.to(state_dtype(q.dtype))
    if cache is None:
        extra = {} if log_gate is None else {"log_gate": log_gate}
        if segment_ids is not None:
            extra["segment_ids"] = segment_ids
        return attn_fn(q, k, v, log_decay=log_decay, causal=True, **extra)
    k, v, log_decay = repeat_kv(q, k, v, log_decay)
    o, cache["state"] = lightning_attn(q, k, v, log_decay=log_decay, initial_state=cache.get("state"),
                                       output_final_state=True, **_gate_kwargs(q, log_gate))
    return o


def soft_expert_gates(router, x, o):
    """Scale expert j's slice of o (B, T, N, ...) by g_j = softmax(x W_rᵀ)_j (in at least float32); no router
    (N = 1): o unchanged."""
    if router is None:
        return o
    cdt = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        g = F.linear(x.to(cdt), router.weight.to(cdt)).softmax(-1).to(o.dtype)     # (B, T, N)
    return o * g.view(*g.shape, *[1] * (o.dim() - 3))


def _transpose_heads(x, rows):
    """Heads (B, T, rows·cols, d) read as a (rows, cols) grid and transposed: head r·cols + c -> c·rows + r.
    KV sharing orders the N·H query heads (expert j, head h) as h·N + j, so that grouped heads (H_kv < H) map query
    (h, j) onto the shared k, v head of h; rows = N there, and rows = H (local heads) on the way back."""
    return x.unflatten(2, (rows, -1)).transpose(2, 3).flatten(2, 3)


def _cached_softmax_attention(q, k, v, positions, cache):
    """Decoding: append k, v (B, T, H_kv, d) and positions (B, T) to the cache; queries see keys at pos ≤ theirs."""
    for name, x in (("k", k), ("v", v), ("pos", positions)):
        cache[name] = x if name not in cache else torch.cat([cache[name], x], dim=1)
    mask = cache["pos"][:, None, :] <= positions[:, :, None]                 # (B, Tq, Tk)
    return dense_attention(q, cache["k"], cache["v"], mask)


class LinearAttention(nn.Module):
    """Linear-attention mixer of Linear-Llama3 (LASP-2 setup), no RoPE:

        q, k = φ(x W_q)/√d, φ(x W_k);  v = x W_v;  o = linear_attn(q, k, v, log_decay[, log_gate])
        out = (RMSNorm_head(o) ⊙ silu(x W_g)) W_o

    φ ∈ FEATURE_MAPS; decay "none" (λ = 1), "lightning" (TNL's per-head, per-layer ALiBi decay), "retention"
    (λ_h = 1 − 2^(−5−h)) or "gated": a data-dependent forget gate per token and head,

        g_t = logsigmoid(x_t W_f + b_f) / τ  ≤ 0   (B, T, H),   S_t = e^{g_t} S_{t−1} + k_tᵀ v_t

    as fla's SimpleGatedLinearAttention (its `gk_proj` D -> H with bias, τ = gate_logit_normalizer = 16, normal
    init and zero bias: g starts near log(1/2)/16 ≈ −0.043, a memory of ~23 tokens). We follow simple GLA rather
    than Mamba2 (g = −softplus(x W_dt + b_dt)·e^{A_log}, with the input also scaled by dt) because its q/k/v,
    per-head norm and swish output gate are exactly this mixer's, so "gated" adds one projection and nothing
    else. g ≤ 0 by construction, so the mixer makes no value check on it (which would need a device sync).
    segment_ids (B, T): packed documents, the state emptied at each one's first token. (B, T, D) -> (B, T, D).
    short_conv = w > 0: q, k, v each pass a causal depthwise convolution of width w + SiLU (ShortConvolution, fla's
    convention; one module `qkv_conv` over their concatenated channels) right after their projections, before φ;
    its taps stop at document boundaries.

    n_experts = N > 1 (see the module docstring): q_proj, g_proj (N·D, D), k_proj, v_proj (N_kv·D, D) with
    N_kv = 1 under kv_sharing else N, out_proj (D, N·D), norm.weight (N, 1, d) one per expert, router (N, D);

        A = Σ_j g_j (RMSNorm_head,j(o_j) ⊙ silu(x W_g,j)) W_o,j,   every expert with the seed's per-head decay

    A KV-sharing mixture runs its N·H query heads as groups of N on the H shared k, v heads (grouped heads in the
    LASP engines), so its states and messages are the dense mixer's size. No "gated" experts (the config refuses).
    """
    linear_attn = staticmethod(local_linear_attention)

    def __init__(self, dim, n_heads, *, feature_map="silu", decay="none", layer_idx=0, n_layers=1, eps=1e-6,
                 gate_logit_normalizer=16.0, n_experts=1, kv_sharing=False, short_conv=0):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.n_experts, self.n_kv = n_experts, 1 if kv_sharing else n_experts
        self.feature_map, self.decay = feature_map, decay
        self.layer_idx, self.n_layers = layer_idx, n_layers
        self.q_proj = nn.Linear(dim, n_experts * dim, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(dim, self.n_kv * dim, bias=False) for _ in range(2))
        self.g_proj = nn.Linear(dim, n_experts * dim, bias=False)
        self.out_proj = nn.Linear(n_experts * dim, dim, bias=False)
        self.norm = RMSNorm(self.head_dim, eps)
        if n_experts > 1:       # one head-norm weight per expert, broadcast over its heads: o (B, T, N, H, d)
            self.norm.weight = nn.Parameter(torch.empty(n_experts, 1, self.head_dim))
        # column-parallel under tensor parallelism like q/k/v (one row per head), so a rank gates its own heads
        self.forget_proj = nn.Linear(dim, n_heads) if decay == "gated" else None
        self.gate_logit_normalizer = gate_logit_normalizer
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None
        # short_conv = w > 0: causal depthwise conv + SiLU on the projected q, k, v (before φ), fla's convention,
        # as ONE convolution over their concatenated channels [q | k | v] (depthwise: the same as three), so that
        # under sequence parallelism a layer exchanges one halo each way, not three
        self.qkv_conv = ShortConvolution((n_experts + 2 * self.n_kv) * dim, short_conv) if short_conv else None

    def log_decay(self, device=None):
        """(H,) log λ ≤ 0, or None without a constant decay. A constant of the architecture, not a parameter."""
        if self.decay == "lightning":
            return lightning_log_decay(self.n_heads, self.layer_idx, self.n_layers, device)
        return retention_log_decay(self.n_heads, device) if self.decay == "retention" else None

    def log_gate(self, x):
        """(B, T, D) -> (B, T, H) g = logsigmoid(x W_f + b_f)/τ in the state dtype, or None if not gated."""
        if self.forget_proj is None:
            return None
        return F.logsigmoid(self.forget_proj(x).to(state_dtype(x.dtype))) / self.gate_logit_normalizer

    def forward(self, x, positions=None, segment_ids=None, cache=None):
        B, T, _ = x.shape
        N, phi = self.n_experts, FEATURE_MAPS[self.feature_map]
        # heads from the projection width, not n_heads: under tensor parallelism a rank holds H/tp of them
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qkv_conv is not None:
            widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
            q, k, v = self.qkv_conv(torch.cat([q, k, v], dim=-1), segment_ids, cache).split(widths, dim=-1)
        q = phi(q.view(B, T, -1, self.head_dim)) * self.head_dim ** -0.5                    # (B, T, N·H, d)
        k = phi(k.view(B, T, -1, self.head_dim))                                            # (B, T, N_kv·H, d)
        v = v.view(B, T, -1, self.head_dim)
        log_decay = self.log_decay(x.device)                     # (H,): the same per-head decay for every expert
        if log_decay is not None and self.n_kv > 1:
            log_decay = log_decay.repeat(self.n_kv)
        if self.n_kv < N:                                        # shared k, v: query (j, h) -> head h·N + j
            q = _transpose_heads(q, N)
        o = run_linear_attention(self.linear_attn, q, k, v, log_decay, cache, self.log_gate(x), segment_ids)
        if self.n_kv < N:
            o = _transpose_heads(o, o.shape[2] // N)             # back to expert-major (j, h)
        o = self.norm(o.unflatten(2, (N, -1))).flatten(3)        # (B, T, N, H·d), each expert's norm weight
        o = o * F.silu(self.g_proj(x)).view(B, T, N, -1)
        return self.out_proj(soft_expert_gates(self.router, x, o).flatten(2))


class SoftmaxAttention(nn.Module):
    """GQA softmax-attention mixer with RoPE on global positions. (B, T, D), positions (B, T) -> (B, T, D).

    segment_ids (B, T) restrict attention to the same document.

    n_experts = N > 1 (see the module docstring): q_proj (N·H·d, D); k_proj, v_proj (N_kv·H_kv·d, D), N_kv = 1
    under kv_sharing else N; out_proj (D, N·H·d); router (N, D). KV experts keep heads expert-major (query j·H + h
    reads kv head j·H_kv + h·H_kv/H); shared kv orders the queries h·N + j, so that GQA's groups of N·H/H_kv
    queries read kv head h·H_kv/H.
    """
    softmax_attn = staticmethod(local_softmax_attention)

    def __init__(self, dim, n_heads, n_kv_heads, rope_base, n_experts=1, kv_sharing=False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.n_experts, self.n_kv = n_experts, 1 if kv_sharing else n_experts
        self.rope_base = rope_base
        self.q_proj = nn.Linear(dim, n_experts * n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv * n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv * n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_experts * n_heads * self.head_dim, dim, bias=False)
        self.router = nn.Linear(dim, n_experts, bias=False) if n_experts > 1 else None

    def forward(self, x, positions, segment_ids=None, cache=None):
        B, T, _ = x.shape
        N = self.n_experts
        q = self.q_proj(x).view(B, T, -1, self.head_dim)                   # local heads (see LinearAttention)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv < N:                                                  # shared k, v: query (j, h) -> h·N + j
            q = _transpose_heads(q, N)
        if cache is None:
            o = self.softmax_attn(q, k, v, causal=True, scale=None, segment_ids=segment_ids)
        else:
            o = _cached_softmax_attention(q, k, v, positions, cache)
        if self.n_kv < N:
            o = _transpose_heads(o, o.shape[2] // N)                       # back to expert-major (j, h)
        o = o.unflatten(2, (N, -1)).flatten(3)                             # (B, T, N, H·d)
        return self.out_proj(soft_expert_gates(self.router, x, o).flatten(2))


# ---------------------------------------------------------------------------------------------- loss
def _chunk_loss(hidden, weight, labels, valid):
    """Σ over valid tokens of −log softmax(h Wᵀ)[label] for one chunk: (n, D), (V, D), (n,), (n,) -> scalar."""
    logits = (hidden @ weight.t()).to(_compute_dtype(hidden))
    losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (losses * valid).sum()


def chunked_cross_entropy(hidden, weight, labels, loss_mask=None, chunk_tokens=1024, chunk_loss=None):
    """Next-token loss without materialising all (tokens × V) logits -> (loss_sum, token_count) on local tokens.

    hidden (B, T, D); weight (V, D) the output embedding; labels (B, T), negative = ignored; loss_mask (B, T)
    bool/0-1, or None. Each chunk of `chunk_tokens` tokens is recomputed in backward (checkpointing), so at most one
    chunk's logits live at a time. The caller divides the sums over all ranks by the counts over all ranks.
    chunk_loss(hidden (n, D), weight, labels (n,), valid (n,)) -> summed loss of one chunk; None: the dense one
    (parallel/tensor.py passes a vocabulary-parallel one).
    """
    chunk_loss = chunk_loss or _chunk_loss
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must be (B, T) = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    valid = labels >= 0
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(f"loss_mask must be (B, T) = {tuple(labels.shape)}, got {tuple(loss_mask.shape)}")
        valid = valid & loss_mask.bool()
    h, y, valid = hidden.flatten(0, -2), labels.flatten(), valid.flatten()
    total = h.new_zeros((), dtype=_compute_dtype(h))
    # split, not h[start:stop]: a slice's backward writes its gradient into a zero tensor of all of h's size, so T /
    # chunk_tokens slices cost O(T² / chunk_tokens) (fwd+bwd 5.6 s against 0.5 s at 262,144 tokens, D 32, V 256, one
    # CPU process); split's backward is one cat
    for part in zip(h.split(chunk_tokens), y.split(chunk_tokens), valid.to(total.dtype).split(chunk_tokens)):
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, part[0], weight, *part[1:], use_reentrant=False)
        else:
            total = total + chunk_loss(part[0], weight, *part[1:])
    return total, valid.sum()


# ---------------------------------------------------------------------------------------------- short convolution
class ShortConvolution(nn.Module):
    """fla's ShortConvolution on (B, T, C): depthwise causal Conv1d of width w, weight (C, 1, w), no bias, SiLU.

    Training calls the function held in `short_conv`: by default the single-process op kernels.short_conv.short_conv
    (causal, taps stop at document boundaries; in kernels/ because parallel/short_conv.py runs the same math around
    its halo exchange, and parallel/ may not import models/); `lasp.apply_sequence_parallel` sets the
    sequence-parallel one, which fetches the halo (the w−1 tokens before this shard) from the rank that holds it.
    Decoding (cache a dict): the last w−1 inputs are kept in cache[cache_key] (B, w−1, C) and are the next call's
    halo, so a prefill continues exactly. Init as nn.Conv1d: U(−1/√w, 1/√w).
    """
    short_conv = staticmethod(short_conv)

    def __init__(self, channels, width, activation=True, cache_key="conv"):
        super().__init__()
        self.width, self.activation, self.cache_key = width, activation, cache_key
        self.weight = nn.Parameter(torch.empty(channels, 1, width))

    def init_weights(self):
        nn.init.uniform_(self.weight, -self.width ** -0.5, self.width ** -0.5)

    def forward(self, x, segment_ids=None, cache=None):
        if x.shape[-1] != self.weight.shape[0]:            # e.g. a tensor-parallel model: it does not split these
            raise ValueError(f"short_conv: the convolution has {self.weight.shape[0]} channels, the input "
                             f"{tuple(x.shape)} has {x.shape[-1]} (tensor parallelism does not split short_conv)")
        if cache is None:
            return self.short_conv(x, self.weight, activation=self.activation, segment_ids=segment_ids)
        halo = cache.get(self.cache_key)
        y = short_conv(x, self.weight, activation=self.activation, halo=halo)
        past = x.new_zeros(x.shape[0], self.width - 1, x.shape[-1]) if halo is None else halo
        cache[self.cache_key] = torch.cat([past, x], dim=1)[:, x.shape[1]:]     # the last w−1 inputs
        return y
