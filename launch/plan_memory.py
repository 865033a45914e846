"""Memory planner: the estimated peak memory per GPU (or per CPU rank) of a training job, before submitting it.

    python launch/plan_memory.py --model linear-llama3-1b-hybrid --seq-len 2097152 --sp 64 --dp 2 --zero 1
    python launch/plan_memory.py --model linear-llama3-8b --seq-len 65536 --sp 8 --gpu-mem-gib 80
    python launch/plan_memory.py --model linear-llama3-tiny --seq-len 2097152 --sp 8 --model.dim 32 --json

The model flag is pretrain's (`--model PRESET`; `--preset` is an alias), with the same --model.<field> flags. On
--device gpu it says whether the plan fits a GPU of --gpu-mem-gib (default 80): the estimate plus RUNTIME_GIB for
the CUDA context must not exceed it. When it does not fit, it searches the nearby plans with the same planner core
(sp doubled up to 64 times, ZeRO stages up to 3, activation checkpointing on) and prints the smallest changes that
fit: for each set of knobs, its cheapest fitting setting, unless fewer of those knobs already fit. More sp means
more GPUs (world = dp·sp·tp); ZeRO and checkpointing cost communication and recompute, not GPUs.
The estimate, its symbols and terms: parallel/memory.py (`plan`, importable without this script); the engines'
declared memory terms are listed at the end of --help.
"""
import argparse
import json


from lasp.launch.config import model_changes, parse_model_args
from lasp.parallel.memory import LINEAR_ENGINES, MiB, SOFTMAX_ENGINES, engine_help, plan

GiB = 1024 * MiB
RUNTIME_GIB = 1.0      # CUDA context and allocator reserve beside the estimate (parallel/memory.py: 0.5-1 GiB)
SP_DOUBLINGS = 6       # the search tries sp·2^k for k <= this


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
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU (default 80): says whether the plan fits and, if not, what would")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parse_model_args(p, argv, default="linear-llama3-1b-hybrid", flags=("--model", "--preset"))


def estimate(args, sp=None, zero=None, checkpointing=None):
    """parallel.memory.plan for the command line's job, with sp / zero / checkpointing replaced where given."""
    gpu = args.device == "gpu"
    return plan(args.model.arch, args.seq_len, args.sp if sp is None else sp, args.dp, args.tp,
                args.zero if zero is None else zero, args.checkpoint if checkpointing is None else checkpointing,
                args.batch, "bf16" if gpu else "fp32", args.linear, args.softmax, "triton" if gpu else "torch",
                args.layout, ep=args.ep)


def fits(est, gpu_mem_gib):
    return est["total"] / GiB + RUNTIME_GIB <= gpu_mem_gib


def ways_to_fit(args):
    """The smallest changes of sp, zero and checkpointing that make the plan fit --gpu-mem-gib -> [{"sp", "zero",
    "checkpointing", "changed": [knobs], "total_gib", "world"}], fewest knobs first. For each (checkpointing, zero)
    the smallest sp·2^k that fits (memory falls with each knob); a set of changed knobs is kept only when no subset
    of it fits by itself."""
    found = {}
    for checkpointing in sorted({args.checkpoint, True}):
        for zero in range(args.zero, 4):
            for sp in (args.sp * 2 ** k for k in range(SP_DOUBLINGS + 1)):
                try:
                    est = estimate(args, sp, zero, checkpointing)
                except ValueError:             # sp does not divide seq_len (or the heads, for Ulysses)
                    continue
                if fits(est, args.gpu_mem_gib):
                    changed = frozenset(k for k, new, old in (("sp", sp, args.sp), ("zero", zero, args.zero),
                                                              ("checkpointing", checkpointing, args.checkpoint))
                                        if new != old)
                    found.setdefault(changed, dict(sp=sp, zero=zero, checkpointing=checkpointing,
                                                   changed=sorted(changed), total_gib=est["total"] / GiB,
                                                   world=args.dp * sp * args.tp))
                    break
    minimal = [way for knobs, way in found.items() if knobs and not any(other < knobs for other in found)]
    return sorted(minimal, key=lambda w: (len(w["changed"]), w["world"], w["zero"]))


def _way_text(way):
    flags = [f"--sp {way['sp']} (world {way['world']})" if "sp" in way["changed"] else "",
             f"--zero {way['zero']}" if "zero" in way["changed"] else "",
             "--checkpoint" if "checkpointing" in way["changed"] else ""]
    return f"{' '.join(f for f in flags if f)}: {way['total_gib']:,.1f} GiB"


def _verdict(args, est):
    """(fits or None on CPU, lines saying so and what would fit)."""
    if args.device != "gpu":
        return None, []
    total = est["total"] / GiB
    if fits(est, args.gpu_mem_gib):
        return True, [f"  fits a {args.gpu_mem_gib:g} GiB GPU: {total:,.1f} GiB + {RUNTIME_GIB:g} GiB runtime"]
    ways = ways_to_fit(args)
    lines = [f"  does NOT fit a {args.gpu_mem_gib:g} GiB GPU: {total:,.1f} GiB + {RUNTIME_GIB:g} GiB runtime"]
    lines += [f"  would fit with {_way_text(w)}" for w in ways] or [
        f"  no plan with sp up to {args.sp * 2 ** SP_DOUBLINGS}, ZeRO up to 3 and checkpointing fits: raise --tp "
        f"or --gpu-mem-gib, or shorten --seq-len"]
    return False, lines


def main(argv=None):
    args = parse_args(argv)
    gpu = args.device == "gpu"
    changes = model_changes(args.model)
    try:
        est = estimate(args)
    except ValueError as e:
        raise SystemExit(f"plan_memory: error: {e}")
    ok, verdict = _verdict(args, est)
    if args.json:
        extra = dict(fits=ok, gpu_mem_gib=args.gpu_mem_gib if gpu else None, runtime_gib=RUNTIME_GIB if gpu else None,
                     ways_to_fit=ways_to_fit(args) if ok is False else [])
        print(json.dumps(dict(est, preset=args.preset, overrides=changes, seq_len=args.seq_len, **extra)))
        return
    print(f"{args.preset} {changes or ''}: {est['params'] / 1e6:,.1f}M parameters, "
          f"T = {args.seq_len:,} tokens, sp={args.sp} dp={args.dp} tp={args.tp} ep={args.ep}, "
          f"{'ZeRO-%d' % args.zero if args.zero else 'DDP'}, checkpointing {'on' if args.checkpoint else 'off'}, "
          f"{est['tokens_per_rank']:,} tokens per rank, {args.linear} + {args.softmax}")
    for term in ("parameters", "gradients", "optimizer_states", "activations", "comm_buffers", "total"):
        print(f"  {term.replace('_', ' '):18s} {est[term] / MiB:14,.1f} MiB")
    print(f"  (+ runtime: {'CUDA context ≈ 0.5-1 GiB' if gpu else 'interpreter, torch, gloo ≈ 0.4 GiB'} per rank)")
    print("\n".join(verdict))


if __name__ == "__main__":
    main()
