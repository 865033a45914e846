"""The pretraining configuration: nested dataclasses, TOML presets, `--section.key value` overrides, validation.

Precedence: dataclass defaults < the TOML file (`--config`, default launch/configs/default.toml) < the command
line. Every field of every section gets a generated flag `--section.key`; a few common ones have a short alias
(`--model`, `--sp`, `--zero`, `--max-steps`, `--run-dir`, `--resume`). Unknown TOML keys, bad types and values
that cannot work raise ValueError naming the key (main() maps it to exit code 2).

The model's own fields are those of the preset's config dataclass (models.get_config): `n_layers = 8` under
[model] in TOML, `--model.n_layers 8` on the command line, typed by the dataclass and checked by its
__post_init__; cfg.model.arch holds the result. The preset is read first (TOML model.preset, then --model /
--model.preset), so the parser has one flag per field of that family with its help (add_model_flags: every entry
point, bench, plan_memory and mqar included, gets its model flags from it).
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lasp.models.serialization import check_fields, check_memory

__all__ = ["ModelConfig", "ParallelConfig", "OptimConfig", "DataConfig", "CheckpointConfig", "RunConfig",
           "TrainConfig", "CONFIG_DIR", "DEFAULT_CONFIG", "SHORTCUTS", "build_parser", "parse_args", "load_toml",
           "merge", "check_config", "OPTIM_BOUNDS", "preset_config", "add_model_flags", "model_flags",
           "preset_from_argv", "model_arch", "model_changes", "parse_model_args", "add_section_flags", "config_errors",
           "RESUME_CHANGES", "run_model_config", "estimate_memory"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"


@dataclass
class ModelConfig:
    preset: str = "linear-llama3-tiny"  # a models.get_config name; its family's fields are the --model.<field> flags
    init_from: str = ""  # a model file (models.save_model, launch/upcycle.py) whose config and weights start the run
    # The preset's config dataclass with the TOML [model] fields and --model.<field> flags applied (merge sets it;
    # no flag of its own). Its vocab_size stays the preset's: launch.engine.model_config puts data.vocab_size in.
    arch: typing.Any = field(default=None, metadata={"flags": "add_model_flags"})

    def __post_init__(self):
        if self.arch is None:
            self.arch = preset_config(self.preset)


@dataclass
class ParallelConfig:
    sp: int = 1                       # sequence-parallel ranks per sequence; data-parallel size = world / (sp·tp)
    tp: int = 1                       # tensor-parallel ranks: heads, MLP channels, vocabulary (parallel/tensor.py)
    ep: int = 1                       # expert-parallel ranks (within dp·sp): routed FFN experts (parallel/experts.py)
    layout: str = "contiguous"        # "contiguous" | "zigzag" (parallel/layout.py)
    linear: str = "lasp2"             # linear-attention engine (lasp.LINEAR_ENGINES)
    softmax: str = "allgather"        # softmax-attention engine (lasp.SOFTMAX_ENGINES)
    zero: int = 0                     # 0: DDP; 1-3: DeepSpeed ZeRO stage
    activation_checkpointing: bool = True  # recompute each block in backward


@dataclass
class OptimConfig:
    lr: float = 3e-3                  # peak learning rate (AdamW)
    min_lr: float = 3e-4              # cosine decay ends here at max_steps
    warmup_steps: int = 20            # linear warm-up from 0
    max_steps: int = 200              # optimizer steps of the whole run
    weight_decay: float = 0.1         # on matrices only (not norms)
    beta1: float = 0.9                # AdamW betas and eps
    beta2: float = 0.95               # AdamW
    eps: float = 1e-8                 # AdamW
    grad_clip: float = 1.0            # max global grad norm; 0 = off


@dataclass
class DataConfig:
    corpus: list = field(default_factory=list)  # .txt / .jsonl (.gz) files or folders; [] = embedded Shakespeare
    text_key: str = "text"            # the field of a jsonl line holding the document
    vocab_size: int = 1024            # sentencepiece vocabulary, trained on the corpus on first use
    seq_len: int = 256                # tokens per packed sequence (the global length, split over sp ranks)
    batch_size: int = 4               # sequences per data-parallel rank and step
    seed: int = 0                     # shuffles the packed sequences, one permutation per epoch
    cache_dir: str = "~/.cache/lasp"  # tokenizer + token cache, keyed by corpus content and vocabulary
    mqar: dict = field(default_factory=dict)  # {} = the corpus; {"kv_pairs": 16} = synthetic recall (launch/mqar.py)
    prepared: str = ""                # a folder from python -m lasp.launch.prepare_data (instead of corpus)
    indexed: list = field(default_factory=list)  # Megatron <prefix>.bin/.idx datasets, concatenated (vocab_size!)
    tokenizer: str = ""               # a sentencepiece .model: tokenizes the corpus / decodes samples of indexed data
    inline_max_mb: int = 64           # a larger corpus is refused: prepare it with launch/prepare_data.py first


@dataclass
class CheckpointConfig:
    every: int = 100                  # steps between checkpoints (0: only at the end and at SIGTERM)
    keep: int = 2                     # newest checkpoints kept
    resume: bool = False              # continue from the newest checkpoint in dir (a fresh start if none)
    dir: str = ""                     # "" = <run.dir>/checkpoints
    allow_changes: list = field(default_factory=list)  # keys a --resume may change: model.<field>, data.seq_len, ...


@dataclass
class RunConfig:
    dir: str = "runs/default"         # metrics.jsonl, loss.png, model.pt, tokenizer.model, checkpoints/
    seed: int = 0                     # model initialisation
    dtype: str = "auto"               # "auto" (bf16 autocast on GPU, fp32 on CPU) | "fp32" | "bf16"
    progress: bool = True             # tqdm bar on rank 0
    peak_flops: float = 0.0           # the job's peak FLOP/s for MFU; 0 = assumed (docs/launch.md)
    wandb_project: str = ""           # "" = no wandb
    wandb_mode: str = "offline"       # "online" | "offline" | "disabled"
    sample_tokens: int = 48           # tokens generated after training (0 = none)
    sample_prompt: str = ""           # "" = the start of the first held-out document of the run's corpus


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


# alias flag -> (section.key, argparse kwargs)
SHORTCUTS = {
    "--model": ("model.preset", dict(metavar="PRESET", help="model preset (models.PRESETS)")),
    "--sp": ("parallel.sp", dict(type=int, metavar="N", help="sequence-parallel size; dp = world / (sp·tp)")),
    "--tp": ("parallel.tp", dict(type=int, metavar="N", help="tensor-parallel size; dp = world / (sp·tp)")),
    "--ep": ("parallel.ep", dict(type=int, metavar="N", help="expert-parallel size, dividing dp·sp (MoE models)")),
    "--zero": ("parallel.zero", dict(type=int, metavar="N", help="DeepSpeed ZeRO stage 1-3 (0: DDP)")),
    "--max-steps": ("optim.max_steps", dict(type=int, metavar="N")),
    "--run-dir": ("run.dir", dict(metavar="DIR")),
    "--resume": ("checkpoint.resume", dict(action="store_const", const=True,
                                           help="continue from the newest checkpoint (fresh start if none)")),
}


def _sections():
    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_json_table(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"kv_pairs\": 16}}': {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _flag_kwargs(kind):
    """argparse kwargs for a field of type `kind` (int, float, str, bool, list of str, dict)."""
    if kind is bool:
        return dict(type=_parse_bool, metavar="BOOL")
    if kind is list:
        return dict(nargs="*", metavar="PATH")
    if kind is dict:
        return dict(type=_parse_json_table, metavar="JSON")
    return dict(type=kind, metavar=kind.__name__.upper())


def _field_help(cls):
    """{field: its trailing comment in the dataclass source (a subclass's over its bases')}: the flags' help."""
    helps = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        lines = inspect.getsource(base).splitlines()
        helps.update({m[1]: m[2] for m in (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for line in lines) if m})
    return helps


