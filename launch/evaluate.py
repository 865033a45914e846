"""Held-out perplexity of a saved model: `python -m lasp.launch.evaluate MODEL.pt [--data.corpus ...] [--json F]`.

    python -m lasp.launch.evaluate runs/x/model.pt                  # the run's own corpus, tokenizer and seq_len
    python -m lasp.launch.evaluate runs/x/model.pt --data.corpus other.jsonl --data.seq_len 512
    torchrun --nproc-per-node 2 -m lasp.launch.evaluate runs/x/model.pt --sp 2 --json runs/x/eval.json

MODEL.pt is a models.save_model file (<run dir>/model.pt). What belongs to it comes from the model.json that
pretrain writes beside it (launch/report.py): the run's corpus, text_key, seq_len and token cache, and its
tokenizer (<run dir>/tokenizer.model). The flags take pretrain's names (--data.corpus, --data.text_key,
--data.seq_len, --data.batch_size, --data.cache_dir; the older --data, --text-key, --seq-len, --batch-size,
--cache-dir still work) and override the run's values: an explicit other corpus is scored with the model's
tokenizer. Without a model.json (a file saved by itself) the defaults are the embedded corpus and seq_len 256, and
the output says so. The corpus is tokenized into the launch/data.py cache, and its held-out split
(launch.data.split_bounds: the last 5% of the stream, which training never reads) is packed into seq_len sequences
and scored in order: mean cross-entropy over the masked labels, perplexity = exp(loss), next-token accuracy. Under
torchrun the ranks form dp × sp (the training core's mesh, launch.trainer.setup_mesh): each sequence is split over
the sp ranks of a group by --layout and the engines are set as in training (launch.engine.parallelize); dp groups
take every dp-th batch; sums are all-reduced in float64, so every world prints the same numbers (to float32
rounding). Exit codes: 0 done, 2 bad input (not a model file, tokenizer vocabulary != model vocabulary, a split
shorter than one sequence, an unreadable model.json), one line printed once, no traceback.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["sentencepiece_size", "score_batch", "evaluate_batches", "heldout_dataset", "parse_args", "settings",
           "evaluate", "main"]

# Without a model.json and without the flag (evaluation's own batch size is not the run's per-rank batch)
DEFAULTS = {"corpus": [], "text_key": "text", "seq_len": 256, "batch_size": 8, "cache_dir": "~/.cache/lasp"}


def score_batch(model, batch):
    """A (local shard) batch -> float64 tensor [loss_sum, label count, correct argmax] over loss_mask labels."""
    hidden = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    loss_sum, count = model.loss(hidden, batch["labels"], batch["loss_mask"])
    correct = ((model.logits(hidden).argmax(-1) == batch["labels"]) & batch["loss_mask"]).sum()
    return torch.stack([loss_sum.detach().double(), torch.as_tensor(count).double(), correct.double()])


@torch.no_grad()
def evaluate_batches(model, batches, layout="contiguous", sp_rank=0, sp=1, device="cpu"):
    """Sum score_batch over `batches` (full (B, T) batches, sharded here for this sp rank), then over all ranks
    -> {"loss", "perplexity", "accuracy", "tokens"}. Every rank must pass the same number of batches per sp group."""
    from lasp.launch.data import shard_batch
    from lasp.parallel import comm
    total = torch.zeros(3, dtype=torch.float64, device=device)
    model.eval()
    for batch in batches:
        local = {k: v.to(device) for k, v in shard_batch(batch, layout, sp_rank, sp).items()}
        total += score_batch(model, local)
    total = comm.all_reduce(total)
    loss_sum, tokens, correct = total.tolist()
    if tokens == 0:
        raise ValueError("no labels to score (every loss_mask entry is False)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / tokens,
            "tokens": int(tokens)}


def sentencepiece_size(tokenizer_file):
    """The number of pieces of a sentencepiece model file; ValueError naming the file otherwise."""
    import sentencepiece
    if not Path(tokenizer_file).is_file():
        raise ValueError(f"no tokenizer {tokenizer_file} (pass --tokenizer, the run's tokenizer.model)")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{tokenizer_file} is not a sentencepiece model ({e})") from None


def _load_checked(model_file, tokenizer_file):
    """The model on CPU; ValueError naming files and numbers when it or the tokenizer does not fit."""
    from lasp.launch.cli import load_model_file
    model = load_model_file(model_file, "evaluate")   # ValueError for a file or archive that holds no model
    pieces = sentencepiece_size(tokenizer_file)
    if pieces != model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_file} has {pieces} pieces but model "
                         f"{model_file} has vocab_size {model.config.vocab_size}: pass the tokenizer.model of the "
                         f"run that wrote the model")
    return model


def heldout_dataset(corpus, text_key, tokenizer_file, seq_len, cache_dir):
    """The held-out split of `corpus` tokenized with `tokenizer_file` -> launch.data.PackedDataset."""
    from lasp.launch.data import PackedDataset, build_cache, cache_path, check_corpus, corpus_files
    files = corpus_files(corpus)
    check_corpus(files, text_key)
    path = cache_path(files, text_key, 0, cache_dir, tokenizer_file=tokenizer_file)
    build_cache(files, text_key, 0, path, tokenizer_file=tokenizer_file)   # atomic: ranks may race
    return PackedDataset(path, seq_len, split="heldout")


def parse_args(argv=None):
    from lasp.launch.config import add_section_flags
    p = argparse.ArgumentParser(prog="python -m lasp.launch.evaluate", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("model", help="a models.save_model file, e.g. <run dir>/model.pt")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model (default: the run's, beside MODEL)")
    add_section_flags(p, "data", ("corpus", "text_key", "seq_len", "batch_size", "cache_dir"),
                      aliases={"corpus": ["--data"], "text_key": ["--text-key"], "seq_len": ["--seq-len"],
                               "batch_size": ["--batch-size"], "cache_dir": ["--cache-dir"]})
    p.add_argument("--max-sequences", type=int, default=0, help="score only the first N held-out sequences (0 = all)")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks per sequence (torchrun world / sp = dp)")
    p.add_argument("--layout", default="contiguous", help="contiguous | zigzag")
    p.add_argument("--linear", default="lasp2", help="linear-attention engine (lasp.LINEAR_ENGINES)")
    p.add_argument("--softmax", default="allgather", help="softmax-attention engine (lasp.SOFTMAX_ENGINES)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    return p.parse_args(argv)


def settings(args):
    """-> ({corpus, text_key, seq_len, batch_size, cache_dir, tokenizer}, {key: where it came from}): the flag, else
    the run's model.json beside the model, else DEFAULTS. ValueError for a model of a synthetic-data run."""
    from lasp.launch.report import MODEL_CARD, read_model_card
    card = read_model_card(args.model)
    run = card["data"] if card else {}
    if run.get("mqar") and "data.corpus" not in vars(args):
        raise ValueError(f"{args.model} was trained on synthetic MQAR sequences (data.mqar in its {MODEL_CARD}), "
                         f"not text: score it with launch/mqar.py, or pass --data.corpus and --tokenizer")
    out, source = {}, {}
    for key, default in DEFAULTS.items():
        if f"data.{key}" in vars(args):
            out[key], source[key] = vars(args)[f"data.{key}"], "--data." + key
        elif key in run and key != "batch_size":
            out[key], source[key] = run[key], MODEL_CARD
        else:
            out[key], source[key] = default, "default" + (f" (no {MODEL_CARD} beside the model)" if not card else "")
    if "data.corpus" not in vars(args):         # a run on prepared or Megatron data scores that stream's held-out part
        for key in ("prepared", "indexed", "vocab_size"):
            if run.get(key):
                out[key], source[key] = run[key], MODEL_CARD
    beside = Path(args.model).resolve().parent / "tokenizer.model"
    out["tokenizer"] = args.tokenizer or str(beside)
    source["tokenizer"] = "--tokenizer" if args.tokenizer else "beside the model"
    return out, source


