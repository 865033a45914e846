"""Packed documents in linear attention: what segment_ids cost, side by side in one process (issue 26 targets).

    OMP_NUM_THREADS=1 python docs/bench/documents.py --old-rev 03b4e0a --reps 5 --out docs/bench/documents.json

kernel: linear_attn_chunked forward + backward (torch.autograd.backward of o), fp32, per-head decay, B=1, H=8,
d=32, at T = 8,192 and 262,144: OLD (kernels/linear_attn.py of --old-rev, loaded from `git show` as a module of
its own; it imports only torch), NEW without documents (segment_ids=None) and, at 262K, NEW with documents
(mean length 2,048: 127 documents of random lengths plus one of 1 token). OLD, NEW and NEW+docs alternate within
every repetition (order rotated each repetition) after one warm-up each; medians of wall and CPU seconds
(time.process_time: less sensitive to other processes on the cores than wall time, not immune: caches are shared).
lasp2: W = 4 gloo ranks (forked, one thread each), 65,536 tokens (16,384 per rank), B=1, H=8, d=32, fp32, decay,
contiguous, forward + backward with and without documents alternating in the same processes; per repetition the
slowest rank's wall time (and the largest rank CPU time), then the median. A shared 2-core machine, loaded by other work: compare ratios, not seconds.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def load_old(rev):
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:kernels/linear_attn.py"], check=True,
                            capture_output=True, text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("old_linear_attn", loader=None))
    exec(compile(source, f"{rev}:kernels/linear_attn.py", "exec"), module.__dict__)
    return module


def packed_ids(T, mean, seed=0):
    """(1, T) ids: documents of random lengths (uniform in [1, 2·mean]) and one 1-token document in the middle."""
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < T:
        n = int(torch.randint(1, 2 * mean, (1,), generator=g))
        lengths.append(min(n, T - total))
        total += lengths[-1]
    lengths.insert(len(lengths) // 2, 1)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T]
    return ids[None], len(lengths)


def inputs(T, H=8, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, T, H, d, generator=g) * 0.5 for _ in range(4))
    return q, k, v, do, -torch.logspace(-4, -1, H)


def kernel_step(fn, q, k, v, do, log_decay, ids):
    """One fwd+bwd -> (wall s, CPU s of this process)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    wall, cpu = time.perf_counter(), time.process_time()
    kwargs = {} if ids is None else {"segment_ids": ids}
    o, _ = fn(*leaves, log_decay, **kwargs)
    torch.autograd.backward(o, do)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_kernel(args):
    from lasp.kernels.linear_attn import linear_attn_chunked
    old = load_old(args.old_rev).linear_attn_chunked
    out = {}
    for T in (8192, 262144):
        data = inputs(T)
        ids, n_docs = packed_ids(T, 2048)
        impls = {"old": (old, None), "new": (linear_attn_chunked, None)}
        if T == 262144:
            impls["new_docs"] = (linear_attn_chunked, ids)
        names = list(impls)
        times = {n: [] for n in names}
        for n in names:                                       # warm-up
            kernel_step(impls[n][0], *data, impls[n][1])
        for rep in range(args.reps):
            for n in names[rep % len(names):] + names[:rep % len(names)]:
                times[n].append(kernel_step(impls[n][0], *data, impls[n][1]))
        med = {n: statistics.median(w for w, _ in t) for n, t in times.items()}
        cpu = {n: statistics.median(c for _, c in t) for n, t in times.items()}
        row = {"T": T, "documents": n_docs, "median_s": med, "median_cpu_s": cpu, "all_wall_cpu_s": times,
               "new_over_old": med["new"] / med["old"], "new_over_old_cpu": cpu["new"] / cpu["old"]}
        if "new_docs" in med:
            row["docs_tokens_per_s_over_none"] = med["new"] / med["new_docs"]
            row["docs_tokens_per_s_over_none_cpu"] = cpu["new"] / cpu["new_docs"]
        out[f"T{T}"] = row
        print(json.dumps({k: v for k, v in row.items() if k != "all_wall_cpu_s"}), flush=True)
    return out


def _lasp2_rank(reps, T):
    import torch.distributed as dist
    from lasp import lasp2
    from lasp.parallel import shard
    r, W = dist.get_rank(), dist.get_world_size()
    q, k, v, do, log_decay = (shard(x, "contiguous", r, W) if x.dim() == 4 else x for x in inputs(T))
    ids = shard(packed_ids(T, 2048)[0], "contiguous", r, W)

    def step(segment_ids):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        o = lasp2(*leaves, log_decay=log_decay, segment_ids=segment_ids)
        torch.autograd.backward(o, do)
        return time.perf_counter() - wall, time.process_time() - cpu
    step(None), step(ids)
    times = {"none": [], "docs": []}
    for rep in range(reps):
        order = ("none", "docs") if rep % 2 == 0 else ("docs", "none")
        for name in order:
            times[name].append(step(None if name == "none" else ids))
    return times


def bench_lasp2(args):
    from tests.dist import run_ranks
    per_rank = run_ranks(4, _lasp2_rank, args.reps, 65536, timeout=1200)
    slowest = {n: [max(r[n][i][0] for r in per_rank) for i in range(args.reps)] for n in ("none", "docs")}
    cpu = {n: [max(r[n][i][1] for r in per_rank) for i in range(args.reps)] for n in ("none", "docs")}
    med = {n: statistics.median(t) for n, t in slowest.items()}
    med_cpu = {n: statistics.median(t) for n, t in cpu.items()}
    row = {"W": 4, "T": 65536, "median_s": med, "median_cpu_s": med_cpu, "slowest_rank_s": slowest,
           "max_rank_cpu_s": cpu, "docs_over_none": med["docs"] / med["none"],
           "docs_over_none_cpu": med_cpu["docs"] / med_cpu["none"]}
    print(json.dumps({k: v for k, v in row.items() if k not in ("slowest_rank_s", "max_rank_cpu_s")}), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-rev", default="03b4e0a")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", choices=("kernel", "lasp2"), default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    load = os.getloadavg()
    result = {"command": " ".join(sys.argv), "load_before": load, "torch": torch.__version__}
    if args.only in (None, "kernel"):
        result["kernel"] = bench_kernel(args)
    if args.only in (None, "lasp2"):
        result["lasp2"] = bench_lasp2(args)
    result["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
