"""Data-loader micro-benchmark (docs/data.md): the default job's batches read through today's PackedDataset
(document boundaries as offsets, uint16 ids) and through the one it replaced (an int32 document id per token), from
git, on the same token stream. Both must give equal batches; it prints the time per batch of each.

    python docs/bench/data_loader.py --old-ref 03b4e0a --rounds 7

The default job reads batch (step, dp rank) for dp = 2, B = 4, T = 256; each round times `--steps` steps of both
ranks for each reader, alternating old and new, and the median round is reported with `uptime`'s load.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _old_module(ref, folder):
    source = subprocess.run(["git", "show", f"{ref}:launch/data.py"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout
    path = Path(folder) / "old_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time(dataset, steps):
    start = time.perf_counter()
    for step in range(steps):
        for rank in range(2):
            dataset.batch(step, rank, 2, 4)
    return (time.perf_counter() - start) / (2 * steps)


def main(argv=None):
    from lasp.launch import data
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-ref", default="03b4e0a", help="a commit with the per-token document-id reader")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        old = _old_module(args.old_ref, tmp)
        files = data.corpus_files([])
        new_path = data.build_cache(files, "text", 1024, data.cache_path(files, "text", 1024, Path(tmp) / "new"))
        old_path = old.build_cache(files, "text", 1024, old.cache_path(files, "text", 1024, Path(tmp) / "old"))
        new_ds, old_ds = data.PackedDataset(new_path, 256), old.PackedDataset(old_path, 256)
        for step in range(args.steps):
            a, b = new_ds.batch(step, step % 2, 2, 4), old_ds.batch(step, step % 2, 2, 4)
            assert all(torch.equal(a[k], b[k]) for k in a), f"batches differ at step {step}"
        load_before, rounds = os.getloadavg(), []
        for _ in range(args.rounds):
            rounds.append((_time(old_ds, args.steps), _time(new_ds, args.steps)))
        old_s = statistics.median(r[0] for r in rounds)
        new_s = statistics.median(r[1] for r in rounds)
    print(json.dumps({"batch_us_old": round(old_s * 1e6, 1), "batch_us_new": round(new_s * 1e6, 1),
                      "new_over_old": round(new_s / old_s, 3), "steps": args.steps, "rounds": args.rounds,
                      "equal_batches": True, "load_before": load_before, "load_after": os.getloadavg()}))


if __name__ == "__main__":
    sys.exit(main())
