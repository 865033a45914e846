"""Qwen3-Next weights and config in transformers' layout (Qwen3NextForCausalLM, transformers 5.25), both ways.

Plain dicts and tensors only: nothing here imports transformers (launch/convert.py reads and writes the folder).
Names (layer i; L = Gated DeltaNet, N = softmax; E experts, F expert width):

    here                                   transformers
    embed.weight                           model.embed_tokens.weight
    norm.weight / lm_head.weight           model.norm.weight / lm_head.weight
    layers.i.attn_norm.weight              model.layers.i.input_layernorm.weight
    layers.i.mlp_norm.weight               model.layers.i.post_attention_layernorm.weight
    L: mixer.{in_proj_qkvz, in_proj_ba,    linear_attn.{in_proj_qkvz, in_proj_ba, dt_bias, A_log, norm,
       dt_bias, A_log, norm, out_proj}        out_proj}  (same layouts)
    L: mixer.conv.weight (C, 1, w)         linear_attn.conv1d.weight
    N: mixer.{q,k,v}_proj, q_norm, k_norm  self_attn.{q,k,v}_proj, q_norm, k_norm
    N: mixer.out_proj                      self_attn.o_proj
    mlp.{gate,up,down}_proj (dense)        mlp.{gate,up,down}_proj
    mlp.experts.router.weight (E, D)       mlp.gate.weight
    mlp.experts.{gate,up}_proj (E, F, D)   mlp.experts.gate_up_proj (E, 2F, D) = [gate; up]
    mlp.experts.down_proj (E, D, F)        mlp.experts.down_proj
    mlp.shared.*, mlp.shared_gate          mlp.shared_expert.*, mlp.shared_expert_gate

What transformers' Qwen3-Next cannot express raises ValueError (a dense MLP in some layers and experts in others:
we build all-dense or all-MoE; mlp_only_layers / decoder_sparse_step other than that are refused on the way in).
Training-only fields with no transformers counterpart (z_loss_weight, loss_chunk_tokens) take defaults on the way
back.
"""
import torch

from .qwen3_next import Qwen3NextConfig

__all__ = ["MODEL_TYPE", "ARCHITECTURE", "config_to_hf", "config_from_hf", "state_to_hf", "state_from_hf"]

MODEL_TYPE = "qwen3_next"
ARCHITECTURE = "Qwen3NextForCausalLM"
_TOP = (("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
        ("lm_head.weight", "lm_head.weight"))
_BLOCK = (("attn_norm.", "input_layernorm."), ("mlp_norm.", "post_attention_layernorm."),
          ("mlp.experts.router.", "mlp.gate."), ("mlp.shared_gate.", "mlp.shared_expert_gate."),
          ("mlp.shared.", "mlp.shared_expert."))
_MIXER = {"L": (("mixer.conv.weight", "linear_attn.conv1d.weight"), ("mixer.", "linear_attn.")),
          "N": (("mixer.out_proj.", "self_attn.o_proj."), ("mixer.", "self_attn."))}


def config_to_hf(cfg):
    """Qwen3NextConfig -> transformers' config.json dict."""
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std,
        "tie_word_embeddings": False, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                            "partial_rotary_factor": cfg.partial_rotary_factor},
        "linear_conv_kernel_dim": cfg.conv_width, "linear_key_head_dim": cfg.linear_key_dim,
        "linear_value_head_dim": cfg.linear_value_dim, "linear_num_key_heads": cfg.linear_key_heads,
        "linear_num_value_heads": cfg.linear_value_heads, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_dim,
        "shared_expert_intermediate_size": cfg.shared_expert_dim, "norm_topk_prob": True,
        "router_aux_loss_coef": cfg.balance_loss_weight,
        "layer_types": ["full_attention" if k == "N" else "linear_attention" for k in cfg.layer_types()],
    }


def _field(hf, key, default=None):
    if key not in hf and default is None:
        raise ValueError(f"config.json has no {key!r} (not a Qwen3-Next config?)")
    return hf.get(key, default)


