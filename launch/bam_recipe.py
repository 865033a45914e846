"""BAM end to end at tiny size on CPU: dense seed -> domain experts -> BAM / BTX mixtures -> perplexity per domain.

    OMP_NUM_THREADS=1 python launch/bam_recipe.py --out runs/bam-recipe          # a few minutes on one core

1. Tokenize the embedded Shakespeare corpus once (launch/data.py cache: one BPE tokenizer for every stage) and
   split it into domains by play: comedies, tragedies, sonnets; the last 10% of every work is held out.
2. Train a dense parallel-block seed (models.bam, N = E = 1) on all domains.
3. Branch: continue one copy of the seed on each domain (the dense experts).
4. Mix with models.bam.upcycle (what launch/upcycle.py runs): BAM with KV experts, BAM with KV sharing, and the
   BTX-style baseline (attention averaged, only FFN experts); top-1 FFN routing, fresh routers.
5. Train every mixture, and the dense seed as a data-matched baseline, for the same tokens on all domains.
6. Print held-out perplexity per domain (exp of the mean next-token loss, router losses excluded).

Every stage trains through the training core (launch.trainer.build + train_step: the pretraining step, AdamW with
weight decay on matrices, the one warm-up + cosine schedule launch.engine.lr_at, clipping at 1) on this script's
batches. One process, no torch.distributed. Numbers at this size are noisy: they show the pipeline runs and
roughly how the variants order, not the paper's effect sizes.
"""
import argparse
import dataclasses
import gzip
import json
import math
import time
from pathlib import Path


import numpy as np
import torch

from lasp import models
from lasp.launch import trainer
from lasp.launch.config import TrainConfig
from lasp.launch.data import DEFAULT_CORPUS, build_cache, cache_path
from lasp.launch.tokens import open_prepared
from lasp.models.bam import upcycle

__all__ = ["DOMAINS", "load_domains", "stage_config", "train", "perplexity", "main"]

