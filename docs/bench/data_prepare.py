"""Measure `python -m lasp.launch.prepare_data`: time, throughput and peak memory of the whole process tree
(docs/data.md). Corpora come from docs/bench/data_corpus.py.

    python docs/bench/data_prepare.py prepare CORPUS OUT --workers 2 --vocab-size 8192      # tokenizer trained
    python docs/bench/data_prepare.py prepare CORPUS OUT --workers 1 --tokenizer FILE      # tokenizing only
    python docs/bench/data_prepare.py encode CORPUS --tokenizer FILE                       # the floor: a plain loop

`prepare` samples the process tree every 0.1 s: the sum of resident memory (RSS, counting pages shared by the
forked workers once per process) and of proportional memory (PSS, shared pages split between their users: what the
tree really holds), and the largest single RSS. It prints one JSON line, with `uptime`'s load before and after.
`encode` is SentencePieceProcessor.encode called on each document of the jsonl in one process, no file written.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import psutil


def _load():
    return os.getloadavg()


def _tree_memory(proc):
    """(RSS sum, PSS sum, largest RSS) in bytes over proc and its children."""
    rss = pss = largest = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss, largest = rss + info.rss, pss + info.pss, max(largest, info.rss)
    return rss, pss, largest


def prepare(args):
    cmd = [sys.executable, "-m", "lasp.launch.prepare_data", "--corpus", args.corpus, "--out", args.out,
           "--workers", str(args.workers), "--no-progress"]
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else ["--vocab-size", str(args.vocab_size)]
    load_before, start = _load(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak = psutil.Process(proc.pid), [0, 0, 0]
    while proc.poll() is None:
        peak = [max(a, b) for a, b in zip(peak, _tree_memory(watched))]
        time.sleep(0.1)
    wall, output = time.perf_counter() - start, proc.stdout.read()
    found = re.search(r"([\d.]+) MB of text, ([\d,]+) tokens, tokenized in ([\d.]+) s .*, ([\d.]+) CPU s, ([\d.]+) of them", output)
    if proc.returncode or not found:
        raise SystemExit(f"prepare_data failed ({proc.returncode}):\n{output}")
    mb, n_tokens, seconds, cpu = float(found[1]), int(found[2].replace(",", "")), float(found[3]), float(found[4])
    return {"mode": "prepare", "corpus": args.corpus, "workers": args.workers, "tokenizer_given": bool(args.tokenizer),
            "vocab_size": None if args.tokenizer else args.vocab_size, "text_mb": mb, "tokens": n_tokens,
            "wall_s": round(wall, 2), "tokenize_s": seconds, "tokenize_mb_per_s": round(mb / seconds, 3),
            "tokens_per_s": round(n_tokens / seconds), "tokenize_cpu_s": cpu, "parent_cpu_s": float(found[5]),
            "mb_per_cpu_s": round(mb / cpu, 3), "peak_rss_sum_mb": round(peak[0] / 1e6),
            "peak_pss_sum_mb": round(peak[1] / 1e6), "peak_largest_rss_mb": round(peak[2] / 1e6),
            "load_before": load_before, "load_after": _load()}


def encode(args):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    load_before, n_bytes, n_tokens = _load(), 0, 0
    start, cpu = time.perf_counter(), time.process_time()
    with open(args.corpus, "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            n_bytes += len(line)
            n_tokens += len(sp.encode(text))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"mode": "encode", "corpus": args.corpus, "text_mb": round(n_bytes / 1e6, 1), "tokens": n_tokens,
            "seconds": round(seconds, 2), "mb_per_s": round(n_bytes / 1e6 / seconds, 3),
            "tokens_per_s": round(n_tokens / seconds), "cpu_s": round(cpu, 2),
            "mb_per_cpu_s": round(n_bytes / 1e6 / cpu, 3), "load_before": load_before, "load_after": _load()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["prepare", "encode"])
    p.add_argument("corpus")
    p.add_argument("out", nargs="?")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer")
    args = p.parse_args(argv)
    print(json.dumps(prepare(args) if args.mode == "prepare" else encode(args)), flush=True)


if __name__ == "__main__":
    main()
