"""docs/bench/model_step.py with every length in a fresh job: what training at one length costs (issue 13).

    OMP_NUM_THREADS=1 python docs/bench/model_step_fresh.py --seq-lens 16384,65536,262144,1048576 --rounds 2 \
        --out docs/bench/model_step_fresh.json

In one job, a step after a 1M-token step costs up to 2.4× a steady one at 16K tokens (the allocator and caches
still hold the big step's state; one job at one length never pays that). Here each (round, length) is its own
`torchrun --nproc-per-node W docs/bench/model_step.py --seq-lens T --reps 1 --malloc heap` (one untimed step,
then an untimed and a timed one), lengths in turn within a round so that the load falls on all alike; reported
per length: the median over rounds of the slowest rank's wall seconds and of the per-rank CPU seconds.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from model_step import summarize  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq-lens", default="16384,65536,262144,1048576")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--out")
    args, model_args = p.parse_known_args()                  # the rest goes to model_step.py (--dim, --heads, ...)
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    load_start, times = os.getloadavg(), {T: [] for T in seq_lens}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for T in seq_lens:
                out = os.path.join(tmp, f"{rnd}_{T}.json")
                proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       f"--nproc-per-node={args.nproc}", os.path.join(HERE, "model_step.py"),
                                       "--seq-lens", str(T), "--reps", "1",
                                       "--malloc", "heap", "--out", out, *model_args],
                                      capture_output=True, text=True)
                if not os.path.exists(out):
                    sys.exit(f"model_step.py failed at T={T}:\n{proc.stderr[-3000:]}")
                with open(out) as f:
                    row = json.load(f)["rows"][0]
                times[T].append(row["rounds"][0])
                print(f"round {rnd} T={T}: wall {row['wall_s']:.2f} s, CPU {row['cpu_s']:.2f} s", flush=True)
    rows = summarize(times, args.nproc, f"W={args.nproc} fresh job per length, load {load_start} -> {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(W=args.nproc, rounds=args.rounds, model_args=model_args, load_start=load_start,
                           load_end=os.getloadavg(), rows=rows,
                           time_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                           command=" ".join(["OMP_NUM_THREADS=1 python", *sys.argv])), f, indent=1)


if __name__ == "__main__":
    main()
