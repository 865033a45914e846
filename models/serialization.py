"""Model checkpoint files: {"model_config": {"family": ..., <config fields>}, "model": state_dict}.

Written atomically (a temporary file in the same folder, then os.replace; removed again when the write fails), so a
crash or a full disk never leaves a torn file or a stray temporary one. Files of the former "bam" family (BAM had its
own config and block classes until it became a Linear-Llama3 configuration) are read as the same model in the
linear-llama3 family (`upgrade_payload`).

Nothing read is trusted before it is checked, and nothing is allocated before the checks: the file is opened
memory-mapped and weights-only (no tensor bytes read), the config's field types and values are checked
(`check_fields`, one table of rules for every family), every tensor must hold the bytes its shape declares (a
zero-stride / expanded tensor of a 14 KB file can declare gigabytes), its name, shape and dtype must be those of the
model its config builds (on the meta device), and the model's weights must fit the memory this process can have
(`memory_budget`); only then is the model allocated and filled.
"""
import dataclasses
import math
import os
import pickle
import resource
import typing

import torch

__all__ = ["FIELD_RULES", "check_fields", "check_config", "config_to_dict", "config_from_dict", "save_model",
           "upgrade_payload", "check_storage", "check_weights", "memory_budget", "parameter_count", "check_memory",
           "read_payload",
           "load_model_config", "load_model"]

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


# The value rules of the model fields, one line per field name, for every family (a field a family lacks is
# skipped; a new field gets its line here). Every field is also checked against its annotated type, and every float
# must be finite. (lowest, inclusive): "dim": (1, True) means dim >= 1, "norm_eps": (0, False) means norm_eps > 0.
FIELD_RULES = {
    "vocab_size": (1, True), "dim": (1, True), "n_layers": (1, True), "n_heads": (1, True), "n_kv_heads": (1, True),
    "ffn_dim": (1, True), "glu_dim": (1, True), "loss_chunk_tokens": (1, True), "n_attn_experts": (1, True),
    "n_ffn_experts": (1, True), "top_k": (1, True), "pad_token_id": (-1, True),
    "rope_base": (0, False), "norm_eps": (0, False), "init_std": (0, False), "gate_logit_normalizer": (0, False),
    "balance_loss_weight": (0, True), "z_loss_weight": (0, True),
    "short_conv": (0, True),                                                             # Linear-Llama3
    "head_dim": (1, True), "rotary_dim": (0, True),                                      # MiniMax, Qwen3-Next
    "full_attention_interval": (1, True), "partial_rotary_factor": (0, False), "linear_key_heads": (1, True),
    "linear_value_heads": (1, True), "linear_key_dim": (1, True), "linear_value_dim": (1, True),
    "conv_width": (1, True), "n_experts": (0, True), "expert_dim": (1, True), "shared_expert_dim": (1, True),
}


def _typed(name, kind, value):
    """value checked against the annotated type (an int is a float too; a bool is not an int) and FIELD_RULES.
    An annotation that is not a plain class (Optional[...], a Union) is left to the dataclass."""
    if not isinstance(kind, type):
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r} "
                         f"({type(value).__name__})")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if name in FIELD_RULES and kind in (int, float):
        low, inclusive = FIELD_RULES[name]
        if value < low or (value == low and not inclusive):
            raise ValueError(f"{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")
    return value


def check_fields(config_cls, fields):
    """{field: value} checked against config_cls's annotations and FIELD_RULES -> the typed dict (ints accepted for
    floats). ValueError naming the field: an unknown one, a wrong type (a string or a list for an int), a NaN/inf, a
    value out of its range. Run before the dataclass is built, so its __post_init__ never sees a wrong type."""
    hints = typing.get_type_hints(config_cls)
    unknown = sorted(set(fields) - set(hints))
    if unknown:
        raise ValueError(f"fields {unknown} are not fields of {config_cls.__name__}")
    return {name: _typed(name, typing.get_origin(hints[name]) or hints[name], value) for name, value in fields.items()}


def check_config(cfg):
    """ValueError naming the field when a built config breaks check_fields (e.g. after dataclasses.replace)."""
    check_fields(type(cfg), dataclasses.asdict(cfg))
    return cfg


def config_from_dict(fields):
    """Inverse of `config_to_dict`. ValueError naming the family or the fields that do not fit (check_fields)."""
    if not isinstance(fields, dict):
        raise ValueError(f"model_config must be a dict of fields, got {type(fields).__name__}")
    fields = dict(fields)
    family = fields.pop("family", None)
    if not isinstance(family, str) or family not in _families():
        raise ValueError(f"model_config family must be one of {sorted(_families())}, got {family!r}")
    config_cls = _families()[family][0]
    try:
        return config_cls(**check_fields(config_cls, fields))
    except ValueError as e:
        raise ValueError(f"model_config ({family}): {e}") from None


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
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:                     # a full disk (torch says 'basic_ios::clear'), a kill: no stray file
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _config_difference(found, expected):
    """'key=found (expected x), ...' for the fields of two config dicts that differ."""
    return ", ".join(f"{k}={found.get(k)!r} (expected {expected.get(k)!r})"
                     for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k))


