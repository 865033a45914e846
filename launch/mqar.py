"""MQAR sweep (Zoology's multi-query associative recall): recall accuracy of model patterns against key-value pairs.

    python -m lasp.launch.mqar --json docs/quality/mqar.json --plot docs/quality/mqar.png      # the measurement
    python -m lasp.launch.mqar --quick                                                          # smoke run, every pattern

For every pattern (SWEEP: pure linear, hybrids with one softmax layer last or first, all softmax, gated linear, a
softmax-first gated hybrid, pure linear and the softmax-last hybrid with a short convolution of width 4) and every
number of pairs K, one run of the real training loop, launch.trainer.train, on data.mqar = {"kv_pairs": K} (the
task is launch.data.MQARDataset: K key-value pairs, then the K keys queried again; the loss counts only the query
positions), at a fixed width (MODEL; the --model.<field> flags change it, except pattern, linear_decay and
short_conv, which SWEEP sets). Then the exported model.pt is scored
on fresh sequences (another generator seed) by launch.evaluate.evaluate_batches: accuracy = the fraction of query
positions whose argmax is the value. --json writes {"records": [{"pattern", "mixer", "kv_pairs", "seq_len", "dim",
"accuracy", "steps", "seconds", ...}]}; --plot draws accuracy against kv_pairs, one line per pattern. Each run is
one process on CPU (or the GPU torch finds); the runs' folders go under --run-root.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["SWEEP", "parse_args", "mqar_config", "run_one", "plot", "main"]

# name -> (pattern over n_layers, linear_decay, short_conv, what mixes tokens). The hybrids put their one softmax
# layer last (LN) or first (NL): recall needs a previous-token step before the lookup (docs/quality.md); softmax with
# RoPE can make it, and so can a short convolution (width 4 on q, k, v: the "-conv" variants, issue 26).
SWEEP = {
    "linear": ("L", "none", 0, "linear attention (no decay)"),
    "hybrid": ("LN", "none", 0, "linear attention, then one softmax layer"),
    "softmax-first": ("NL", "none", 0, "one softmax layer, then linear attention"),
    "softmax": ("N", "none", 0, "softmax attention"),
    "gated": ("L", "gated", 0, "gated linear attention (data-dependent forget gate)"),
    "gated-softmax-first": ("NL", "gated", 0, "one softmax layer, then gated linear attention"),
    "linear-conv": ("L", "none", 4, "linear attention with a short convolution (w = 4) on q, k, v"),
    "hybrid-conv": ("LN", "none", 4, "linear attention with a short convolution (w = 4), then one softmax layer"),
    # Qwen3-Next's layers at the same width (models/qwen3_next.py: its convolution of width 4 is part of the layer)
    "gated-deltanet": ("LL", "deltanet", 4, "Gated DeltaNet (Qwen3-Next's linear layer), 2 layers"),
    "gated-deltanet-hybrid": ("LLLN", "deltanet", 4, "3 Gated DeltaNet layers, then one gated softmax layer"),
}
# The swept model before the --model.<field> flags (pattern, linear_decay and short_conv then come from SWEEP)
PRESET = "linear-llama3-tiny"
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 1, "n_kv_heads": 1, "ffn_dim": 128, "pattern": "L",
         "loss_chunk_tokens": 4096}


def parse_args(argv=None):
    # defaults: the committed sweep (docs/quality.md: the settings that left the bag-of-values plateau on 2 CPUs)
    p = argparse.ArgumentParser(prog="python -m lasp.launch.mqar", description=__doc__.splitlines()[0])
    p.add_argument("--patterns", nargs="*", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--kv-pairs", nargs="*", type=int, default=[2, 4, 8])
    p.add_argument("--min-kv-pairs", type=int, default=0, help="curriculum: a training sequence draws K from "
                   "[this, kv_pairs] (0 = always kv_pairs); evaluation always uses kv_pairs")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="model initialisation and training sequences")
    p.add_argument("--eval-sequences", type=int, default=256)
    p.add_argument("--run-root", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--plot", default=None, metavar="PNG")
    p.add_argument("--quick", action="store_true", help="smoke run: every pattern, 2 pair counts, a few steps")
    from lasp.launch.config import ModelConfig, add_model_flags, model_arch, model_flags
    base = model_arch(PRESET, MODEL, "launch.mqar.MODEL")
    skip = ("vocab_size", "pattern", "linear_decay", "short_conv")           # vocab: --vocab-size; the rest: SWEEP
    add_model_flags(p, PRESET, skip=skip, base=base)                                     # as every entry point
    args = p.parse_args(argv)
    try:
        args.model = ModelConfig(PRESET, arch=model_arch(PRESET, model_flags(args), base=base))   # typed, checked
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        args.kv_pairs, args.steps, args.eval_sequences, args.warmup = args.kv_pairs[:2], 3, 16, 1
        args.batch_size, args.seq_len = 4, 32
    return args


def mqar_config(args, name, kv_pairs, run_dir):
    """The launch.config.TrainConfig of one run (validated by the trainer's check_config when it starts)."""
    import dataclasses
    from lasp.launch.config import TrainConfig, merge
    pattern, decay, conv, _ = SWEEP[name]
    cfg = TrainConfig()
    merge(cfg, {
        "model": {"preset": PRESET},
        "parallel": {"activation_checkpointing": False},
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": args.warmup, "max_steps": args.steps,
                  "weight_decay": args.weight_decay},
        "data": {"vocab_size": args.vocab_size, "seq_len": args.seq_len, "batch_size": args.batch_size,
                 "seed": args.seed, "mqar": {"kv_pairs": kv_pairs, "min_kv_pairs": args.min_kv_pairs}},
        "checkpoint": {"every": 0, "keep": 1},
        "run": {"dir": str(run_dir), "seed": args.seed, "progress": False, "sample_tokens": 0, "dtype": "fp32"},
    }, "launch/mqar.py")
    if decay == "deltanet":
        cfg.model.preset, cfg.model.arch = "qwen3-next-tiny", _qwen3_next_arch(args.model.arch, pattern)
    else:
        cfg.model.arch = dataclasses.replace(args.model.arch, pattern=pattern, linear_decay=decay, short_conv=conv)
    return cfg