# ---------------------------------------------------------------------------------------------- model fields
OVERRIDES_GONE = ("there is no overrides table any more: write the model's fields directly, e.g. --model.n_layers 8 "
                  "on the command line or n_layers = 8 under [model] in TOML")
VOCAB_FROM_DATA = "the vocabulary comes from data.vocab_size (the tokenizer's); set that instead"


def preset_config(preset):
    """A fresh copy of the preset's config dataclass; ValueError naming model.preset if unknown."""
    from lasp import models
    try:
        return models.get_config(preset)
    except ValueError as e:
        raise ValueError(f"model.preset: {e}") from None


def _model_field_types(cls):
    """{field: type} of a family's config dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_origin(hints[f.name]) or hints[f.name] for f in dataclasses.fields(cls)}


def add_model_flags(parser, preset, skip=(), base=None):
    """One typed `--model.<field>` flag per field of the preset's config dataclass (help: the field's comment and
    its value in `base`, default the preset), except `skip`. A given flag lands in dest "model.<field>"; read them
    with model_flags. Every entry point calls this, so a field added to a family's dataclass is a flag everywhere.
    ValueError for an unknown preset."""
    base = preset_config(preset) if base is None else base
    helps = _field_help(type(base))
    group = parser.add_argument_group(f"model fields ({type(base).__name__}, preset {preset}; pick another family's "
                                      f"fields with the preset)")
    for name, kind in _model_field_types(type(base)).items():
        if name in skip:
            continue
        text = " ".join(filter(None, [helps.get(name), f"(default: {getattr(base, name)!r})"])).replace("%", "%%")
        group.add_argument(f"--model.{name}", dest=f"model.{name}", default=argparse.SUPPRESS, help=text,
                           **_flag_kwargs(kind))
    return group


def model_flags(args):
    """{field: value} of the --model.<field> flags given on the command line (argparse namespace or dict)."""
    args = args if isinstance(args, dict) else vars(args)
    plain = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k.partition(".")[2]: v for k, v in args.items() if k.startswith("model.") and k[6:] not in plain}


def preset_from_argv(argv, flags, default, refused=("--model.overrides",)):
    """The preset named by `flags` in argv (the first stage: it picks which --model.<field> flags exist).
    ValueError for a `refused` flag, saying what to write instead."""
    words = {"--model.overrides": OVERRIDES_GONE, "--model.vocab_size": VOCAB_FROM_DATA}
    for flag in (arg.partition("=")[0] for arg in (sys.argv[1:] if argv is None else argv)):
        if flag in refused:
            raise ValueError(f"{flag}: {words[flag]}")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(*flags, dest="preset", default=default)
    return pre.parse_known_args(argv)[0].preset


def model_arch(preset, changes, source="the command line", base=None):
    """The preset's config dataclass (or `base`, one of its family) with `changes` {field: value} applied, each
    checked against its field type. ValueError naming the key: an unknown preset or field, `overrides` (gone:
    fields are written directly), a wrong type, or a value the dataclass's own __post_init__ refuses."""
    base = preset_config(preset) if base is None else base
    kinds = _model_field_types(type(base))
    if "overrides" in changes:
        raise ValueError(f"model.overrides in {source}: {OVERRIDES_GONE}")
    unknown = sorted(set(changes) - set(kinds))
    if unknown:
        raise ValueError(f"unknown model fields {unknown} for preset {preset!r} ({source}): "
                         f"{type(base).__name__} has {sorted(kinds)}")
    typed = {name: _coerce(f"model.{name}", kinds[name], value) for name, value in changes.items()}
    try:
        check_fields(type(base), {**dataclasses.asdict(base), **typed})    # the rules of every model field
    except ValueError as e:
        raise ValueError(f"model.{e} ({source})") from None
    try:
        return dataclasses.replace(base, **typed)
    except (TypeError, ValueError) as e:
        values = ", ".join(f"model.{k}={v!r}" for k, v in typed.items())
        raise ValueError(f"{values} ({source}) do not fit preset {preset!r}: {e}") from None


