"""Upcycle N dense BAM expert checkpoints into a Mixture-of-Experts checkpoint (BAM, or a BTX-style baseline).

    python launch/upcycle.py --seed seed.pt --experts comedies.pt tragedies.pt sonnets.pt --out bam.pt
    python launch/upcycle.py ... --kv-sharing      # BAM with one k, v shared by the attention experts (averaged)
    python launch/upcycle.py ... --btx             # baseline: attention averaged, only the FFNs become experts

Inputs are `models.save_model` files of the same dense Linear-Llama3 config with parallel_block=True (the seed's,
e.g. preset bam-seed-tiny; the experts are the seed continued on their own domains; files of the former "bam"
family are read as such, models.serialization.upgrade_payload). FFN_i -> FFN expert i, attention_i -> attention expert i, embeddings,
norms and other weights averaged, routers freshly drawn (models.bam.upcycle). Every check runs before anything is
written, and the file is written atomically (temp file + os.replace). Exit codes: 0 done, 2 bad input (one line, no traceback).
"""
import argparse
import pickle
import sys
import zipfile
from pathlib import Path


import torch

from lasp import models
from lasp.launch.cli import run_entry
from lasp.models.bam import upcycle
from lasp.models.serialization import upgrade_payload

__all__ = ["parse_args", "read_checkpoint", "upcycle_files", "main"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", required=True, help="the dense seed's model.pt (its config is the one expected)")
    p.add_argument("--experts", required=True, nargs="+", help="N >= 2 dense expert model.pt files, in order")
    p.add_argument("--out", required=True, help="where to write the MoE model.pt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--kv-sharing", action="store_true", help="attention experts share k, v (averaged)")
    mode.add_argument("--btx", action="store_true", help="average the attention; only the FFNs become experts")
    p.add_argument("--top-k", type=int, default=1, help="FFN experts per token (default 1)")
    p.add_argument("--router-seed", type=int, default=0, help="seed of the fresh routers")
    return p.parse_args(argv)


def read_checkpoint(path, what):
    """-> (config, state dict) of a models.save_model file; ValueError naming `what` and the path otherwise (a
    missing file, a text file, a pickle that is more than tensors)."""
    if not Path(path).is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path} is not a model file (a models.save_model archive such as <run dir>/model.pt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise ValueError(f"{what} {path}: cannot read it ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or not {"model_config", "model"} <= set(payload):
        raise ValueError(f"{what} {path} is not a model checkpoint: expected keys 'model_config' and 'model'")
    try:
        payload = upgrade_payload(payload)
        return models.config_from_dict(payload["model_config"]), payload["model"]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} {path}: {e}") from None


def _difference(found, expected):
    return ", ".join(f"{k}={found.get(k)!r} (seed: {expected.get(k)!r})"
                     for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k))


def upcycle_files(seed, experts, out, *, attention="experts", top_k=1, router_seed=0):
    """Check the files, upcycle, write `out` -> the MoE model. ValueError (nothing written) for a seed that is
    not a dense parallel-block Linear-Llama3 model, experts of another config or other shapes, top_k > N."""
    seed_cfg, _ = read_checkpoint(seed, "seed")
    expected, states = models.config_to_dict(seed_cfg), []
    for i, path in enumerate(experts):
        cfg, state = read_checkpoint(path, f"expert {i}")
        if models.config_to_dict(cfg) != expected:
            raise ValueError(f"expert {i} ({path}) has another config than the seed {seed}: "
                             f"{_difference(models.config_to_dict(cfg), expected)}")
        states.append(state)
    model = upcycle(seed_cfg, states, attention=attention, top_k=top_k, router_seed=router_seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    models.save_model(out, model)
    return model


def _upcycle(args):
    attention = "kv-sharing" if args.kv_sharing else "average" if args.btx else "experts"
    model = upcycle_files(args.seed, args.experts, args.out, attention=attention, top_k=args.top_k,
                          router_seed=args.router_seed)
    cfg = model.config
    print(f"upcycle: wrote {args.out}: {len(args.experts)} experts, attention {attention} "
          f"({cfg.n_attn_experts} attention experts), top-{cfg.top_k} FFN routing, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")


def main(argv=None):
    """Command-line entry: 0 done, 2 bad input (one line, no traceback; launch/cli.py)."""
    return run_entry("upcycle", parse_args, _upcycle, argv)


if __name__ == "__main__":
    sys.exit(main())
