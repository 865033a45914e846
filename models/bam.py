"""BAM (Branch-Attend-Mix) as a configuration of Linear-Llama3's blocks, its presets, and upcycling.

A BAM model is a `LinearLlamaConfig` with (models/linear_llama.py; no family of its own):
  block      parallel_block=True: u = RMSNorm(x); y = x + A(u) + F(u)
  attention  n_attn_experts = N soft Mixture-of-Attention experts: g = softmax(u W_rᵀ) (B, T, N), A = Σ_j g_j
             Attn_j(u), run as ONE wide attention of N·H heads whose head groups are scaled by g_j before a
             concatenated output projection (common.LinearAttention / SoftmaxAttention), so the sequence-parallel
             engines run it unchanged. KV experts: own q, k, v, o; kv_sharing: own q, o, one shared k, v.
  FFN        n_ffn_experts = E top-k routed SwiGLU experts with Switch balancing and router z-losses (models/moe.py).
N = E = 1 with parallel_block=True is the dense seed: a plain Linear-Llama3 of parallel blocks. `upcycle` builds
the MoE from N seeds: FFN_i -> FFN expert i (stacked), attention_i -> attention expert i (q/k/v/gate rows and
output columns concatenated, head norms stacked), everything else averaged, routers fresh.

Shapes: heads (B, T, N·H, d) with head j·H + h for expert j, except the queries of a KV-sharing layer, ordered
h·N + j so that grouped heads map query head (h, j) onto the shared k, v head of h.
"""
import dataclasses

import torch

from .linear_llama import LinearLlamaConfig

__all__ = ["PRESETS", "ATTENTION_MODES", "upcycle"]


def _tiny(**fields):
    return LinearLlamaConfig(vocab_size=512, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=192, linear_decay="lightning",
                             loss_chunk_tokens=512, parallel_block=True, **fields)


PRESETS = {
    # dense parallel-block seeds (N = E = 1) for the upcycling recipe; `upcycle` turns N of them into an MoE
    "bam-seed-tiny": _tiny(n_layers=2, pattern="L"),
    "bam-seed-tiny-hybrid": _tiny(n_layers=4, pattern="LLLN"),
    # an MoE that trains from scratch straight from the launcher: 2 attention experts, 4 top-2 FFN experts
    "bam-moe-tiny": _tiny(n_layers=4, pattern="LLLN", n_attn_experts=2, n_ffn_experts=4, top_k=2),
}

ATTENTION_MODES = ("experts", "kv-sharing", "average")     # BAM KV experts, BAM KV sharing, BTX (averaged)


def _merge(name, cfg, parts):
    """The MoE tensor `name` of a cfg model from the N seeds' tensors at the same place (`_seed_name`)."""
    if ".mlp." in name and cfg.n_ffn_experts > 1 and ".router." not in name:
        return torch.stack(parts)                                   # (E, F, D) / (E, D, F) stacked experts
    proj = name.rsplit(".", 2)[-2]
    if ".mixer." in name and cfg.n_attn_experts > 1:
        if proj == "norm":
            return torch.stack(parts)[:, None]                      # (N, 1, d): each expert's head-norm weight
        if not (cfg.kv_sharing and proj in ("k_proj", "v_proj")):
            return torch.cat(parts, 1 if proj == "out_proj" else 0)     # q/k/v/gate rows, output columns
    return torch.stack([p.double() for p in parts]).mean(0).to(parts[0].dtype)


def _seed_name(name, cfg):
    """The dense seed's state-dict name for the MoE's `name` (stacked FFN experts are Parameters, not Linears)."""
    stacked = ".mlp." in name and cfg.n_ffn_experts > 1 and not name.endswith(".weight")
    return f"{name}.weight" if stacked else name


def _check_seed(cfg):
    if not isinstance(cfg, LinearLlamaConfig):
        raise ValueError(f"the seed is a {type(cfg).__name__} model; BAM upcycles Linear-Llama3 seeds with "
                         f"parallel-attention blocks (LinearLlamaConfig, parallel_block=True)")
    if not cfg.parallel_block:
        raise ValueError(f"the seed is a {type(cfg).__name__} model with sequential blocks (parallel_block=False); "
                         f"BAM mixes attention and FFN experts of parallel-attention blocks: train the seeds with "
                         f"parallel_block=True")
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
    `init_weights` under torch.manual_seed(router_seed); moe_fields: other LinearLlamaConfig fields of the MoE
    (e.g. normalize_top1, balance_loss_weight). ValueError for a seed that is not a dense parallel-block
    Linear-Llama3 config, fewer than 2 experts, mismatched weights, an unknown mode, or top_k > N.
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
        if ".router." not in name:
            state[name] = _merge(name, cfg, [s[_seed_name(name, cfg)] for s in expert_states])
    model.load_state_dict(state)
    return model