def _qwen3_next_arch(arch, pattern):
    """A Qwen3-Next config of the sweep's width and heads with `pattern` (L... then at most one N, last)."""
    from lasp.models import Qwen3NextConfig
    d = arch.dim // arch.n_heads
    return Qwen3NextConfig(vocab_size=arch.vocab_size, dim=arch.dim, n_layers=len(pattern),
                           full_attention_interval=len(pattern) + ("N" not in pattern), n_heads=arch.n_heads,
                           n_kv_heads=arch.n_kv_heads, head_dim=d, linear_key_heads=arch.n_heads,
                           linear_value_heads=arch.n_heads, linear_key_dim=d, linear_value_dim=d,
                           ffn_dim=arch.ffn_dim, loss_chunk_tokens=arch.loss_chunk_tokens)


def run_one(args, name, kv_pairs, run_dir):
    """Train one (pattern, K) through launch.trainer.train, score model.pt on fresh sequences -> a record."""
    from lasp import models
    from lasp.launch.data import MQARDataset
    from lasp.launch.evaluate import evaluate_batches
    from lasp.launch.trainer import train
    cfg = mqar_config(args, name, kv_pairs, run_dir)
    start = time.perf_counter()
    losses = train(cfg)["losses"]
    seconds = time.perf_counter() - start
    model = models.load_model(Path(run_dir) / "model.pt")
    test = MQARDataset({"kv_pairs": kv_pairs, "seed": 1}, args.seq_len, args.vocab_size, args.seed)
    batches = (test.rows(range(i, min(i + 64, args.eval_sequences))) for i in range(0, args.eval_sequences, 64))
    scores = evaluate_batches(model, batches)
    pattern = model.config.layer_types()
    return {"pattern": pattern, "mixer": SWEEP[name][3], "short_conv": SWEEP[name][2], "name": name,
            "kv_pairs": kv_pairs, "seq_len": args.seq_len,
            "dim": args.model.arch.dim, "n_layers": model.config.n_layers, "vocab_size": args.vocab_size,
            "accuracy": scores["accuracy"], "loss": scores["loss"], "train_loss": losses[max(losses)],
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "min_kv_pairs": args.min_kv_pairs,
            "seed": args.seed, "eval_queries": scores["tokens"], "seconds": round(seconds, 1)}


def plot(records, path):
    """Accuracy against kv_pairs, one line per pattern name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in dict.fromkeys(r["name"] for r in records):
        rows = sorted((r["kv_pairs"], r["accuracy"]) for r in records if r["name"] == name)
        label = f"{name} ({next(r['pattern'] for r in records if r['name'] == name)})"
        conv = any(r.get("short_conv") for r in records if r["name"] == name)     # dashed: short convolution
        ax.plot(*zip(*rows), marker="s" if conv else "o", ls="--" if conv else "-", label=label)
    first = records[0]
    ax.set(xlabel="key-value pairs", ylabel="MQAR accuracy", ylim=(0, 1.02), xscale="log", title=(
        f"MQAR, width {first['dim']}, T {first['seq_len']}, {first['steps']} steps"))
    ax.set_xticks(sorted({r["kv_pairs"] for r in records}), [str(k) for k in sorted({r["kv_pairs"] for r in records})])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    """Run the sweep; prints a table row per run; exit 2 on bad input (ValueError, e.g. K too many for seq_len)."""
    args = parse_args(argv)
    root = Path(args.run_root or tempfile.mkdtemp(prefix="mqar-"))
    records = []
    try:
        for name in args.patterns:
            for kv_pairs in args.kv_pairs:
                records.append(run_one(args, name, kv_pairs, root / f"{name}-K{kv_pairs}"))
                r = records[-1]
                print(f"mqar: {name:8s} {r['pattern']:6s} K={kv_pairs:3d} accuracy {r['accuracy']:.3f} "
                      f"(train loss {r['train_loss']:.3f}, {r['seconds']:.0f} s)", flush=True)
    except ValueError as e:
        print(f"mqar: error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python -m lasp.launch.mqar", *(argv or sys.argv[1:])]),
                                               "records": records}, indent=1) + "\n")
    if args.plot:
        plot(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
