"""The torch linear-attention kernel before and after composing chunked_forward / chunked_backward of the
deferred parts LASP-2 uses (one decomposition instead of two), side by side in one process.

    OMP_NUM_THREADS=1 python docs/bench/kernel_unify.py --old-rev c09629f --new-file CANDIDATE.py --reps 5 \
        --out docs/bench/kernel_unify.json

OLD is kernels/linear_attn.py as of --old-rev (read with `git show`), NEW the file --new-file (default: the
working tree's kernels/linear_attn.py); each is loaded as a module of its own (the file imports only torch).
Each case: linear_attn_chunked forward + backward (torch.autograd.backward of o), fp32, per-head decay, zero
initial state, as lightning_attn(backend="torch") runs it. OLD and NEW alternate within every repetition (the
order flips each repetition), after one warm-up each; medians of wall and CPU seconds (time.process_time).
Peak memory: a fresh subprocess per (impl, case) runs one fwd+bwd and reports its peak resident set, VmHWM of
/proc/self/status (the whole process: torch, the inputs and the kernel's peak; ru_maxrss would carry the
forking parent's). A shared 2-core machine, loaded by other work: compare the ratios, not the absolute times.
Results and the outcome: docs/bench/kernel_unify.json.
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
CASES = {                     # name: (B, H, d, T, gated)
    "H8_d32_T8K": (1, 8, 32, 8192, False),
    "H8_d32_T256K": (1, 8, 32, 262144, False),
    "H8_d64_T16K": (1, 8, 64, 16384, False),
    "H2_d16_T64K": (1, 2, 16, 65536, False),
    "gated_H4_d32_T64K": (1, 4, 32, 65536, True),
    "B4_H16_d32_T4K": (4, 16, 32, 4096, False),
}


def load(impl, rev, new_file):
    """The linear_attn module of git revision rev (OLD) or of new_file (NEW), each as a module of its own."""
    if impl == "new":
        name, source = new_file, open(new_file).read()
    else:
        name = f"{rev}:kernels/linear_attn.py"
        source = subprocess.run(["git", "-C", ROOT, "show", name], check=True, capture_output=True, text=True).stdout
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(f"{impl}_linear_attn", loader=None))
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def inputs(B, H, d, T, gated):
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, T, H, d, generator=g) * 0.5 for _ in range(4))
    log_decay = -torch.logspace(-4, -1, H)
    log_gate = -0.1 * torch.rand(B, T, H, generator=g) if gated else None
    return q, k, v, do, log_decay, log_gate


def step(module, q, k, v, do, log_decay, log_gate):
    """One fwd+bwd -> (wall s, CPU s)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    gate = None if log_gate is None else log_gate.detach().requires_grad_()
    wall, cpu = time.perf_counter(), time.process_time()
    o, _ = module.linear_attn_chunked(*leaves, log_decay, log_gate=gate)
    torch.autograd.backward(o, do)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss(impl, args, case):
    """Peak RSS (MiB) of a fresh process running one fwd+bwd of case."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", impl, "--old-rev", args.old_rev, "--new-file",
                          args.new_file, "--cases", case], check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old-rev", default="c09629f")
    p.add_argument("--new-file", default=os.path.join(ROOT, "kernels", "linear_attn.py"),
                   help="the NEW kernels/linear_attn.py (default: the working tree's)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out")
    p.add_argument("--rss-child", choices=("old", "new"))
    args = p.parse_args()
    cases = args.cases.split(",")
    if args.rss_child:
        module = load(args.rss_child, args.old_rev, args.new_file)
        step(module, *inputs(*CASES[cases[0]]))
        with open("/proc/self/status") as f:                 # VmHWM: this process's peak RSS (ru_maxrss would
            print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024)   # keep the parent's)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    modules = {impl: load(impl, args.old_rev, args.new_file) for impl in ("old", "new")}
    rows = []
    for case in cases:
        B, H, d, T, gated = CASES[case]
        x = inputs(B, H, d, T, gated)
        times = {impl: [] for impl in modules}
        for impl in modules:
            step(modules[impl], *x)                                        # warm-up
        for rep in range(args.reps):
            for impl in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                times[impl].append(step(modules[impl], *x))
        med = {impl: [statistics.median(t[i] for t in times[impl]) for i in (0, 1)] for impl in times}
        rss = {impl: peak_rss(impl, args, case) for impl in modules}
        row = dict(case=case, B=B, H=H, d=d, T=T, gated=gated, old_wall_s=med["old"][0], new_wall_s=med["new"][0],
                   old_cpu_s=med["old"][1], new_cpu_s=med["new"][1], ratio_wall=med["new"][0] / med["old"][0],
                   ratio_cpu=med["new"][1] / med["old"][1], old_maxrss_mib=rss["old"], new_maxrss_mib=rss["new"],
                   new_tokens_per_s=B * T / med["new"][0])
        rows.append(row)
        print(f"{case:20s} old {row['old_wall_s']:.3f}s new {row['new_wall_s']:.3f}s  new/old wall "
              f"{row['ratio_wall']:.3f} cpu {row['ratio_cpu']:.3f}  maxrss old {rss['old']:.0f} new {rss['new']:.0f} "
              f"MiB", flush=True)
    load_avg = os.getloadavg()
    print(f"load average {load_avg}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), old_rev=args.old_rev, new_file=args.new_file, reps=args.reps,
                           omp_num_threads=os.environ.get("OMP_NUM_THREADS"), load_average_end=load_avg,
                           note="shared 2-core machine under load: compare ratios", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
