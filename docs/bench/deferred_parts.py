"""The torch kernel against LASP-2's split of it, part by part, in one process (issue 13): what the overlap costs
in compute alone, without gloo or other ranks.

    OMP_NUM_THREADS=1 python docs/bench/deferred_parts.py --seq-len 16384 --reps 12 --out docs/bench/deferred_parts.json

Shapes as docs/bench/lasp2_overhead.py's shard (B = 1, H = 8, d = 64, fp32, per-head decay), heap-only
allocation. Cases, each once per repetition in turn, CPU seconds (time.process_time), min and median:
  fwd, bwd          kernels.linear_attn chunked_forward / chunked_backward entering from P and leaving with G
  states, outputs   deferred_states (M and P⁰, before the gather) and deferred_outputs (P there at the first poll)
  state_grads, grads   deferred_state_grads (dM and dP) and deferred_grads (G there at the first poll)
states + outputs against fwd and state_grads + grads against bwd is the split's own cost.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import lasp.kernels.linear_attn as K  # noqa: E402
from lasp.launch.bench import malloc_for_speed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--out")
    args = p.parse_args()
    malloc_for_speed()
    torch.set_num_threads(1)
    T, H, d = args.seq_len, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, T, H, d, generator=g) * 0.5 for _ in range(4))
    ld = -torch.logspace(-4, -1, H)
    P, G = (torch.randn(1, H, d, d, generator=g) * 0.1 for _ in range(2))
    st = {}

    def fwd():
        st["ck"] = K.chunked_forward(q, k, v, ld, None, P)[2]

    def bwd():
        K.chunked_backward(q, k, v, ld, None, P, do, G, st["ck"])

    def states():
        st["entries"] = K.deferred_states(k, v, ld, None)[1]

    def outputs():
        st["ck2"] = K.deferred_outputs(q, k, v, ld, None, st["entries"], lambda wait: P)[1]

    def state_grads():
        st["dP"] = K.deferred_state_grads(q, do, ld, None)[1]

    def grads():
        K.deferred_grads(q, k, v, do, ld, None, st["ck2"], st["dP"], lambda wait: G)
    cases = dict(fwd=fwd, bwd=bwd, states=states, outputs=outputs, state_grads=state_grads, grads=grads)
    times = {n: [] for n in cases}
    load_start = os.getloadavg()
    for rep in range(args.reps + 1):                      # the first repetition warms up
        for name, fn in cases.items():
            c0 = time.process_time()
            fn()
            if rep:
                times[name].append(time.process_time() - c0)
    rows = {n: dict(min_s=min(x), median_s=statistics.median(x), all_s=x) for n, x in times.items()}
    print(f"T={T} H={H} d={d} reps={args.reps}, load {load_start} -> {os.getloadavg()}")
    for n, row in rows.items():
        print(f"  {n:12s} min {row['min_s'] * 1e3:7.1f} ms  median {row['median_s'] * 1e3:7.1f} ms")
    for key in ("min_s", "median_s"):
        split = [rows[a][key] + rows[b][key] for a, b in (("states", "outputs"), ("state_grads", "grads"))]
        print(f"  split / kernel ({key[:-2]}): forward {split[0] / rows['fwd'][key]:.3f}, backward "
              f"{split[1] / rows['bwd'][key]:.3f}, both {sum(split) / (rows['fwd'][key] + rows['bwd'][key]):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(seq_len=T, heads=H, head_dim=d, reps=args.reps, load_start=load_start,
                           load_end=os.getloadavg(), rows=rows,
                           time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                           command=" ".join(["OMP_NUM_THREADS=1 python", *sys.argv])), f, indent=1)


if __name__ == "__main__":
    main()