def check_storage(obj, source):
    """ValueError naming `source` and the entry unless every tensor in obj (nested dicts / lists) holds the bytes its
    shape declares: no zero stride on a dimension longer than 1 (an expanded tensor), no overlapping strides, no
    storage shorter than the elements. Cheap on a memory-mapped load (headers only)."""
    stack = [("", obj)]
    while stack:
        name, x = stack.pop()
        if isinstance(x, dict):
            stack += [(f"{name}.{k}" if name else str(k), v) for k, v in x.items()]
        elif isinstance(x, (list, tuple)):
            stack += [(f"{name}[{i}]", v) for i, v in enumerate(x)]
        elif isinstance(x, torch.Tensor):
            extent = x.numel() * x.element_size()
            held = x.untyped_storage().nbytes() - x.storage_offset() * x.element_size()
            expanded = any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride()))
            if expanded or extent > held:
                raise ValueError(f"{source}: tensor {name or '(top)'} declares shape {tuple(x.shape)} (strides "
                                 f"{x.stride()}) but its storage holds {held} bytes for {extent}: an expanded or "
                                 f"overlapping tensor, refused before anything is allocated")


def check_weights(found, expected, source):
    """ValueError naming source and up to 5 entries unless `found` ({name: tensor}, e.g. read memory-mapped) has
    exactly the names, shapes and float-ness of `expected` (a model's state dict, e.g. on the meta device)."""
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise ValueError(f"{source}: the weights must be a dict of tensors, got {type(found).__name__}")
    bad = sorted(k for k in set(expected) | set(found) if k not in found or k not in expected
                 or tuple(found[k].shape) != tuple(expected[k].shape)
                 or found[k].is_floating_point() != expected[k].is_floating_point())
    if bad:
        def show(d):
            return {k: (tuple(d[k].shape), str(d[k].dtype).replace("torch.", "")) if k in d else None
                    for k in bad[:5]}
        raise ValueError(f"{source}: weights do not fit the model config ({len(bad)} entries differ); expected "
                         f"{show(expected)}, found {show(found)}")


def _cgroup_limit():
    """The memory limit of this process's cgroup (v2 memory.max or v1 limit_in_bytes) in bytes, or None."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def memory_budget(ranks_here=1, device=None):
    """-> (bytes this process can have, what limits it). On a GPU its total memory; on CPU the smallest of physical
    memory and the cgroup limit, shared by `ranks_here` processes, and this process's RLIMIT_AS / RLIMIT_DATA."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[1], f"{torch.device(device)} memory"
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_here,
               f"physical memory / {ranks_here} rank(s)" if ranks_here > 1 else "physical memory")]
    cgroup = _cgroup_limit()
    if cgroup:
        limits.append((cgroup // ranks_here, f"the cgroup limit / {ranks_here} rank(s)"))
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        soft = resource.getrlimit(getattr(resource, name))[0]
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, name))
    return min(limits)


def parameter_count(config):
    """The parameters of the model `config` builds, counted on the meta device without building all of it: the
    count is affine in n_layers (every block of a pattern period has the same shapes), so one and two periods
    are built and the rest extrapolated (a config of 100000 layers costs two small meta models)."""
    from . import build_model
    period = len(getattr(config, "pattern", "")) or 1
    def count(n_layers):
        return sum(p.numel() for p in build_model(dataclasses.replace(config, n_layers=n_layers),
                                                  device="meta").parameters())
    if config.n_layers <= 2 * period:
        return count(config.n_layers)
    one, two = count(period), count(2 * period)
    return one + (two - one) * (config.n_layers - period) // period


def check_memory(need, what, ranks_here=1, device=None):
    """ValueError naming `what` with the estimate and the budget when `need` bytes exceed memory_budget."""
    have, limit = memory_budget(ranks_here, device)
    if need > have:
        raise ValueError(f"{what} needs about {need / 2**30:.3g} GiB, more than the {have / 2**30:.3g} GiB this "
                         f"process can have ({limit}); nothing was allocated")


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
    if not isinstance(payload["model_config"], dict):
        raise ValueError(f"{path}: model_config must be a dict of fields, got {type(payload['model_config']).__name__}")
    try:
        return upgrade_payload(payload)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: a former 'bam' file whose weights do not fit its config ({e!r})") from None


def load_model_config(path):
    """The model config a save_model file describes, without reading its weights -> config. ValueError otherwise."""
    try:
        return config_from_dict(read_payload(path, mmap=True)["model_config"])
    except ValueError as e:
        raise ValueError(f"{e}" if str(path) in str(e) else f"{path}: {e}") from None


def load_model(path, *, config=None, device=None):
    """Build the model a checkpoint file describes and load its weights -> model (on `device`, default cpu).

    config: a preset name or config the checkpoint must match; ValueError naming the differing fields otherwise,
    and when the weights do not fit the config they were saved with. Everything is checked before anything is
    allocated (the module docstring): evaluate, generate and model.init_from all read model files through here.
    """
    from . import build_model, get_config
    payload = read_payload(path, mmap=True)
    try:
        found = config_from_dict(payload["model_config"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if config is not None:
        expected = get_config(config) if isinstance(config, str) else config
        if config_to_dict(found) != config_to_dict(expected):
            raise ValueError(f"checkpoint {path} holds another model config: "
                             f"{_config_difference(config_to_dict(found), config_to_dict(expected))}")
    n_params = parameter_count(found)
    check_memory(4 * n_params, f"the model of {path} ({n_params} fp32 parameters)",
                 device=device if device is not None and torch.device(device).type == "cuda" else None)
    check_storage(payload["model"], path)
    model = build_model(found, device="meta")
    check_weights(payload["model"], model.state_dict(), f"checkpoint {path}")
    model.to_empty(device=device or "cpu")
    model.load_state_dict(payload["model"])
    return model
