"""Model families (Linear-Llama3 pure/hybrid, with BAM's experts and parallel blocks as config fields;
TransNormerLLM; MiniMax-01; Qwen3-Next's Gated DeltaNet hybrid), their presets, a builder and checkpoint files.

A model never imports torch.distributed, parallel/ or lasp/: it mixes tokens through the `linear_attn` /
`softmax_attn` functions of its mixers, which `lasp.apply_sequence_parallel` replaces from outside.
"""
import dataclasses

import torch

from .bam import PRESETS as BAM_PRESETS
from .linear_llama import PRESETS as _LINEAR_LLAMA_PRESETS
from .linear_llama import LinearLlama, LinearLlamaConfig
from .minimax import PRESETS as MINIMAX_PRESETS
from .minimax import MiniMax, MiniMaxConfig
from .serialization import config_from_dict, config_to_dict, load_model, save_model
from .qwen3_next import PRESETS as QWEN3_NEXT_PRESETS
from .qwen3_next import Qwen3Next, Qwen3NextConfig
from .tnl import PRESETS as _TNL_PRESETS
from .tnl import TNLConfig, TransNormerLLM

__all__ = ["FAMILIES", "PRESETS", "get_config", "build_model", "save_model", "load_model", "config_to_dict",
           "config_from_dict", "LinearLlama", "LinearLlamaConfig", "TransNormerLLM", "TNLConfig",
           "BAM_PRESETS", "MINIMAX_PRESETS", "MiniMax", "MiniMaxConfig", "QWEN3_NEXT_PRESETS", "Qwen3Next",
           "Qwen3NextConfig"]

FAMILIES = {"linear-llama3": (LinearLlamaConfig, LinearLlama), "tnl": (TNLConfig, TransNormerLLM),
            "minimax": (MiniMaxConfig, MiniMax), "qwen3-next": (Qwen3NextConfig, Qwen3Next)}
PRESETS = {**_LINEAR_LLAMA_PRESETS, **_TNL_PRESETS}
# BAM (models/bam.py) is a Linear-Llama3 configuration; its presets (dense parallel-block seeds, bam-moe-tiny)
# live in BAM_PRESETS, which get_config also reads, not in PRESETS (whose closed-form parameter-count test covers
# the dense Linear-Llama3 / TNL shapes; tests/test_bam.py counts the mixtures'). MiniMax's (models/minimax.py)
# likewise live in MINIMAX_PRESETS (tests/test_minimax.py counts the published shape), and Qwen3-Next's in
# QWEN3_NEXT_PRESETS (tests/test_qwen3_next.py counts the 80B-A3B shape against transformers').


def get_config(name):
    """A fresh copy of the preset `name`. ValueError listing the presets if unknown."""
    presets = {**PRESETS, **BAM_PRESETS, **MINIMAX_PRESETS, **QWEN3_NEXT_PRESETS}
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(presets)}")
    return dataclasses.replace(presets[name])


def build_model(name_or_config, device=None):
    """Build a model from a preset name, a config, or a {"family": ..., <fields>} dict. device "meta": shapes only
    (for parameter counts or a later `to_empty` + `init_weights()`); any other device (default cpu): weights
    filled by `init_weights()`. ValueError for an unknown preset, family or field."""
    cfg = name_or_config
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    elif isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    model_cls = {config_cls: cls for config_cls, cls in FAMILIES.values()}.get(type(cfg))
    if model_cls is None:
        raise ValueError(f"expected a preset name or one of {[c.__name__ for c, _ in FAMILIES.values()]}, "
                         f"got {type(cfg).__name__}")
    device = torch.device(device or "cpu")
    with device:
        model = model_cls(cfg)
    if device.type != "meta":
        model.init_weights()
    return model
