"""MiniMax weights and config in transformers' layout (MiniMaxForCausalLM, transformers 5.25), both ways.

Plain dicts and tensors only: nothing here imports transformers (launch/convert.py reads and writes the folder).
Names (layer i; L = lightning, N = softmax; E experts, F = ffn_dim, H heads, d head_dim, D width):

    here                                   transformers
    embed.weight                           model.embed_tokens.weight
    norm.weight / lm_head.weight           model.norm.weight / lm_head.weight
    layers.i.attn_norm.weight              model.layers.i.input_layernorm.weight
    layers.i.mlp_norm.weight               model.layers.i.post_attention_layernorm.weight
    L: mixer.{q,k,v}_proj.weight (H·d, D)  self_attn.qkv_proj.weight (H·3d, D), per head [q_h; k_h; v_h]
    L: mixer.g_proj / norm / out_proj      self_attn.output_gate / norm / out_proj
    N: mixer.{q,k,v}_proj / out_proj       self_attn.{q,k,v}_proj / o_proj
    mlp.router.weight (E, D)               block_sparse_moe.gate.weight
    mlp.gate_proj[e], up_proj[e] (F, D)    block_sparse_moe.experts.e.w1.weight, .w3.weight
    mlp.down_proj[e] (D, F)                block_sparse_moe.experts.e.w2.weight

The experts are written in the Hub layout (Mixtral's names: what MiniMaxAI's -hf checkpoints hold, what servers
read, and what transformers' save_pretrained writes; its loader merges them into its in-memory
mlp.gate.weight, mlp.experts.gate_up_proj (E, 2F, D) = [gate; up] and mlp.experts.down_proj). Both layouts are
read; fused_experts=True writes the in-memory one (for load_state_dict on a live transformers model).

transformers' lightning buffers (slope_rate and the decay tables) are constants it recomputes on load; they are
neither written nor read. What transformers' MiniMax cannot express raises ValueError: partial RoPE (its MiniMax
rotates the whole head), tied embeddings, a sliding window; a lightning output-norm eps is fixed on both sides.
Training-only fields travel where transformers has them (router_aux_loss_coef); the others (z_loss_weight,
loss_chunk_tokens) ride in config.json under "lasp_training", which transformers keeps and ignores, so that
model.pt -> folder -> model.pt is the identity, config included.
"""
import torch

from .minimax import MiniMaxConfig

__all__ = ["MODEL_TYPE", "ARCHITECTURE", "config_to_hf", "config_from_hf", "state_to_hf", "state_from_hf"]

MODEL_TYPE = "minimax"
ARCHITECTURE = "MiniMaxForCausalLM"
_KINDS = {"L": "linear_attention", "N": "full_attention"}
_LETTERS = {v: k for k, v in _KINDS.items()}
# our training-only fields, kept in config.json under LASP_KEY (transformers keeps unknown keys and ignores them)
LASP_KEY, LASP_ONLY = "lasp_training", ("z_loss_weight", "loss_chunk_tokens")
BLOCK_SIZE = 256                 # transformers' lightning block length (its own chunking; no effect on the math)


def config_to_hf(cfg):
    """MiniMaxConfig -> transformers' config.json dict. ValueError for what its MiniMax cannot express."""
    if cfg.rotary_dim not in (0, cfg.head_dim):
        raise ValueError(f"rotary_dim={cfg.rotary_dim}: transformers' MiniMax rotates the whole head "
                         f"(head_dim={cfg.head_dim}); set rotary_dim=0 to convert")
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": False, "num_local_experts": cfg.n_ffn_experts, "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.balance_loss_weight, "router_jitter_noise": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "layer_types": [_KINDS[k] for k in cfg.layer_types()], "block_size": BLOCK_SIZE,
        "full_attn_alpha_factor": cfg.softmax_alpha, "full_attn_beta_factor": cfg.softmax_beta,
        "linear_attn_alpha_factor": cfg.linear_alpha, "linear_attn_beta_factor": cfg.linear_beta,
        "mlp_alpha_factor": cfg.mlp_alpha, "mlp_beta_factor": cfg.mlp_beta,
        LASP_KEY: {f: getattr(cfg, f) for f in LASP_ONLY},
    }


