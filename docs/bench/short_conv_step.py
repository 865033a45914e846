"""A training step with short_conv = 4 against the same model without it, in one run (issue 26).

    OMP_NUM_THREADS=1 python docs/bench/short_conv_step.py --world 1 --seq-len 16384 --reps 5 --json out.json
    OMP_NUM_THREADS=1 python docs/bench/short_conv_step.py --world 4 --seq-len 16384 --layout zigzag --reps 5

Model: linear-llama3-tiny (D 128, 4 layers LLLN, 8 heads, FFN 384; --dim D: width D and FFN 3·D), fp32,
checkpointed blocks, LASP-2 + all-gather KV over `--world` gloo ranks (forked on this machine), one sequence of
--seq-len tokens. The two models (short_conv 0 and 4, seed 0) are built once each; their training steps
(launch.trainer.train_step: forward, backward, gradient all-reduce, AdamW) alternate, without and with packed
documents (mean length 2,048, a 1-token document among them), after one untimed step each. Reported per case:
each rank's CPU seconds per step (time.process_time), the median over --reps steps, then the mean over ranks;
ratio = with / without the convolution.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from lasp import models  # noqa: E402
from lasp.launch import bench, trainer  # noqa: E402
from lasp.launch.config import ModelConfig  # noqa: E402
from lasp.parallel import comm, layout as layouts  # noqa: E402
from tests.dist import run_ranks  # noqa: E402


def documents(seq_len, mean_len=2048):
    """(1, T) ids: boundaries every mean_len tokens, one shifted by one token to leave a 1-token document."""
    starts = torch.zeros(seq_len, dtype=torch.long)
    starts[mean_len::mean_len] = 1
    if seq_len > 2 * mean_len:
        starts[mean_len + 1] = 1                                   # tokens [mean_len, mean_len + 1): one token
    return starts.cumsum(0)[None]


def work(seq_len, layout, reps, dim):
    bench.malloc_for_speed()
    torch.set_num_threads(1)
    world = comm.group_size()
    mesh = trainer.setup_mesh(world, 1)
    runs = {}
    for width in (0, 4):
        cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), short_conv=width)
        if dim:                                                    # a wider model: FFN 3·D as the preset's
            cfg = dataclasses.replace(cfg, dim=dim, ffn_dim=3 * dim)
        args = types.SimpleNamespace(preset="linear-llama3-tiny", batch=1, checkpoint=True, layout=layout,
                                     model=ModelConfig("linear-llama3-tiny", arch=cfg))
        runs[width] = bench.bench_run(args, "lasp2+allgather", mesh, torch.device("cpu"))
    batch = bench.sequence_batch(seq_len, layout, args, mesh.group("sp"), "cpu")
    ids = layouts.shard(documents(seq_len), layout, comm.group_rank(), world)
    batches = {"none": batch, "2048": {**batch, "segment_ids": ids}}
    times = {(w, d): [] for w in runs for d in batches}
    for rep in range(reps + 1):
        for (width, docs), record in times.items():
            comm.barrier()
            c0 = time.process_time()
            trainer.train_step(runs[width], batches[docs])
            if rep:                                                # the first step of each case is untimed
                record.append(time.process_time() - c0)
    return {f"{w}/{d}": statistics.median(t) for (w, d), t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--layout", default="contiguous", choices=layouts.LAYOUTS)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dim", type=int, default=0, help="model width D (0: the preset's 128; 8 heads either way)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    load = os.getloadavg()[0]
    per_rank = run_ranks(a.world, work, a.seq_len, a.layout, a.reps, a.dim, timeout=3600)
    mean = {k: statistics.mean(r[k] for r in per_rank) for k in per_rank[0]}
    out = {"command": " ".join(["python docs/bench/short_conv_step.py", *sys.argv[1:]]), "world": a.world,
           "seq_len": a.seq_len, "layout": a.layout, "reps": a.reps, "dim": a.dim or 128, "load_start": load,
           "load_end": os.getloadavg()[0], "cpu_s_per_step": mean, "per_rank": per_rank,
           "ratio": {d: mean[f"4/{d}"] / mean[f"0/{d}"] for d in ("none", "2048")}}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
