"""Memory planner: the estimated peak memory per GPU (or per CPU rank) of a training job, before submitting it.

    python launch/plan_memory.py --preset linear-llama3-1b-hybrid --seq-len 2097152 --sp 64 --dp 2 --zero 1
    python launch/plan_memory.py --preset linear-llama3-tiny --seq-len 2097152 --sp 8 --model.dim 32 --json

The estimate, its symbols and terms: parallel/memory.py (`plan`, importable without this script); the engines'
declared memory terms are listed at the end of --help.
"""
import argparse
import json


from lasp.launch.config import model_changes, parse_model_args
from lasp.parallel.memory import LINEAR_ENGINES, MiB, SOFTMAX_ENGINES, engine_help, plan


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    """The options, --preset and one typed --model.<field> per field of its family (launch.config generates them,
    as for every entry point); exit 2 on a bad one."""
    p = argparse.ArgumentParser(description=__doc__, epilog=engine_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, required=True, help="global tokens per sequence")
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks within dp x sp (routed experts)")
    p.add_argument("--zero", type=int, default=0, help="0 = DDP, 1-3 = ZeRO stage")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="per-block activation checkpointing (default on)")
    p.add_argument("--batch", type=int, default=1, help="sequences per rank")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: bf16 autocast + Triton kernels; cpu: fp32 + torch kernels")
    p.add_argument("--linear", choices=LINEAR_ENGINES, default="lasp2")
    p.add_argument("--softmax", choices=SOFTMAX_ENGINES, default="allgather")
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parse_model_args(p, argv, default="linear-llama3-1b-hybrid")


def main(argv=None):
    args = parse_args(argv)
    gpu = args.device == "gpu"
    changes = model_changes(args.model)
    try:
        est = plan(args.model.arch, args.seq_len, args.sp, args.dp, args.tp, args.zero, args.checkpoint,
                   args.batch, "bf16" if gpu else "fp32", args.linear, args.softmax, "triton" if gpu else "torch",
                   args.layout, ep=args.ep)
    except ValueError as e:
        raise SystemExit(f"plan_memory: {e}")
    if args.json:
        print(json.dumps(dict(est, preset=args.preset, overrides=changes, seq_len=args.seq_len)))
        return
    print(f"{args.preset} {changes or ''}: {est['params'] / 1e6:,.1f}M parameters, "
          f"T = {args.seq_len:,} tokens, sp={args.sp} dp={args.dp} tp={args.tp} ep={args.ep}, "
          f"{'ZeRO-%d' % args.zero if args.zero else 'DDP'}, checkpointing {'on' if args.checkpoint else 'off'}, "
          f"{est['tokens_per_rank']:,} tokens per rank, {args.linear} + {args.softmax}")
    for term in ("parameters", "gradients", "optimizer_states", "activations", "comm_buffers", "total"):
        print(f"  {term.replace('_', ' '):18s} {est[term] / MiB:14,.1f} MiB")
    print(f"  (+ runtime: {'CUDA context ≈ 0.5-1 GiB' if gpu else 'interpreter, torch, gloo ≈ 0.4 GiB'} per rank)")


if __name__ == "__main__":
    main()