def _shortest_period(s):
    """The shortest p such that s is s[:p] repeated (the pattern that tiles a layer_types list)."""
    return next(s[:p] for p in range(1, len(s) + 1) if len(s) % p == 0 and s[:p] * (len(s) // p) == s)


def _check_expressible(hf):
    """ValueError naming the key for a transformers config this family cannot be."""
    if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(f"config.json model_type={hf.get('model_type')!r}, expected {MODEL_TYPE!r}")
    for key, ok in (("tie_word_embeddings", False), ("sliding_window", None), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json {key}={hf[key]!r}: only {ok!r} is supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters.rope_type={rope['rope_type']!r}: only 'default'")


def config_from_hf(hf):
    """transformers' config.json dict -> MiniMaxConfig (its defaults where a key is absent). ValueError for what
    this family cannot express."""
    _check_expressible(hf)
    n_layers, n_heads = hf.get("num_hidden_layers", 32), hf.get("num_attention_heads", 32)
    dim = hf.get("hidden_size", 4096)
    kinds = hf.get("layer_types") or ["full_attention" if (i + 1) % 2 else "linear_attention"
                                      for i in range(n_layers)]
    unknown = sorted(set(kinds) - set(_LETTERS))
    if unknown or len(kinds) != n_layers:
        raise ValueError(f"config.json layer_types must be {n_layers} of {sorted(_LETTERS)}, got {kinds}")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 1000000.0))
    return MiniMaxConfig(
        vocab_size=hf.get("vocab_size", 32000), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or dim // n_heads,
        rotary_dim=0, rope_base=float(theta), ffn_dim=hf.get("intermediate_size", 14336),
        n_ffn_experts=hf.get("num_local_experts", 8), top_k=hf.get("num_experts_per_tok", 2),
        pattern=_shortest_period("".join(_LETTERS[k] for k in kinds)),
        linear_alpha=hf.get("linear_attn_alpha_factor", 1.0), linear_beta=hf.get("linear_attn_beta_factor", 1.0),
        softmax_alpha=hf.get("full_attn_alpha_factor", 1.0), softmax_beta=hf.get("full_attn_beta_factor", 1.0),
        mlp_alpha=hf.get("mlp_alpha_factor", 1.0), mlp_beta=hf.get("mlp_beta_factor", 1.0),
        norm_eps=hf.get("rms_norm_eps", 1e-5), init_std=hf.get("initializer_range", 0.02),
        balance_loss_weight=hf.get("router_aux_loss_coef", 0.001),
        **{f: v for f, v in (hf.get(LASP_KEY) or {}).items() if f in LASP_ONLY})


# per-layer renames (ours, transformers'), by layer kind; "*" for both kinds
_COMMON = (("attn_norm.weight", "input_layernorm.weight"), ("mlp_norm.weight", "post_attention_layernorm.weight"))
_MIXER = {"L": (("g_proj.weight", "output_gate.weight"), ("norm.weight", "norm.weight"),
                ("out_proj.weight", "out_proj.weight")),
          "N": (("q_proj.weight", "q_proj.weight"), ("k_proj.weight", "k_proj.weight"),
                ("v_proj.weight", "v_proj.weight"), ("out_proj.weight", "o_proj.weight"))}
_TOP = (("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"))


def _renames(cfg):
    """[(our name, transformers' name)] of every tensor that maps one to one."""
    pairs = list(_TOP)
    for i, kind in enumerate(cfg.layer_types()):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(ours + a, theirs + b) for a, b in _COMMON]
        pairs += [(f"{ours}mixer.{a}", f"{theirs}self_attn.{b}") for a, b in _MIXER[kind]]
    return pairs


def _take(state, name):
    """state[name], or ValueError naming the missing tensor."""
    if name not in state:
        raise ValueError(f"missing tensor {name!r}")
    return state[name]