DOMAINS = {
    "comedies": ("The Tempest", "A Midsummer Night's Dream", "Twelfth Night", "Much Ado About Nothing",
                 "The Merchant of Venice"),
    "tragedies": ("Hamlet", "Macbeth", "King Lear", "Othello", "Romeo and Juliet", "Julius Caesar"),
    "sonnets": ("Sonnets",),
}
MIXTURES = {"BTX (attention averaged)": "average", "BAM, KV experts": "experts", "BAM, KV sharing": "kv-sharing"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bam-recipe", help="folder for the checkpoints")
    p.add_argument("--preset", default="bam-seed-tiny", help="dense seed preset (models.BAM_PRESETS)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed-steps", type=int, default=300)
    p.add_argument("--branch-steps", type=int, default=150, help="steps of each domain expert")
    p.add_argument("--mix-steps", type=int, default=150, help="steps of each mixture (same for all)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the seed")
    p.add_argument("--continue-lr", type=float, default=1e-3, help="peak learning rate of the later stages")
    return p.parse_args(argv)


def load_domains(vocab_size, cache_dir="~/.cache/lasp", held_out=0.1):
    """-> {domain: (train tokens, held-out tokens)} as int64 tensors, cut from the cached token stream by the
    title of each document (the embedded corpus is one JSON line per work, in stream order)."""
    files = [DEFAULT_CORPUS]
    path = build_cache(files, "text", vocab_size, cache_path(files, "text", vocab_size, cache_dir))
    stream = open_prepared(path, "data.cache_dir")
    tokens, offsets = torch.from_numpy(np.asarray(stream.tokens, np.int64)), stream.offsets
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        titles = [json.loads(line)["title"] for line in f if line.strip()]
    out = {}
    for domain, works in DOMAINS.items():
        train, test = [], []
        for doc in (titles.index(w) for w in works):
            ids = tokens[offsets[doc]:offsets[doc + 1]]
            cut = int(len(ids) * (1 - held_out))
            train.append(ids[:cut])
            test.append(ids[cut:])
        out[domain] = (torch.cat(train), torch.cat(test))
    return out


def _batch(streams, batch_size, seq_len, generator):
    """Random windows: each row picks a stream with probability ∝ its length -> (tokens, labels) (B, T)."""
    sizes = torch.tensor([len(s) - seq_len - 1 for s in streams], dtype=torch.float64)
    which = torch.multinomial(sizes / sizes.sum(), batch_size, replacement=True, generator=generator)
    rows = [streams[i][int(torch.randint(int(sizes[i]), (1,), generator=generator)):][:seq_len + 1]
            for i in which.tolist()]
    rows = torch.stack(rows)
    return rows[:, :-1], rows[:, 1:]


def stage_config(steps, lr, batch_size):
    """The launch.config.TrainConfig of one stage: 10 warm-up steps, cosine decay to lr/10 at `steps`, AdamW
    (0.9, 0.95) with weight decay 0.1, clipping at 1 (training's defaults otherwise); fp32, no recomputation."""
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, cfg.optim.max_steps = lr, lr / 10, 10, max(steps, 1)
    cfg.data.batch_size, cfg.run.dtype = batch_size, "fp32"
    cfg.parallel.activation_checkpointing = False
    return cfg


def train(model, streams, steps, lr, args, seed):
    """`steps` steps of the training core on random windows of `streams`; loss = CE + router losses (the model's
    loss). -> the last step's loss."""
    run = trainer.build(stage_config(steps, lr, args.batch_size), model, trainer.setup_mesh(1, 1),
                        torch.device("cpu"))
    g, positions, loss = torch.Generator().manual_seed(seed), torch.arange(args.seq_len), float("nan")
    model.train()
    for _ in range(steps):
        tokens, labels = _batch(streams, args.batch_size, args.seq_len, g)
        batch = dict(tokens=tokens, positions=positions, segment_ids=None, labels=labels, loss_mask=None)
        loss = trainer.train_step(run, batch)["loss"]
    return loss


@torch.no_grad()
def perplexity(model, stream, seq_len):
    """exp(mean next-token CE) over consecutive windows of the held-out stream (router losses excluded)."""
    model.eval()
    n = (len(stream) - 1) // seq_len
    tokens = stream[:n * seq_len].view(n, seq_len)
    labels = stream[1:n * seq_len + 1].view(n, seq_len)
    ce, count = model.loss(model(tokens, torch.arange(seq_len)), labels, with_aux=False)
    return math.exp(ce.item() / count.item())


def _stage(name, model, streams, steps, args, seed, path):
    t0 = time.perf_counter()
    loss = train(model, streams, steps, args.lr if name == "seed" else args.continue_lr, args, seed)
    models.save_model(path, model)
    print(f"{name}: {steps} steps, {steps * args.batch_size * args.seq_len} tokens, train loss {loss:.3f}, "
          f"{time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return model


def _table(results, domains):
    head = f"| model | params | {' | '.join(domains)} | average |"
    lines = [head, "|" + "---|" * (len(domains) + 3)]
    for name, (params, ppl) in results.items():
        cells = " | ".join(f"{ppl[d]:.2f}" for d in domains)
        lines.append(f"| {name} | {params / 1e6:.2f}M | {cells} | {sum(ppl.values()) / len(ppl):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_domains(args.vocab_size)
    everything = [train_ids for train_ids, _ in data.values()]
    cfg = dataclasses.replace(models.get_config(args.preset), vocab_size=args.vocab_size)
    torch.manual_seed(0)
    seed = _stage("seed", models.build_model(cfg), everything, args.seed_steps, args, 1, out / "seed.pt")
    trained = {"dense seed": seed}
    for i, (domain, (train_ids, _)) in enumerate(data.items()):
        trained[f"expert: {domain}"] = _stage(f"expert {domain}", models.load_model(out / "seed.pt"), [train_ids],
                                              args.branch_steps, args, 10 + i, out / f"expert-{domain}.pt")
    expert_states = [trained[f"expert: {d}"].state_dict() for d in data]
    for i, (name, attention) in enumerate(MIXTURES.items()):
        mixture = upcycle(seed.config, expert_states, attention=attention, top_k=1, router_seed=0)
        trained[name] = _stage(name, mixture, everything, args.mix_steps, args, 100, out / f"mix-{i}.pt")
    matched = len(data) * args.branch_steps + args.mix_steps
    trained["dense, data-matched"] = _stage("dense seed continued", models.load_model(out / "seed.pt"), everything,
                                            matched, args, 200, out / "dense-matched.pt")
    results = {name: (sum(p.numel() for p in m.parameters()),
                      {d: perplexity(m, test_ids, args.seq_len) for d, (_, test_ids) in data.items()})
               for name, m in trained.items()}
    table = _table(results, list(data))
    print(table)
    (out / "table.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
