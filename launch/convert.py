"""Convert model weights between this project's files and transformers' folders, both ways.

    python -m lasp.launch.convert --family minimax --to hf   runs/x/model.pt  hf-minimax/     # then, in transformers:
        AutoModelForCausalLM.from_pretrained("hf-minimax")                                   # same logits
    python -m lasp.launch.convert --family minimax --to lasp hf-minimax/ start.pt            # then: --model.init_from start.pt

A transformers folder is config.json plus model.safetensors (reads also sharded *.safetensors with their index,
or pytorch_model*.bin weights-only). Writing or reading one needs the `safetensors` package (transformers brings
it); the key mapping does not, and transformers itself is never imported. The mapping lives in one module per
family (CONVERTERS: module path), each with MODEL_TYPE, ARCHITECTURE, config_to_hf(cfg) -> dict,
config_from_hf(dict) -> cfg, state_to_hf(cfg, state) -> dict, state_from_hf(cfg, hf_state) -> state; adding a
family is one entry. Bad input (a wrong family, a config the family cannot express, missing tensors): one line
on stderr, exit code 2.
"""
import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from lasp import models
from lasp.models.serialization import read_payload

__all__ = ["CONVERTERS", "converter", "read_hf_folder", "write_hf_folder", "to_hf", "to_lasp", "main"]

CONVERTERS = {"minimax": "lasp.models.hf_minimax", "qwen3-next": "lasp.models.hf_qwen3_next"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def converter(family):
    """The family's mapping module. ValueError listing the families."""
    if family not in CONVERTERS:
        raise ValueError(f"--family must be one of {sorted(CONVERTERS)}, got {family!r}")
    return importlib.import_module(CONVERTERS[family])


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ValueError("a transformers folder is read and written with the `safetensors` package: "
                         "pip install safetensors (transformers installs it)") from None
    return safetensors.torch


def write_hf_folder(folder, hf_config, hf_state, dtype=torch.float32):
    """folder/config.json and folder/model.safetensors (tensors cast to `dtype`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(hf_config, dtype=str(dtype).removeprefix("torch."))
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in hf_state.items()}
    _safetensors().save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_hf_folder(folder):
    """-> (config.json dict, state dict) of a transformers folder. ValueError naming what is missing."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json (expected a transformers save_pretrained folder)")
    config = json.loads((folder / "config.json").read_text())
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(_safetensors().load_file(str(f)))
    for f in sorted(folder.glob("pytorch_model*.bin")) if not state else ():
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise ValueError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    return config, state


def to_hf(family, model_file, folder, dtype=torch.float32):
    """A models.save_model file -> a transformers folder. ValueError if the file is of another family."""
    module = converter(family)
    payload = read_payload(model_file)
    cfg = models.config_from_dict(payload["model_config"])
    if payload["model_config"]["family"] != family:
        raise ValueError(f"{model_file} holds a {payload['model_config']['family']!r} model, not {family!r}")
    write_hf_folder(folder, module.config_to_hf(cfg), module.state_to_hf(cfg, payload["model"]), dtype)


def to_lasp(family, folder, model_file):
    """A transformers folder -> a models.save_model file (what --model.init_from reads). ValueError if the
    tensors do not fit the config."""
    module = converter(family)
    hf_config, hf_state = read_hf_folder(folder)
    cfg = module.config_from_hf(hf_config)
    state = module.state_from_hf(cfg, hf_state)
    meta = models.build_model(cfg, device="meta")
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))[:5]
        raise ValueError(f"{folder}: tensors do not fit its config.json: expected "
                         f"{ {k: want.get(k) for k in bad} }, found { {k: got.get(k) for k in bad} }")
    models.save_model(model_file, meta, state_dict=state)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=sorted(CONVERTERS))
    p.add_argument("--to", required=True, choices=("hf", "lasp"), help="hf: model.pt -> folder; lasp: the reverse")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="tensor dtype of a written folder")
    p.add_argument("src", help="a models.save_model file (--to hf) or a transformers folder (--to lasp)")
    p.add_argument("dst", help="the folder (--to hf) or the model file (--to lasp) to write")
    args = p.parse_args(argv)
    try:
        if args.to == "hf":
            to_hf(args.family, args.src, args.dst, DTYPES[args.dtype])
        else:
            to_lasp(args.family, args.src, args.dst)
    except ValueError as e:
        print(f"convert: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"convert: {args.src} -> {args.dst} ({args.family}, {'transformers' if args.to == 'hf' else 'lasp'})")


if __name__ == "__main__":
    main()