def model_changes(cfg_model):
    """{field: value} of cfg_model.arch that differ from its preset's (for labels and JSON records). ValueError if
    the arch is of another family than the preset (set cfg.model.preset through merge, which rebuilds it)."""
    base = preset_config(cfg_model.preset)
    if type(cfg_model.arch) is not type(base):
        raise ValueError(f"model.arch is a {type(cfg_model.arch).__name__}, preset {cfg_model.preset!r} is a "
                         f"{type(base).__name__}: set the preset through merge or the command line")
    return {f.name: getattr(cfg_model.arch, f.name) for f in dataclasses.fields(base)
            if getattr(cfg_model.arch, f.name) != getattr(base, f.name)}


def parse_model_args(parser, argv=None, default="linear-llama3-tiny", skip=(), flags=("--preset",)):
    """parser.parse_args(argv) plus the preset flag (`flags`: "--preset", or pretrain's "--model" with "--preset" as
    an alias) and its family's --model.<field> flags (two stages: the preset first). -> args with args.preset and
    args.model = ModelConfig(preset, arch=typed config); parser.error (exit 2) for an unknown preset or field or a
    value the config refuses."""
    parser.add_argument(*flags, dest="preset", default=default, metavar="PRESET",
                        help=f"model preset (models.get_config; default {default}); its fields are the --model.* flags")
    try:
        preset = preset_from_argv(argv, flags, default)
        add_model_flags(parser, preset, skip)
        args = parser.parse_args(argv)
        if args.preset != preset:                          # an abbreviation argparse took that the first stage did not
            raise ValueError(f"write {flags[0]} {args.preset} in full (it chooses the --model.* flags)")
        args.model = ModelConfig(preset=preset, arch=model_arch(preset, model_flags(args)))
    except ValueError as e:
        parser.error(str(e))
    return args


