"""LASP-2's own cost over the local kernel alone on the same shard (issue 13): per-rank CPU seconds, interleaved.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 docs/bench/lasp2_overhead.py --seq-len 65536 --reps 5 \
        --out docs/bench/lasp2_overhead.json

Cases, each forward + backward (torch.autograd.grad) on this rank's contiguous shard, B = 1, per-head decay:
  kernel          kernels.lightning_attn (torch) alone, zero initial state: the local compute LASP-2 cannot avoid
  overlap         lasp2(overlap=True), the default: M from the kernel's state pass, the gathers in flight during the
                  intra-chunk products, P and G into the kernel's own inter / exit products
  fused           lasp2(overlap=False): the kernel runs from the gathered P and to G, after the gathers
  overlap_before  a copy of the default path before this change (lasp/ at commit db676ec): the kernel from a zero
                  state while the gather flies, then the cross terms e^{A} q P, dq, dk, dv added (4 more d_k×d_v
                  products per token); kept here only for this comparison
  gathers         LASP-2's two all-gathers alone, same sizes (plus a copy of q): the communication's own CPU cost
Per-rank CPU seconds (time.process_time: the ranks share few cores, so wall time mostly measures waiting for one),
median over repetitions; every case runs once per repetition, in turn. "/ kernel": the ratio of the medians;
"paired": the median over repetitions of each repetition's ratio to the kernel run just before it (the host's
slow phases fall on both). Also the wall seconds of the slowest rank. --malloc heap (the default since the
deferred kernel's rewrite; before it, glibc's own rule): every block from the never-trimmed heap, as
model_step.py --malloc heap; with glibc's rule a quarter of the kernel's CPU time was page faults (system time).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lasp.kernels import lightning_attn  # noqa: E402
from lasp.launch.bench import malloc_for_speed  # noqa: E402
from lasp import lasp2  # noqa: E402
from lasp.common import (add_prefix_output, add_state_grads, local_backward, local_forward, local_state,  # noqa: E402
                         state_grad, to_segments, from_segments)

L2 = sys.modules["lasp.lasp2"]


class _Before(torch.autograd.Function):
    """The overlap=True path as of commit db676ec (contiguous, constant decay, no gate), torch backend."""
    @staticmethod
    def forward(ctx, q, k, v, log_decay, group):
        qs, ks, vs = (to_segments(x, 1) for x in (q, k, v))
        header = torch.tensor([q.shape[1], 1], dtype=torch.float32)
        finish = L2._gather_states(local_state(ks, vs, log_decay), 1, "contiguous", group, header)
        o, block_states = local_forward(qs, ks, vs, log_decay, "torch")
        prefix = L2._prefix_fold(*finish(), log_decay, qs.shape[1], "contiguous", group, suffix=False)
        ctx.save_for_backward(q, k, v, log_decay, prefix, block_states)
        ctx.group = group
        return from_segments(add_prefix_output(o, qs, prefix, log_decay), 1)

    @staticmethod
    def backward(ctx, do):
        q, k, v, log_decay, prefix, block_states = ctx.saved_tensors
        qs, ks, vs, dos = (to_segments(x, 1) for x in (q, k, v, do.contiguous()))
        finish = L2._gather_states(state_grad(qs, dos, log_decay, k.shape[2]), 1, "contiguous", ctx.group)
        dq, dk, dv, _ = local_backward(qs, ks, vs, log_decay, dos, "torch", block_states=block_states)
        suffix = L2._prefix_fold(*finish(), log_decay, qs.shape[1], "contiguous", ctx.group, suffix=True)
        grads = add_state_grads(dq, dk, dv, qs, ks, vs, dos, prefix, suffix, log_decay)
        return (*(from_segments(g, 1) for g in grads), None, None)


class _Gathers(torch.autograd.Function):
    """LASP-2's two all-gathers alone (one (B, H, d_k, d_v) state + header forward, one state backward): their
    CPU cost on this machine (1.2–2 ms each, waiting or not: docs/bench/gloo_wait_cpu.py)."""
    @staticmethod
    def forward(ctx, q, group):
        B, _, H, d = q.shape
        ctx.group, ctx.shape = group, (B, H, d)
        L2._gather_states(q.new_zeros(B, H, d, d), 1, "contiguous", group, torch.tensor([q.shape[1], 1.0]))()
        return q.clone()

    @staticmethod
    def backward(ctx, do):
        B, H, d = ctx.shape
        L2._gather_states(do.new_zeros(B, H, d, d), 1, "contiguous", ctx.group)()
        return do, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--malloc", choices=("default", "heap"), default="heap")
    p.add_argument("--out")
    args = p.parse_args()
    if args.malloc == "heap":
        malloc_for_speed()                                 # as bench's timed phases and model_step.py --malloc heap
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    W, r = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    T = args.seq_len // W
    g = torch.Generator().manual_seed(1234 + r)
    q, k, v, do = (torch.randn(1, T, args.heads, args.head_dim, generator=g) * 0.5 for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    decay = -torch.logspace(-4, -1, args.heads)
    cases = {
        "kernel": lambda: lightning_attn(q, k, v, log_decay=decay, backend="torch")[0],
        "overlap": lambda: lasp2(q, k, v, log_decay=decay, group=group, overlap=True),
        "fused": lambda: lasp2(q, k, v, log_decay=decay, group=group, overlap=False),
        "overlap_before": lambda: _Before.apply(q, k, v, decay, group),
        "gathers": lambda: _Gathers.apply(q, group),
    }
    cpu = {name: [] for name in cases}
    wall = {name: [] for name in cases}
    load_start = os.getloadavg()
    for rep in range(args.reps + 1):                       # the first repetition warms up
        for name, fn in cases.items():
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            torch.autograd.grad(fn(), (q, k, v), do, allow_unused=True)
            c1, t1 = time.process_time(), time.perf_counter()
            if rep:
                cpu[name].append(c1 - c0)
                wall[name].append(t1 - t0)
    med = {name: statistics.median(x) for name, x in cpu.items()}
    paired = {n: statistics.median(a / b for a, b in zip(cpu[n], cpu["kernel"])) for n in cases}
    local = dict(cpu_s=med, wall_s={n: statistics.median(x) for n, x in wall.items()},
                 ratio={n: med[n] / med["kernel"] for n in cases}, paired_ratio=paired, cpu_s_all=cpu)
    everyone = [None] * W
    dist.all_gather_object(everyone, local)
    if r == 0:
        result = dict(W=W, seq_len=args.seq_len, tokens_per_rank=T, heads=args.heads, head_dim=args.head_dim,
                      reps=args.reps, malloc=args.malloc, load_start=load_start, load_end=os.getloadavg(),
                      time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), ranks=everyone,
                      command=" ".join(["OMP_NUM_THREADS=1 torchrun --nproc-per-node", str(W), *sys.argv]))
        print(f"W={W} T={args.seq_len} ({T}/rank) H={args.heads} d={args.head_dim} malloc={args.malloc}, load "
              f"{load_start} -> {result['load_end']}")
        for name in cases:
            ratios, pairs = ([x[key][name] for x in everyone] for key in ("ratio", "paired_ratio"))
            secs = [x["cpu_s"][name] for x in everyone]
            print(f"  {name:15s} CPU s/rank {min(secs):.3f}-{max(secs):.3f}  / kernel {min(ratios):.3f}-"
                  f"{max(ratios):.3f} (paired {min(pairs):.3f}-{max(pairs):.3f})  wall (max rank) "
                  f"{max(x['wall_s'][name] for x in everyone):.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