def config_from_hf(hf):
    """transformers' config.json dict -> Qwen3NextConfig. ValueError for what this family cannot express."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"config.json model_type must be {MODEL_TYPE!r}, got {hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10_000_000.0),
                                         "partial_rotary_factor": hf.get("partial_rotary_factor", 0.25)}
    n_layers, experts = _field(hf, "num_hidden_layers"), hf.get("num_experts", 0)
    if experts and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        raise ValueError("mlp_only_layers / decoder_sparse_step mix dense and expert MLPs; this family builds "
                         "every MLP alike")
    if hf.get("tie_word_embeddings") or hf.get("attention_bias"):
        raise ValueError("tied embeddings and attention biases are not part of this family")
    cfg = Qwen3NextConfig(
        vocab_size=_field(hf, "vocab_size"), dim=_field(hf, "hidden_size"), n_layers=n_layers,
        full_attention_interval=_interval(hf, n_layers), n_heads=_field(hf, "num_attention_heads"),
        n_kv_heads=_field(hf, "num_key_value_heads"), head_dim=_field(hf, "head_dim"),
        partial_rotary_factor=rope.get("partial_rotary_factor", 0.25), rope_base=float(rope["rope_theta"]),
        linear_key_heads=_field(hf, "linear_num_key_heads"), linear_value_heads=_field(hf, "linear_num_value_heads"),
        linear_key_dim=_field(hf, "linear_key_head_dim"), linear_value_dim=_field(hf, "linear_value_head_dim"),
        conv_width=_field(hf, "linear_conv_kernel_dim"), ffn_dim=_field(hf, "intermediate_size"),
        n_experts=experts, top_k=hf.get("num_experts_per_tok", 10), expert_dim=hf.get("moe_intermediate_size", 512),
        shared_expert_dim=hf.get("shared_expert_intermediate_size", 512), norm_eps=_field(hf, "rms_norm_eps"),
        init_std=hf.get("initializer_range", 0.02), balance_loss_weight=hf.get("router_aux_loss_coef", 0.001))
    if experts and not hf.get("norm_topk_prob", True):
        raise ValueError("norm_topk_prob=false: models/moe.py renormalises the top-k weights (k > 1)")
    return cfg


def _interval(hf, n_layers):
    """layer_types -> the full-attention interval p (layer i softmax iff (i + 1) % p == 0). ValueError otherwise."""
    types = hf.get("layer_types")
    if types is None:
        return hf.get("full_attention_interval", 4)
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    p = full[0] + 1 if full else n_layers + 1
    if len(types) != n_layers or [i for i in range(n_layers) if (i + 1) % p == 0] != full:
        raise ValueError(f"layer_types {types} is not one softmax layer every p layers")
    return p


def _rename(name, kinds, table):
    """One of our names -> transformers' (table = pairs (ours, theirs)) or the reverse (pairs swapped)."""
    for ours, theirs in _TOP:
        if name == table(ours, theirs)[0]:
            return table(ours, theirs)[1]
    prefix = table("layers.", "model.layers.")
    if not name.startswith(prefix[0]):
        raise ValueError(f"unexpected weight {name!r}")
    i, rest = name[len(prefix[0]):].split(".", 1)
    for ours, theirs in _MIXER[kinds[int(i)]] + _BLOCK:
        a, b = table(ours, theirs)
        if rest.startswith(a):
            return f"{prefix[1]}{i}.{b}{rest[len(a):]}"
    return f"{prefix[1]}{i}.{rest}"


def state_to_hf(cfg, state):
    """Our state dict -> transformers' (stacked experts' gate and up joined as gate_up_proj)."""
    out, kinds = {}, cfg.layer_types()
    for name, w in state.items():
        if name.endswith("mlp.experts.up_proj"):
            continue
        if name.endswith("mlp.experts.gate_proj"):
            out[_rename(name, kinds, lambda a, b: (a, b)).replace("gate_proj", "gate_up_proj")] = torch.cat(
                [w, state[name.replace("gate_proj", "up_proj")]], dim=1)
            continue
        out[_rename(name, kinds, lambda a, b: (a, b))] = w
    return out


def state_from_hf(cfg, state):
    """transformers' state dict -> ours (its gate_up_proj split; MTP weights, which it ignores too, dropped)."""
    out, kinds = {}, cfg.layer_types()
    for name, w in state.items():
        if name.startswith("mtp."):
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            base = _rename(name.replace("gate_up_proj", "gate_proj"), kinds, lambda a, b: (b, a))
            out[base], out[base.replace("gate_proj", "up_proj")] = w.chunk(2, dim=1)
            continue
        out[_rename(name, kinds, lambda a, b: (b, a))] = w
    return out