def _batches(dataset, n_sequences, batch_size, dp_rank, dp):
    """Every dp-th batch of the first n_sequences held-out sequences, in order."""
    starts = range(dp_rank * batch_size, n_sequences, dp * batch_size)
    return (dataset.rows(range(s, min(s + batch_size, n_sequences))) for s in starts)


def evaluate(args):
    """Check the inputs (ValueError before any collective), then score the held-out split -> result dict."""
    from lasp.launch.config import ParallelConfig
    from lasp.launch.engine import parallelize
    from lasp.launch.trainer import setup_mesh
    from lasp.parallel.mesh import check_mesh_sizes, dist_env
    from lasp.parallel.layout import local_positions
    data, source = settings(args)
    model = _load_checked(args.model, data["tokenizer"])
    world = dist.get_world_size() if dist.is_initialized() else dist_env()[1]
    check_mesh_sizes(world, args.sp)
    local_positions(data["seq_len"], args.layout, 0, args.sp)           # seq_len fits the layout
    if data.get("prepared") or data.get("indexed"):
        from lasp.launch.data import PackedDataset
        from lasp.launch.tokens import open_indexed, open_prepared
        stream = (open_prepared(data["prepared"]) if data.get("prepared") else
                  open_indexed(data["indexed"], data["vocab_size"]))
        dataset = PackedDataset(stream, data["seq_len"], split="heldout")
    else:
        dataset = heldout_dataset(data["corpus"], data["text_key"], data["tokenizer"], data["seq_len"],
                                  data["cache_dir"])
    n = min(dataset.n_sequences, args.max_sequences or dataset.n_sequences)
    mesh = setup_mesh(args.sp, 1)                                     # the training core's mesh and engines
    parallelize(model, ParallelConfig(sp=args.sp, layout=args.layout, linear=args.linear, softmax=args.softmax,
                                      activation_checkpointing=False), mesh)
    dp_rank, sp_rank = mesh.rank_in("dp"), mesh.rank_in("sp")
    result = evaluate_batches(model, _batches(dataset, n, data["batch_size"], dp_rank, mesh.dp), args.layout,
                              sp_rank, args.sp)
    cfg = model.config
    return {"model": str(args.model), "tokenizer": data["tokenizer"], "family": model.family,
            "pattern": getattr(cfg, "pattern", None), "vocab_size": cfg.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "split": "heldout",
            "corpus": ([f"data.prepared {data['prepared']}"] if data.get("prepared") else
                       [f"data.indexed {p}" for p in data.get("indexed") or []] or
                       [str(p) for p in data["corpus"]] or ["embedded"]), "heldout_tokens": len(dataset.tokens),
            "seq_len": data["seq_len"], "sequences": n, "world_size": world, "sp": args.sp, "settings_from": source,
            **result}