def _plain_fields(cls):
    """{name: field} of a section's own keys (ModelConfig.arch's are the model fields, see add_model_flags)."""
    return {f.name: f for f in dataclasses.fields(cls) if "flags" not in f.metadata}


def build_parser(preset=ModelConfig.preset):
    """The command line: --config, --dry-run, the shortcuts, one --section.key per dataclass field and one typed
    --model.<field> per field of the preset's family (data.vocab_size sets the model's vocabulary)."""
    p = argparse.ArgumentParser(prog="launch/pretrain.py", allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                description="Pretrain a linear-attention / hybrid LLM (see docs/launch.md).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML file (default: launch/configs/default.toml)")
    p.add_argument("--dry-run", action="store_true", default=False,
                   help="check the environment, config, corpus and rank layout, print every problem or the mesh, "
                        "start nothing (under torchrun: for its world size)")
    p.add_argument("--world-size", "--nproc", dest="world_size", type=int, default=None, metavar="N",
                   help="with --dry-run outside torchrun: check the run for N ranks (default 1)")
    for flag, (dest, kwargs) in SHORTCUTS.items():
        p.add_argument(flag, dest=dest, **kwargs)
    for section, cls in _sections().items():
        group, helps = p.add_argument_group(section), _field_help(cls)
        for f in _plain_fields(cls).values():
            kind = typing.get_origin(f.type) or f.type
            group.add_argument(f"--{section}.{f.name}", dest=f"{section}.{f.name}", help=helps.get(f.name),
                               **_flag_kwargs(kind))
    add_model_flags(p, preset, skip=("vocab_size",))
    return p


def add_section_flags(parser, section, names, aliases=None):
    """pretrain's `--<section>.<name>` flags for the given fields of one section, typed and helped the same way
    (dest "<section>.<name>", absent unless given), plus `aliases` {name: [older flags]}: another entry point that
    takes some of pretrain's settings (evaluate's --data.*) uses the same names."""
    cls, aliases = _sections()[section], aliases or {}
    fields, helps = _plain_fields(cls), _field_help(cls)
    group = parser.add_argument_group(f"{section} (the names pretrain takes)")
    for name in names:
        kind = typing.get_origin(fields[name].type) or fields[name].type
        group.add_argument(f"--{section}.{name}", *aliases.get(name, ()), dest=f"{section}.{name}",
                           default=argparse.SUPPRESS, help=helps.get(name), **_flag_kwargs(kind))
    return group


def _coerce(key, kind, value):
    """A TOML or command-line value checked against the field type (int -> float allowed)."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, str):
        return [value]
    if kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {key!r} must be {kind.__name__}, got {value!r}")


def merge(cfg, updates, source):
    """Apply {"section.key": value} or {section: {key: value}} to cfg in place; ValueError on unknown keys.

    A model key other than preset / init_from is a field of the preset's config dataclass: cfg.model.arch is
    rebuilt from the (new) preset with the fields changed so far, then these, typed by the dataclass."""
    flat = {}
    for key, value in updates.items():
        if isinstance(value, dict) and key in _sections():
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    earlier, model_fields, preset_before = model_changes(cfg.model), {}, cfg.model.preset
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if section not in _sections():
            raise ValueError(f"unknown config section {section!r} in {source}; expected one of {list(_sections())}")
        fields = _plain_fields(_sections()[section])
        if section == "model" and name not in fields:
            model_fields[name] = value
            continue
        if name not in fields:
            raise ValueError(f"unknown config key {key!r} in {source}; {section} has {sorted(fields)}")
        kind = typing.get_origin(fields[name].type) or fields[name].type
        setattr(getattr(cfg, section), name, _coerce(key, kind, value))
    if "vocab_size" in model_fields:
        raise ValueError(f"model.vocab_size in {source}: {VOCAB_FROM_DATA}")
    if cfg.model.preset == preset_before and model_fields:
        cfg.model.arch = model_arch(cfg.model.preset, model_fields, source, base=cfg.model.arch)
    elif cfg.model.preset != preset_before:              # a new preset: the fields set so far carry over
        note = f", on top of the fields {sorted(earlier)} set before for preset {preset_before!r}" if earlier else ""
        cfg.model.arch = model_arch(cfg.model.preset, {**earlier, **model_fields}, source + note)
    return cfg


def load_toml(path):
    """The TOML file as nested dicts; ValueError naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        presets = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
        raise ValueError(f"config file {path} does not exist (presets in launch/configs: {presets})")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def _resolve_config_path(name):
    """A path, or a preset name from launch/configs ("tiny" or "tiny.toml")."""
    path = Path(name)
    if path.exists() or path.parent != Path("."):
        return path
    return CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")


