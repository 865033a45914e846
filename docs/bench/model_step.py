"""Tokens/s of a LASP-2 model training step against the sequence length (issue 13): lengths interleaved.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 docs/bench/model_step.py \
        --seq-lens 16384,65536,262144,1048576 --reps 2 --malloc default --out docs/bench/model_step.json

One full step of the training core per length and repetition (launch.trainer.train_step through bench's
bench_run: forward, backward with each block recomputed, the DDP engine's gradient all-reduce, clipping, AdamW);
a pure linear Linear-Llama3 (`--pattern L --dim 32 --heads 2 --kv-heads 1 --ffn 64`, 4 layers, vocabulary 256), LASP-2 contiguous on W gloo ranks, one sequence (B = 1),
float32. Every length runs once untimed first, then `--reps` rounds each running every length in turn, so that
the machine's load (shared cores) falls on all lengths alike; in a round each length's timed step follows an
untimed one of the same length (the first small step after a 1M-token one costs up to 2.4× a steady one: the
allocator and caches still hold the big step's state, a cost training at one length never pays). Reported per length: the median over rounds of the
slowest rank's wall seconds and of the per-rank CPU seconds (time.process_time, max over ranks), as tokens/s.
--malloc heap tells glibc to serve every allocation from the heap (M_MMAP_MAX = 0, no trimming), so that a freed
tensor's pages are reused; default: glibc's own rule, a dynamic threshold that settles at 32 MiB at most, above
which an allocation is a fresh mmap whose every page faults on first touch.
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
import torch.distributed as dist  # noqa: E402

from lasp import models  # noqa: E402
from lasp.launch import bench, trainer  # noqa: E402
from lasp.launch.config import ModelConfig  # noqa: E402

def step(run, batch):
    """-> (wall s, CPU s) of one step of the training core on this rank (launch.trainer.train_step: forward, loss,
    backward, the DDP engine's gradient all-reduce, clipping, AdamW)."""
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train_step(run, batch)
    return time.perf_counter() - t0, time.process_time() - c0


def summarize(times, W, title):
    """{T: [[wall s, CPU s] per round]} -> rows (medians over rounds, tokens/s), printed under `title`."""
    rows = []
    for T, rounds in times.items():
        wall, cpu = (statistics.median(x[i] for x in rounds) for i in (0, 1))
        rows.append(dict(seq_len=T, tokens_per_rank=T // W, wall_s=wall, cpu_s=cpu, tokens_per_s_wall=T / wall,
                         tokens_per_s_cpu=T / cpu, rounds=rounds))
    best = max(row["tokens_per_s_cpu"] for row in rows)
    print(title)
    for row in rows:
        print(f"  T={row['seq_len']:>9,}  wall {row['wall_s']:7.2f} s  {row['tokens_per_s_wall']:8,.0f} tok/s  |  "
              f"CPU {row['cpu_s']:7.2f} s  {row['tokens_per_s_cpu']:8,.0f} tok/s  "
              f"({row['tokens_per_s_cpu'] / best:.2f} of the best)")
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", default="16384,65536,262144,1048576")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--pattern", default="L")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--malloc", choices=("default", "heap"), default="default")
    p.add_argument("--out")
    args = p.parse_args()
    if args.malloc == "heap":
        bench.malloc_for_speed()                              # what bench's timed phases use
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group, W, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), pattern=args.pattern, dim=args.dim,
                              n_heads=args.heads, n_kv_heads=args.kv_heads, ffn_dim=args.ffn)
    bench_args = types.SimpleNamespace(preset="linear-llama3-tiny", batch=1, checkpoint=True, layout="contiguous",
                                       model=ModelConfig("linear-llama3-tiny", arch=cfg))
    run = bench.bench_run(bench_args, "lasp2+allgather", trainer.setup_mesh(W, 1), torch.device("cpu"))
    seq_lens = [int(x) for x in args.seq_lens.split(",")]

    def batch(T):
        return bench.sequence_batch(T, "contiguous", bench_args, group, "cpu")
    load_start = os.getloadavg()
    times = {T: [] for T in seq_lens}
    for rep in range(args.reps + 1):                          # round 0 warms every length up
        for T in seq_lens:
            data = batch(T)
            if rep:                                           # the timed step follows one of the same length
                step(run, data)
            dist.barrier()
            wall, cpu = step(run, data)
            stats = torch.tensor([wall, cpu])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
            if rep:
                times[T].append(stats.tolist())
            if r == 0:
                print(f"round {rep} T={T}: wall {stats[0]:.2f} s, CPU {stats[1]:.2f} s (max rank), load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    if r == 0:
        rows = summarize(times, W, f"W={W} malloc={args.malloc} load {load_start} -> {os.getloadavg()}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(W=W, malloc=args.malloc, model=dataclasses.asdict(cfg), reps=args.reps,
                               load_start=load_start, load_end=os.getloadavg(), rows=rows,
                               time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                               command=" ".join(["OMP_NUM_THREADS=1 torchrun --nproc-per-node", str(W), *sys.argv])),
                          f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