def _table(r):
    src = r["settings_from"]
    return "\n".join([
        f"model      {r['model']} ({r['family']} {r['pattern'] or ''}, {r['parameters'] / 1e6:.2f}M parameters, "
        f"vocab {r['vocab_size']})",
        f"corpus     {', '.join(r['corpus'])} (from {src.get('prepared') or src.get('indexed') or src['corpus']}); tokenizer {r['tokenizer']} "
        f"({src['tokenizer']})",
        f"held-out   {r['heldout_tokens']} tokens (the last 5% of the stream), {r['sequences']} sequences of "
        f"{r['seq_len']} (from {src['seq_len']}); world {r['world_size']}, sp {r['sp']}",
        f"{'loss':>10} {'perplexity':>11} {'accuracy':>9} {'tokens':>8}",
        f"{r['loss']:10.5f} {r['perplexity']:11.3f} {r['accuracy']:9.4f} {r['tokens']:8d}"])


def _report(args):
    result = evaluate(args)
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        print(_table(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None):
    """Command-line entry: 0 done, 2 bad input (one line by local rank 0, no traceback; launch/cli.py)."""
    from lasp.launch.cli import run_entry
    return run_entry("evaluate", parse_args, _report, argv)


if __name__ == "__main__":
    sys.exit(main())