def parse_args(argv=None):
    """-> (TrainConfig, dry_run): dry_run is False, or {"world_size": --world-size or None} for --dry-run.
    argparse exits with code 2 for unknown flags; ValueError for bad config."""
    config_path = preset_from_argv(argv, ("--config",), str(DEFAULT_CONFIG))
    toml = load_toml(_resolve_config_path(config_path))
    section = toml.get("model") if isinstance(toml.get("model"), dict) else {}
    preset = preset_from_argv(argv, ("--model", "--model.preset"), section.get("preset", ModelConfig.preset),
                              refused=("--model.overrides", "--model.vocab_size"))
    args = vars(build_parser(preset).parse_args(argv))
    config_path, dry_run, world_size = args.pop("config"), args.pop("dry_run"), args.pop("world_size")
    if world_size is not None and not dry_run:
        raise ValueError(f"--world-size {world_size} goes with --dry-run (a run's world size is torchrun's: "
                         f"--nproc-per-node x nodes)")
    cfg = TrainConfig()
    merge(cfg, toml, config_path)
    merge(cfg, args, "the command line")
    return cfg, dry_run and {"world_size": world_size}


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


# What --checkpoint.allow_changes may name: a resume refuses a change of these unless named there (the model's
# fields as model.<field>); the ZeRO stage and, under ZeRO, the world size cannot change at all.
RESUME_CHANGES = ("data.corpus", "data.seq_len", "data.batch_size", "parallel.dp", "optim.lr", "optim.min_lr",
                  "optim.warmup_steps")


def _check_allow_changes(cfg):
    fields = {f.name for f in dataclasses.fields(cfg.model.arch)}
    bad = [k for k in cfg.checkpoint.allow_changes
           if k not in RESUME_CHANGES and not (k.startswith("model.") and k[6:] in fields)]
    if bad:
        raise ValueError(f"checkpoint.allow_changes: {bad} cannot be allowed; it takes keys of {list(RESUME_CHANGES)} "
                         f"and model.<field> ({type(cfg.model.arch).__name__} fields); optim.max_steps needs no "
                         f"permission (the schedule continues smoothly, docs/launch.md)")


def _check_positive(cfg):
    """Every count at its minimum and run.peak_flops finite: one message naming each key that is not."""
    bad = []
    for key, minimum in (("optim.max_steps", 1), ("optim.warmup_steps", 0), ("data.vocab_size", 16),
                         ("data.seq_len", 2), ("data.batch_size", 1), ("checkpoint.every", 0),
                         ("checkpoint.keep", 1), ("run.sample_tokens", 0), ("parallel.sp", 1),
                         ("parallel.tp", 1), ("parallel.ep", 1)):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < minimum:
            bad.append(f"{key} must be >= {minimum}, got {getattr(getattr(cfg, section), name)}")
    peak_flops = cfg.run.peak_flops
    if not (math.isfinite(peak_flops) and peak_flops >= 0):
        bad.append(f"run.peak_flops must be a finite number >= 0, got {peak_flops}")
    if bad:
        raise ValueError("; ".join(bad))


# Bounds of the optimizer values (docs/launch.md), closed intervals. AdamW moves each weight by about
# lr per step, so a learning rate above 1 is never meant; betas are averaging factors in [0, 1); eps keeps the
# update's denominator away from 0; decay and clipping beyond these are typos, not settings.
OPTIM_BOUNDS = {"lr": (0.0, 1.0), "min_lr": (0.0, 1.0), "weight_decay": (0.0, 1.0), "beta1": (0.0, 0.999999),
                "beta2": (0.0, 0.999999), "eps": (1e-30, 1.0), "grad_clip": (0.0, 1e6)}


