"""Sample from a model checkpoint: `python -m lasp.launch.generate MODEL.pt --prompt "..." [--tokenizer spm.model]`.

    python -m lasp.launch.generate runs/default/model.pt --prompt "ROMEO."      # text: tokenizer.model beside it
    python -m lasp.launch.generate runs/default/model.pt --ids --prompt "1 2 3"  # raw token ids in and out

MODEL.pt is a `model.pt` written by `models.save_model` ({"model_config", "model"}) or a run folder holding one.
The tokenizer is --tokenizer, else the one its run recorded beside it (model.json's "tokenizer", i.e.
<run dir>/tokenizer.model, which pretrain writes there); the prompt is then text and the output decoded text. With
--ids, or when there is no tokenizer (a model saved by itself, an MQAR run), the prompt is token ids ("1 2 3" or
"1,2,3") and the output is ids. Decoding: one parallel prefill, then linear layers step their O(1) recurrent state
and softmax layers their KV cache (models/generation.py). Exit codes: 0 done, 2 bad input (one line, no traceback).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from lasp.launch.cli import load_model_file, run_entry
from lasp.launch.report import read_model_card
from lasp.models.generation import generate

__all__ = ["parse_args", "find_tokenizer", "generate_text", "main"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lasp.launch.generate", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="model.pt, or a run folder containing model.pt")
    p.add_argument("--prompt", default="", help="text (with a tokenizer) or token ids")
    p.add_argument("--tokenizer", default=None,
                   help="sentencepiece .model file (default: the run's tokenizer.model beside MODEL, if any)")
    p.add_argument("--ids", action="store_true", help="the prompt and the output are token ids, even with a tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def find_tokenizer(model_file, given=None):
    """(tokenizer path or None, where it came from): --tokenizer, else the run's (model.json), else a
    tokenizer.model beside the model."""
    if given:
        return given, "--tokenizer"
    card = read_model_card(model_file) or {}
    name = card.get("tokenizer") if isinstance(card.get("tokenizer"), str) else "tokenizer.model"
    beside = Path(model_file).resolve().parent / Path(name).name
    return (str(beside), "beside the model") if beside.is_file() else (None, "none found")


def _load_tokenizer(path):
    import sentencepiece
    if not Path(path).is_file():
        raise ValueError(f"no tokenizer {path}")
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a sentencepiece model ({str(e).splitlines()[0]})") from None


def _encode(prompt, tokenizer):
    """-> list of ids. Raw ids need no tokenizer; an empty prompt starts from the tokenizer's BOS (or id 0)."""
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
        return ids or [max(tokenizer.bos_id(), 0)]
    try:
        ids = [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"without a tokenizer (none given or beside the model, or --ids) the prompt must be token "
                         f"ids like '1 2 3', got {prompt!r}") from None
    return ids or [0]


def generate_text(args):
    """Load, check, sample -> the generated text (or ids joined by spaces). ValueError for bad input."""
    path = os.path.join(args.checkpoint, "model.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    if args.max_new_tokens < 0 or args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise ValueError(f"--max-new-tokens and --temperature must be >= 0 and --top-k >= 1, got "
                         f"{args.max_new_tokens}, {args.temperature}, {args.top_k}")
    model = load_model_file(path, "generate", device=args.device).eval()
    tokenizer_file, source = (None, "--ids") if args.ids else find_tokenizer(path, args.tokenizer)
    tokenizer = _load_tokenizer(tokenizer_file) if tokenizer_file else None
    print(f"generate: {path}, tokenizer {tokenizer_file or '(none: token ids)'} ({source})", file=sys.stderr)
    ids = _encode(args.prompt, tokenizer)
    vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size() > vocab:
        raise ValueError(f"tokenizer {tokenizer_file} has {tokenizer.vocab_size()} pieces, more than the model's "
                         f"vocab_size={vocab}: pass the tokenizer.model of the run that wrote the model")
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model, got {ids}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, generator=generator,
                   vocab_limit=None if tokenizer is None else tokenizer.vocab_size())[0].tolist()
    return tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out))


def main(argv=None):
    """Command-line entry: prints the generated text -> 0, or one line on stderr -> 2 for bad input."""
    return run_entry("generate", parse_args, lambda args: print(generate_text(args)), argv)


if __name__ == "__main__":
    sys.exit(main())
