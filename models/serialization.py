"""Model checkpoint files: {"model_config": {"family": ..., <config fields>}, "model": state_dict}.

Written atomically (a temporary file in the same folder, then os.replace), so a crash never leaves a torn file.
Files of the former "bam" family (BAM had its own config and block classes until it became a Linear-Llama3
configuration) are read as the same model in the linear-llama3 family (`upgrade_payload`).
"""
import dataclasses
import os
import pickle

import torch

__all__ = ["config_to_dict", "config_from_dict", "save_model", "upgrade_payload", "read_payload", "load_model_config",
           "load_model"]

KEYS = ("model_config", "model")


def _families():
    """{family: (config class, model class)}."""
    from . import FAMILIES  # the family table lives in models/__init__.py
    return FAMILIES


def config_to_dict(model_or_config):
    """{"family": name, **config fields} for a model or a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    family = next((name for name, (config_cls, _) in _families().items() if type(cfg) is config_cls), None)
    if family is None:
        raise ValueError(f"not a model config: {type(cfg).__name__}")
    return {"family": family, **dataclasses.asdict(cfg)}


def config_from_dict(fields):
    """Inverse of `config_to_dict`. ValueError naming the family or the fields that do not fit."""
    fields = dict(fields)
    family = fields.pop("family", None)
    if family not in _families():
        raise ValueError(f"model_config family must be one of {sorted(_families())}, got {family!r}")
    config_cls = _families()[family][0]
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise ValueError(f"model_config has fields {unknown} that {config_cls.__name__} does not know")
    return config_cls(**fields)


# former "bam" names -> Linear-Llama3's: block norm, mixer, FFN (the final `norm.` has no "layers." prefix)
_BAM_RENAMES = ((".norm.", ".attn_norm."), (".attn.", ".mixer."), (".ffn_norm.", ".mlp_norm."), (".ffn.", ".mlp."))


def _upgrade_bam_weight(name, w, fields):
    """One tensor of a former "bam" state dict -> (Linear-Llama3 name, tensor)."""
    if not name.startswith("layers."):
        return name, w
    for old, new in _BAM_RENAMES:
        if old in name:
            name = name.replace(old, new, 1)
            break
    if name.endswith(".mixer.norm_weight"):                      # (N, d) -> (d,) dense, (N, 1, d) per expert
        name = name[:-len("norm_weight")] + "norm.weight"
        w = w[0] if fields["n_attn_experts"] == 1 else w[:, None]
    elif ".mlp." in name and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") and \
            fields["n_ffn_experts"] == 1:                        # a dense seed's (1, F, D) expert axis: a SwiGLU
        name, w = f"{name}.weight", w[0]
    return name, w


def upgrade_payload(payload):
    """A {"model_config", "model"} payload of the former "bam" family -> the same model as linear-llama3 (renamed
    weights, dense seeds' FFN and head norm without their expert axis); any other payload unchanged."""
    fields = payload["model_config"]
    if not isinstance(fields, dict) or fields.get("family") != "bam":
        return payload
    fields = {**fields, "family": "linear-llama3"}
    weights = dict(_upgrade_bam_weight(k, v, fields) for k, v in payload["model"].items())
    return {**payload, "model_config": fields, "model": weights}


def save_model(path, model, state_dict=None):
    """Write {"model_config", "model"} to `path` atomically. state_dict: the weights to write instead of
    model.state_dict() (a tensor-parallel model passes its full one, parallel.tensor.full_state_dict)."""
    weights = model.state_dict() if state_dict is None else state_dict
    payload = {"model_config": config_to_dict(model), "model": weights}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _config_difference(found, expected):
    """'key=found (expected x), ...' for the fields of two config dicts that differ."""
    return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})"
                     for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k))


def read_payload(path, mmap=False):
    """The {"model_config", "model"} dict of a save_model file, read weights-only (mmap: no tensor bytes read).
    ValueError naming the file when it cannot be read or lacks either key (e.g. a training checkpoint's optim.pt)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable model file ({str(e).splitlines()[0]})") from None
    except pickle.UnpicklingError as e:   # a global outside the weights-only set: never unpickled
        raise ValueError(f"{path}: holds more than tensors and plain containers ({str(e).splitlines()[0][:200]}); "
                         f"refusing to unpickle it") from None
    if not isinstance(payload, dict) or not set(KEYS) <= set(payload):
        found = sorted(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a model checkpoint: expected keys 'model_config' and 'model', found "
                         f"{found} (a models.save_model file such as <run dir>/model.pt)")
    return upgrade_payload(payload)


def load_model_config(path):
    """The model config a save_model file describes, without reading its weights -> config. ValueError otherwise."""
    return config_from_dict(read_payload(path, mmap=True)["model_config"])


def load_model(path, *, config=None, device=None):
    """Build the model a checkpoint file describes and load its weights -> model (on `device`, default cpu).

    config: a preset name or config the checkpoint must match; ValueError naming the differing fields otherwise,
    and when the weights do not fit the config they were saved with.
    """
    from . import build_model, get_config
    payload = read_payload(path)
    found = config_from_dict(payload["model_config"])
    if config is not None:
        expected = get_config(config) if isinstance(config, str) else config
        if config_to_dict(found) != config_to_dict(expected):
            raise ValueError(f"checkpoint {path} holds another model config: "
                             f"{_config_difference(config_to_dict(found), config_to_dict(expected))}")
    model = build_model(found, device="meta")
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found_shapes = {k: tuple(v.shape) for k, v in payload["model"].items()}
    if expected_shapes != found_shapes:
        bad = sorted(k for k in set(expected_shapes) | set(found_shapes)
                     if expected_shapes.get(k) != found_shapes.get(k))
        expected_bad = {k: expected_shapes.get(k) for k in bad[:5]}
        found_bad = {k: found_shapes.get(k) for k in bad[:5]}
        raise ValueError(f"checkpoint {path}: weights do not fit its model_config; expected shapes {expected_bad}, "
                         f"found {found_bad}")
    model.to_empty(device=device or "cpu")
    model.load_state_dict(payload["model"])
    return model