def _check_optim(optim):
    """Finite and within OPTIM_BOUNDS: one message naming each key that is not."""
    bad = [f"optim.{name} must be a finite number in [{lo:g}, {hi:g}], got {getattr(optim, name)}"
           for name, (lo, hi) in OPTIM_BOUNDS.items()
           if not (math.isfinite(getattr(optim, name)) and lo <= getattr(optim, name) <= hi)]
    if bad:
        raise ValueError("; ".join(bad))


def _meta_model(cfg):
    """The run's model on the meta device (shapes only), for the parallelism checks."""
    from lasp import models
    from lasp.launch.engine import model_config
    return models.build_model(model_config(cfg.model, cfg.data.vocab_size), device="meta")


def _check_tensor_parallel(cfg):
    """parallel.tp against the model's heads, KV heads and MLP width (on the meta device) and the engine."""
    from lasp.parallel.tensor import check_tensor_parallel
    tp = cfg.parallel.tp
    try:
        check_tensor_parallel(_meta_model(cfg), tp)
    except ValueError as e:
        raise ValueError(f"parallel.tp={tp} does not fit model.preset {cfg.model.preset!r}: {e}") from None


def _check_expert_parallel(cfg):
    """parallel.ep against the model's routed experts (on the meta device) and the engine (DDP only)."""
    from lasp.parallel.experts import check_expert_parallel
    ep = cfg.parallel.ep
    if cfg.parallel.zero:
        raise ValueError(f"parallel.zero={cfg.parallel.zero} needs parallel.ep=1 (got {ep}): expert parallelism "
                         f"runs with DDP (--zero 0), which reduces the expert shards over their own group")
    try:
        check_expert_parallel(_meta_model(cfg), ep)
    except ValueError as e:
        raise ValueError(f"parallel.ep={ep} does not fit model.preset {cfg.model.preset!r}: {e}") from None


def _check_init_from(path, vocab_size):
    """A models.save_model file (its config read without its weights) with the tokenizer's vocabulary -> config."""
    from lasp.models.serialization import load_model_config
    if not Path(path).is_file():
        raise ValueError(f"model.init_from: no such file {path!r} (a models.save_model file)")
    try:
        found = load_model_config(path)
    except ValueError as e:
        raise ValueError(f"model.init_from: {e}") from None
    if found.vocab_size != vocab_size:
        raise ValueError(f"model.init_from: {path} has vocabulary {found.vocab_size}, data.vocab_size is "
                         f"{vocab_size}: train with --data.vocab_size {found.vocab_size} on the corpus it was "
                         f"trained on")
    return found


def run_model_config(cfg):
    """The config of the model the run trains: model.init_from's (read without its weights) or the preset's fields
    with data.vocab_size."""
    from lasp.launch.engine import model_config
    if cfg.model.init_from:
        return _check_init_from(cfg.model.init_from, cfg.data.vocab_size)
    return model_config(cfg.model, cfg.data.vocab_size)


def estimate_memory(cfg, arch, world_size, cuda=False):
    """The memory planner's estimate of one rank's peak (parallel.memory.plan: weights, gradients, AdamW, buffers,
    activations) for this run, in bytes. plan is affine in n_layers (blocks of one pattern period repeat), so it
    runs on one and two periods and the rest is extrapolated: no meta model of all layers is built."""
    from lasp.parallel.memory import plan
    p, d = cfg.parallel, cfg.data
    dtype = "bf16" if cfg.run.dtype == "bf16" or (cfg.run.dtype == "auto" and cuda) else "fp32"

    def total(n_layers):
        return plan(dataclasses.replace(arch, n_layers=n_layers), d.seq_len, sp=p.sp, dp=world_size // (p.sp * p.tp),
                    tp=p.tp, zero=p.zero, checkpointing=p.activation_checkpointing, batch=d.batch_size, dtype=dtype,
                    linear=p.linear, softmax=p.softmax, kernel="triton" if cuda else "torch", layout=p.layout)["total"]
    period = len(getattr(arch, "pattern", "")) or 1
    if arch.n_layers <= 2 * period:
        return total(arch.n_layers)
    one, two = total(period), total(2 * period)
    return one + (two - one) * (arch.n_layers - period) / period


