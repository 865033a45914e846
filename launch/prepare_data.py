"""Prepare pretraining data once, in parallel: corpus -> tokenizer + token stream folder for --data.prepared.

    python -m lasp.launch.prepare_data --corpus data/ --out prepared/web --workers 8 --vocab-size 32000
    python -m lasp.launch.prepare_data --corpus a.jsonl.gz b.txt --out prepared/ab --tokenizer tok.model
    torchrun --nproc-per-node 4 launch/pretrain.py --data.prepared prepared/web

Streams .txt / .jsonl files (gzipped or not, or folders of them), trains a sentencepiece BPE tokenizer on a bounded
sample (or takes --tokenizer), tokenizes in --workers processes and writes the folder atomically (launch/tokens.py:
a killed run leaves nothing that reads as complete; run it again). Memory does not grow with the corpus. Exit codes:
0 done (or already prepared), 2 bad input, one message naming the file. docs/data.md has formats and measurements.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from lasp.launch.tokens import corpus_files, is_prepared, prepare, prepare_settings, text_bytes

__all__ = ["main"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lasp.launch.prepare_data", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help=".txt/.jsonl(.gz) files or folders")
    p.add_argument("--out", required=True, metavar="DIR", help="the prepared folder (must not exist, or be complete)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), metavar="N", help="tokenizing processes")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--vocab-size", type=int, default=1024, metavar="V", help="train a V-piece BPE tokenizer")
    source.add_argument("--tokenizer", metavar="FILE", help="use this sentencepiece .model instead of training")
    p.add_argument("--text-key", default="text", help="the jsonl field holding a document")
    p.add_argument("--sample-mb", type=float, default=32, help="text the tokenizer trains on, at most (MB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name, low in (("workers", 1), ("vocab_size", 16), ("sample_mb", 0.001)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    return args


class _Progress:
    """A tqdm bar over text bytes (the total is an estimate for .gz), with MB/s and tokens/s."""

    def __init__(self, total, enabled):
        from tqdm import tqdm
        tqdm.monitor_interval = 0                 # no monitor thread in the process that forks the workers
        self.bar = tqdm(total=total, unit="B", unit_scale=True, disable=not enabled, desc="tokenizing",
                        dynamic_ncols=True)
        self.tokens, self.start, self.cpu = 0, time.perf_counter(), _cpu()

    def __call__(self, n_bytes, n_tokens):
        if not (n_bytes or n_tokens):                 # the tokenizer is ready: the rates count from here
            self.start, self.cpu = time.perf_counter(), _cpu()
            self.bar.reset()
        self.tokens += n_tokens
        self.bar.update(n_bytes)
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {rate / 1e6:.2f}M tokens/s", refresh=False)

    def close(self):
        """-> (tokens, wall seconds, CPU seconds of this process and its finished workers) since tokenizing began."""
        self.bar.close()
        return self.tokens, time.perf_counter() - self.start, [b - a for a, b in zip(self.cpu, _cpu())]


def _cpu():
    """(CPU seconds of this process and its finished workers, of this process alone)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system, t.user + t.system


def _already_prepared(args, files):
    """0 when args.out holds what these arguments would write; ValueError naming the differences otherwise."""
    path = Path(args.out).expanduser() / "manifest.json"
    try:
        before = json.loads(path.read_text()).get("settings", {})
    except (OSError, ValueError) as e:
        raise ValueError(f"--out: {path} cannot be read ({e}): delete {args.out} and prepare again") from None
    now = prepare_settings(files, args.text_key, args.vocab_size, args.tokenizer, args.sample_mb)
    diff = [f"{k} was {before.get(k)!r}, now {v!r}" for k, v in now.items() if before.get(k) != v]
    if diff:
        raise ValueError(f"--out: {args.out} was prepared with other settings ({'; '.join(diff)}): choose another "
                         f"--out, or delete it to prepare again")
    print(f"prepare_data: {args.out} is already prepared from these files and settings: nothing to do")
    return 0


def main(argv=None):
    """0 prepared (or already complete), 2 bad input (one message, no traceback)."""
    args = parse_args(argv)
    try:
        files = corpus_files(args.corpus)
        if is_prepared(args.out):
            return _already_prepared(args, files)
        total = sum(map(text_bytes, files))
        if args.tokenizer is None:
            print(f"prepare_data: training a {args.vocab_size}-piece tokenizer on at most {args.sample_mb:g} MB of "
                  f"{total / 1e6:.1f} MB", file=sys.stderr, flush=True)
        progress = _Progress(total, not args.no_progress)
        try:
            out = prepare(files, args.out, args.text_key, args.vocab_size, args.tokenizer, args.workers,
                          args.sample_mb, progress=progress)
        finally:
            tokens, seconds, cpu = progress.close()
    except ValueError as e:
        print(f"prepare_data: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"prepare_data: {out}: {total / 1e6:.1f} MB of text, {tokens:,} tokens, tokenized in {seconds:.1f} s "
          f"({total / 1e6 / max(seconds, 1e-9):.2f} MB/s, {cpu[0]:.1f} CPU s, {cpu[1]:.1f} of them in this process); train with --data.prepared {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
