"""Sample from a model checkpoint: `python -m lasp.launch.generate CHECKPOINT --prompt "..." [--tokenizer spm.model]`.

CHECKPOINT is a `model.pt` written by `models.save_model` ({"model_config", "model"}) or a checkpoint folder
holding one. With --tokenizer (a sentencepiece .model) the prompt is text and the output is decoded text;
without, the prompt is token ids ("1 2 3" or "1,2,3") and the output is ids. Decoding: one parallel prefill,
then linear layers step their O(1) recurrent state and softmax layers their KV cache (models/generation.py).
"""
import argparse
import os

import torch

from lasp import models
from lasp.models.generation import generate

__all__ = ["parse_args", "main"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="model.pt, or a checkpoint folder containing model.pt")
    p.add_argument("--prompt", default="", help="text (with --tokenizer) or token ids")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model file; none = raw token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _encode(prompt, tokenizer):
    """-> list of ids. Raw ids need no tokenizer; an empty prompt starts from the tokenizer's BOS (or id 0)."""
    if tokenizer is not None:
        ids = tokenizer.encode(prompt)
        return ids or [max(tokenizer.bos_id(), 0)]
    try:
        ids = [int(t) for t in prompt.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"without --tokenizer the prompt must be token ids like '1 2 3', got {prompt!r}") from None
    return ids or [0]


def main(argv=None):
    """Run the command line; returns (and prints) the generated text or ids."""
    args = parse_args(argv)
    path = os.path.join(args.checkpoint, "model.pt") if os.path.isdir(args.checkpoint) else args.checkpoint
    model = models.load_model(path, device=args.device).eval()
    tokenizer = None
    if args.tokenizer is not None:
        import sentencepiece  # only needed for text prompts
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer)
    ids = _encode(args.prompt, tokenizer)
    vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size() > vocab:
        raise ValueError(f"tokenizer {args.tokenizer} has {tokenizer.vocab_size()} pieces, more than the model's "
                         f"vocab_size={vocab}")
    if max(ids) >= vocab or min(ids) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab}) for this model, got {ids}")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, generator=generator,
                   vocab_limit=None if tokenizer is None else tokenizer.vocab_size())[0].tolist()
    text = tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out))
    print(text)
    return text


if __name__ == "__main__":
    main()