def _check_memory(cfg, arch, world_size, ranks_here):
    """The estimate against the memory one rank can have (models.serialization.memory_budget: the GPU's, or this
    machine's shared by its ranks and the process limits): ValueError naming the keys that size it."""
    import torch
    from lasp.models.serialization import parameter_count
    cuda = torch.cuda.is_available()
    source = "the estimate of parallel/memory.py per rank"
    try:
        need = estimate_memory(cfg, arch, world_size, cuda)
    except (KeyError, AssertionError, AttributeError, NotImplementedError, RuntimeError) as e:
        # a model the planner cannot probe (e.g. MoE blocks: their autocast fails on the meta device): a lower
        # bound, the weights, gradients and AdamW moments (16 bytes a parameter) and the block inputs that
        # activation checkpointing keeps (n_layers · B · C · D fp32), which still stops sizes no machine holds
        tokens = cfg.data.batch_size * cfg.data.seq_len // cfg.parallel.sp
        need = 16 * parameter_count(arch) / cfg.parallel.tp + arch.n_layers * tokens * arch.dim * 4
        source = "a lower bound per rank: the planner cannot probe this model"
        if os.environ.get("RANK", "0") == "0":
            print(f"note: the memory planner cannot estimate this model ({e!r}); checked a lower bound (weights, "
                  f"optimizer state, block inputs)", file=sys.stderr)
    d, m = cfg.data, arch
    check_memory(need, f"this run (data.seq_len={d.seq_len}, data.batch_size={d.batch_size}, data.vocab_size="
                       f"{m.vocab_size}, model.dim={m.dim}, model.n_layers={m.n_layers}; parallel.sp="
                       f"{cfg.parallel.sp}, "
                       f"tp={cfg.parallel.tp}, zero={cfg.parallel.zero}; {source})",
                 ranks_here, torch.device("cuda") if cuda else None)


def _check_mqar(cfg):
    """data.mqar: the task fits data.seq_len and data.vocab_size; no tokenizer, so no text sample."""
    from lasp.launch.data import check_mqar
    check_mqar(cfg.data.mqar, cfg.data.seq_len, cfg.data.vocab_size)
    if cfg.run.sample_tokens:
        raise ValueError(f"data.mqar trains on synthetic tokens without a tokenizer: set run.sample_tokens = 0 "
                         f"(got {cfg.run.sample_tokens})")


def _check_data_source(cfg):
    """One of data.corpus / prepared / indexed / mqar; indexed data has no tokenizer unless data.tokenizer names one,
    so no text sample without it."""
    given = [key for key in ("corpus", "prepared", "indexed", "mqar") if getattr(cfg.data, key)]
    if len(given) > 1:
        raise ValueError(f"data: choose one of data.corpus, data.prepared, data.indexed, data.mqar (got "
                         f"{', '.join('data.' + k for k in given)})")
    if cfg.data.tokenizer and (cfg.data.prepared or cfg.data.mqar):
        raise ValueError(f"data.tokenizer is for data.corpus or data.indexed: "
                         f"{'a prepared folder has its own tokenizer.model' if cfg.data.prepared else 'MQAR has none'}")
    if cfg.data.inline_max_mb < 0:
        raise ValueError(f"data.inline_max_mb must be >= 0, got {cfg.data.inline_max_mb}")
    if cfg.data.indexed and not cfg.data.tokenizer and cfg.run.sample_tokens:
        raise ValueError(f"data.indexed has no tokenizer to decode a text sample: give data.tokenizer (a sentencepiece "
                         f".model) or set run.sample_tokens = 0 (got {cfg.run.sample_tokens})")


def _check_mesh(cfg, world_size):
    """Engines, world size against sp·tp·ep, seq_len against sp: one message with the values. (The layout's split
    of seq_len, which allocates positions, runs after the memory check: _check_layout.)"""
    from lasp.apply import resolve_engines
    from lasp.parallel.mesh import check_mesh_sizes
    p = cfg.parallel
    try:
        resolve_engines(p.linear, p.softmax, p.layout)
        check_mesh_sizes(world_size, p.sp, p.tp, p.ep)
        if cfg.data.seq_len % p.sp:
            raise ValueError(f"data.seq_len {cfg.data.seq_len} is not divisible by sp={p.sp}")
    except ValueError as e:
        raise ValueError(f"parallel/data: {e} ({_where(cfg, world_size)})") from None