def _experts_to_hf(state, ours, theirs, n_experts, fused):
    """One layer's router and experts in transformers' names: the Hub layout, or the in-memory one (fused)."""
    gate, up, down = (_take(state, f"{ours}mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj"))
    router = _take(state, f"{ours}mlp.router.weight")
    if fused:
        return {f"{theirs}mlp.gate.weight": router, f"{theirs}mlp.experts.gate_up_proj": torch.cat([gate, up], 1),
                f"{theirs}mlp.experts.down_proj": down}
    moe = f"{theirs}block_sparse_moe."
    out = {f"{moe}gate.weight": router}
    for e in range(n_experts):
        out |= {f"{moe}experts.{e}.w1.weight": gate[e], f"{moe}experts.{e}.w3.weight": up[e],
                f"{moe}experts.{e}.w2.weight": down[e]}
    return out


def _experts_from_hf(hf_state, ours, theirs, n_experts, used):
    """One layer's router and experts from either layout -> {our name: tensor}; the names read go into `used`."""
    moe = f"{theirs}block_sparse_moe."
    if f"{moe}gate.weight" in hf_state:
        names = {"router.weight": f"{moe}gate.weight"}
        stacked = {n: torch.stack([_take(hf_state, f"{moe}experts.{e}.{w}.weight") for e in range(n_experts)])
                   for n, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}
        used.update(f"{moe}experts.{e}.{w}.weight" for e in range(n_experts) for w in ("w1", "w2", "w3"))
    else:
        names = {"router.weight": f"{theirs}mlp.gate.weight", "down_proj": f"{theirs}mlp.experts.down_proj"}
        stacked = dict(zip(("gate_proj", "up_proj"),
                           _take(hf_state, f"{theirs}mlp.experts.gate_up_proj").chunk(2, dim=1)))
        used.add(f"{theirs}mlp.experts.gate_up_proj")
    used.update(names.values())
    return {f"{ours}mlp.{n}": t for n, t in ({k: _take(hf_state, v) for k, v in names.items()} | stacked).items()}


def state_to_hf(cfg, state, fused_experts=False):
    """Our full state dict -> transformers' (the Hub layout; fused_experts: its in-memory one)."""
    out = {theirs: _take(state, ours) for ours, theirs in _renames(cfg)}
    for i, kind in enumerate(cfg.layer_types()):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out |= _experts_to_hf(state, ours, theirs, cfg.n_ffn_experts, fused_experts)
        if kind == "L":         # (H, [q, k, v], d, D): transformers splits each head's 3d outputs as q | k | v
            qkv = [_take(state, f"{ours}mixer.{p}_proj.weight").unflatten(0, (cfg.n_heads, -1)) for p in "qkv"]
            out[theirs + "self_attn.qkv_proj.weight"] = torch.stack(qkv, dim=1).flatten(0, 2)
    return out


def state_from_hf(cfg, hf_state):
    """transformers' state dict (either expert layout) -> ours. Buffers (the lightning decay tables, rotary
    inv_freq) are ignored; ValueError naming a missing tensor or ones left over."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(
        ("slope_rate", "query_decay", "key_decay", "diagonal_decay", "inv_freq"))}
    used = set()
    out = {}
    for ours, theirs in _renames(cfg):
        out[ours] = _take(hf_state, theirs)
        used.add(theirs)
    for i, kind in enumerate(cfg.layer_types()):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out |= _experts_from_hf(hf_state, ours, theirs, cfg.n_ffn_experts, used)
        if kind == "L":
            qkv = _take(hf_state, theirs + "self_attn.qkv_proj.weight").unflatten(0, (cfg.n_heads, 3, -1))
            for j, p in enumerate("qkv"):
                out[f"{ours}mixer.{p}_proj.weight"] = qkv[:, j].flatten(0, 1)
            used.add(theirs + "self_attn.qkv_proj.weight")
    left = sorted(set(hf_state) - used)
    if left:
        raise ValueError(f"tensors this MiniMax config has no place for: {left[:6]}{' ...' if len(left) > 6 else ''}")
    return {k: v.contiguous() for k, v in out.items()}
