"""The delta-rule kernel and LASP-2 with beta= (issue 27's targets): CPU seconds, fwd + bwd, fp32, B = 1, H = 8, d = 64.

    OMP_NUM_THREADS=1 python docs/bench/delta_rule.py kernel --seq-lens 8192 262144 --reps 3 --out k.json
    OMP_NUM_THREADS=1 python docs/bench/delta_rule.py memory --seq-lens 16384 65536 262144 --out m.json
    OMP_NUM_THREADS=1 python docs/bench/delta_rule.py transformers --seq-len 16384 --out t.json
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 docs/bench/delta_rule.py lasp2 --seq-len 65536 --reps 5 --out l.json

kernel: gated_delta_attn (torch chunk form, with a gate) and lightning_attn with a gate, same shape, in turn per
  repetition; tokens per CPU second (time.process_time of this single-threaded process), best and median.
memory: the peak resident memory of one kernel fwd + bwd per length, each length in a fresh process.
transformers: its Qwen3-Next fallback torch_chunk_gated_delta_rule (fwd + bwd through autograd) against ours on the
  same inputs (its scale d^-1/2 applied to our q), the outputs' relative difference, tokens per CPU second each.
lasp2: per rank, lasp2(beta=, log_gate=) on the contiguous shard against gated_delta_attn alone on the same shard,
  interleaved; per-rank CPU seconds (the ranks share few cores, so wall time mostly measures waiting), medians and
  the median of paired ratios; the max over ranks is reported.
Every mode serves all memory from the never-trimmed heap (launch.bench.malloc_for_speed): with glibc's default
rule large tensors come from fresh mmaps whose page faults add system time unevenly to the cases.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lasp  # noqa: E402,F401  (before transformers: our folders must not shadow HF kernels)
from lasp.kernels import gated_delta_attn, lightning_attn  # noqa: E402
from lasp.launch.bench import malloc_for_speed  # noqa: E402


def inputs(T, H=8, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, d, generator=g) * d ** -0.5
    k = F.normalize(torch.randn(1, T, H, d, generator=g), dim=-1)
    v = torch.randn(1, T, H, d, generator=g)
    beta = torch.rand(1, T, H, generator=g)
    gate = F.logsigmoid(torch.randn(1, T, H, generator=g) + 4)
    return [x.requires_grad_() for x in (q, k, v, beta, gate)]


def cpu_time(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def fwd_bwd_delta(x):
    o = gated_delta_attn(*x[:4], log_gate=x[4])[0]
    torch.autograd.grad(o, x, torch.ones_like(o))


def fwd_bwd_lightning(x):
    o = lightning_attn(x[0], x[1], x[2], log_gate=x[4])[0]
    torch.autograd.grad(o, [x[0], x[1], x[2], x[4]], torch.ones_like(o))


def run_kernel(args):
    out = {}
    for T in args.seq_lens:
        x = inputs(T)
        times = {"delta": [], "lightning_gated": []}
        for _ in range(args.reps):
            times["delta"].append(cpu_time(lambda: fwd_bwd_delta(x)))
            times["lightning_gated"].append(cpu_time(lambda: fwd_bwd_lightning(x)))
        out[T] = {name: {"tokens_per_cpu_s_best": T / min(t), "tokens_per_cpu_s_median": T / statistics.median(t),
                         "cpu_s": t} for name, t in times.items()}
        out[T]["delta_over_lightning_median"] = statistics.median(times["delta"]) / statistics.median(
            times["lightning_gated"])
        print(T, json.dumps(out[T]), flush=True)
    return out


def run_memory(args):
    """Peak resident memory of one fwd + bwd per length, each in a fresh process (glibc serving ≥ 1 MiB by mmap and
    trimming, so RSS follows the live tensors): bytes per token, inputs and their gradients included."""
    import subprocess
    out = {}
    for T in args.seq_lens:
        code = ("import resource, sys, torch; sys.path.insert(0, 'docs/bench'); import delta_rule as b; "
                "from lasp.launch.bench import malloc_for_measurement; malloc_for_measurement(); "
                "torch.set_num_threads(1); r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
                f"x = b.inputs({T}); r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; b.fwd_bwd_delta(x); "
                "print(r0, r1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        r0, r1, r2 = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
        out[T] = {"inputs_kib": r1 - r0, "peak_above_start_kib": r2 - r0, "bytes_per_token": (r2 - r0) * 1024 / T}
        print(T, json.dumps(out[T]), flush=True)
    return out


def run_transformers(args):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule
    x = inputs(args.seq_len)
    q_hf = (x[0] * 64 ** 0.5).detach().requires_grad_()          # theirs scales q by d^-1/2 inside

    def theirs():
        o = torch_chunk_gated_delta_rule(q_hf, x[1], x[2], x[4], x[3])[0]
        torch.autograd.grad(o, [q_hf, *x[1:]], torch.ones_like(o))
    t_ours, t_theirs = cpu_time(lambda: fwd_bwd_delta(x)), cpu_time(theirs)
    with torch.no_grad():
        ours = gated_delta_attn(*x[:4], log_gate=x[4])[0]
        ref = torch_chunk_gated_delta_rule(q_hf, x[1], x[2], x[4], x[3])[0]
    out = {"T": args.seq_len, "ours_tokens_per_cpu_s": args.seq_len / t_ours,
           "transformers_tokens_per_cpu_s": args.seq_len / t_theirs, "speedup": t_theirs / t_ours,
           "output_rel_diff": ((ours - ref).norm() / ref.norm()).item()}
    print(json.dumps(out), flush=True)
    return out


def run_lasp2(args):
    import torch.distributed as dist
    from lasp import lasp2
    from lasp.parallel import shard
    dist.init_process_group("gloo")
    r, W = dist.get_rank(), dist.get_world_size()
    x = [shard(t.detach(), "contiguous", r, W).requires_grad_() for t in inputs(args.seq_len)]

    def engine():
        o = lasp2(*x[:3], beta=x[3], log_gate=x[4])
        torch.autograd.grad(o, x, torch.ones_like(o))
    times = {"kernel": [], "lasp2": []}
    for _ in range(args.reps):
        dist.barrier()
        times["kernel"].append(cpu_time(lambda: fwd_bwd_delta(x)))
        dist.barrier()
        times["lasp2"].append(cpu_time(engine))
    stats = {"median_kernel_s": statistics.median(times["kernel"]), "median_lasp2_s": statistics.median(times["lasp2"]),
             "paired_ratio": statistics.median(b / a for a, b in zip(times["kernel"], times["lasp2"]))}
    stats["ratio_of_medians"] = stats["median_lasp2_s"] / stats["median_kernel_s"]
    everyone = [None] * W
    dist.all_gather_object(everyone, stats)
    dist.barrier()
    if r == 0:
        out = {"W": W, "T": args.seq_len, "per_rank": everyone,
               "max_ratio_of_medians": max(s["ratio_of_medians"] for s in everyone),
               "max_paired_ratio": max(s["paired_ratio"] for s in everyone)}
        print(json.dumps(out), flush=True)
        return out
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("kernel", "memory", "transformers", "lasp2"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 262144])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    malloc_for_speed()                  # every block from the never-trimmed heap (as docs/bench/lasp2_overhead.py)
    result = {"kernel": run_kernel, "memory": run_memory, "transformers": run_transformers,
              "lasp2": run_lasp2}[args.mode](args)
    if result is not None and args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "command": " ".join(sys.argv), "load_1_5_15_at_end": os.getloadavg(),
                       "torch": torch.__version__, "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