def _check_layout(cfg, world_size):
    from lasp.parallel.layout import local_positions
    try:
        local_positions(cfg.data.seq_len, cfg.parallel.layout, 0, cfg.parallel.sp)
    except ValueError as e:
        raise ValueError(f"parallel/data: {e} ({_where(cfg, world_size)})") from None


def _check_conv_halo(cfg, arch):
    """A short convolution's halo (its w − 1 earlier tokens) comes from the one segment before: each layout
    segment (seq_len / (sp · segments per rank) tokens) must hold at least w − 1 tokens."""
    from lasp.parallel.layout import segments_per_rank
    key, w = next(((k, getattr(arch, k)) for k in ("short_conv", "conv_width") if getattr(arch, k, 0)), (None, 0))
    segment = cfg.data.seq_len // (cfg.parallel.sp * segments_per_rank(cfg.parallel.layout))
    if cfg.parallel.sp > 1 and w > 1 and segment < w - 1:
        raise ValueError(f"model.{key}={w} needs segments of at least {w - 1} tokens under sequence parallelism, "
                         f"got {segment} (data.seq_len={cfg.data.seq_len}, parallel.sp={cfg.parallel.sp}, "
                         f"parallel.layout={cfg.parallel.layout!r}): raise data.seq_len or lower parallel.sp")


def _where(cfg, world_size):
    p = cfg.parallel
    return (f"parallel.sp={p.sp}, parallel.tp={p.tp}, parallel.ep={p.ep}, world size {world_size}, "
            f"data.seq_len={cfg.data.seq_len}, parallel.layout={p.layout!r}")


def _check_model_fields(cfg):
    try:
        check_fields(type(cfg.model.arch), dataclasses.asdict(cfg.model.arch))
    except ValueError as e:
        raise ValueError(f"model.{e}") from None


def _check_run_dir(cfg):
    if os.path.exists(cfg.run.dir) and not os.path.isdir(cfg.run.dir):
        raise ValueError(f"run.dir {cfg.run.dir!r} exists and is not a folder")


def config_errors(cfg, world_size, ranks_here=None):
    """Every problem of cfg for world_size ranks -> list of messages naming the key ([] = fine). The checks are
    independent, except that those which build the model or the mesh run only when the values they read passed
    (a bad sp is one problem, not also a crash of the layout check); sizes are checked against memory before
    anything of that size exists. ranks_here: the ranks sharing this machine's memory (default world_size).
    --dry-run prints them all."""
    errors = []

    def passed(check, *args):
        try:
            check(*args)
            return True
        except ValueError as e:
            errors.append(str(e))
            return False
    passed(_check_positive, cfg)
    p, d = cfg.parallel, cfg.data
    sizes = min(p.sp, p.tp, p.ep) >= 1 and d.seq_len >= 2          # what the mesh and data checks divide by
    passed(_check_optim, cfg.optim)
    # the preset exists and arch is its family's (merge typed it), its fields in range, the model it trains
    model = passed(model_changes, cfg.model) and passed(_check_model_fields, cfg)
    arch = []
    model = model and passed(lambda: arch.append(run_model_config(cfg)))
    if model:
        passed(_check_allow_changes, cfg)
    for key, choices in (("parallel.zero", (0, 1, 2, 3)), ("run.dtype", ("auto", "fp32", "bf16")),
                         ("run.wandb_mode", ("online", "offline", "disabled"))):
        passed(_check_choice, key, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]), choices)
    if cfg.data.mqar and sizes and d.vocab_size >= 16:
        passed(_check_mqar, cfg)
    passed(_check_data_source, cfg)
    if sizes and passed(_check_mesh, cfg, world_size) and model:
        if passed(_check_memory, cfg, arch[0], world_size, ranks_here or world_size):
            if passed(_check_layout, cfg, world_size):
                passed(_check_conv_halo, cfg, arch[0])
            if cfg.parallel.tp > 1:
                passed(_check_tensor_parallel, cfg)
            if cfg.parallel.ep > 1:
                passed(_check_expert_parallel, cfg)
    passed(_check_run_dir, cfg)
    return errors


def check_config(cfg, world_size, ranks_here=None):
    """Everything that can be checked before any process-group work: ValueError naming the key (the first problem;
    the message says how many more config_errors found)."""
    errors = config_errors(cfg, world_size, ranks_here)
    if errors:
        more = f" (and {len(errors) - 1} more problem(s): --dry-run lists them all)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
