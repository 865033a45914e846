"""What a run reports, on rank 0: a tqdm bar, <run dir>/metrics.jsonl, wandb, and loss.png at the end.

MFU = 6 · params · tokens/s / peak FLOP/s of the job. Assumed peaks unless run.peak_flops is set: per GPU
the dense bf16 peak of the card (H100 989 TFLOP/s, H200 989, A100 312, else 100); on CPU 100 GFLOP/s per core
(an AVX2 core's fp32 FMA peak at ~3 GHz: 2 units × 8 lanes × 2 FLOP × 3 GHz) times the cores of every node.
It ignores attention FLOPs, so it slightly understates the work of softmax layers.

Beside model.pt, rank 0 writes model.json (`write_model_card`, atomically, each time model.pt is written): the run's
data settings (corpus as absolute paths, [] = the embedded one; text_key, vocab_size, seq_len, batch_size, seed,
cache_dir, mqar), the tokenizer file beside it, the step and what was trained. launch/evaluate.py and
launch/generate.py read it (`read_model_card`) to score and decode with what belongs to the model. At the end of a
run rank 0 samples (prompt: run.sample_prompt, or by default the start of the first held-out document of the
run's own corpus), scores held-out sequences and prints a summary of steps, losses, tokens/s and where each output
went (`finish`).
"""
import dataclasses
import json
import os
from pathlib import Path

import torch

__all__ = ["GPU_PEAK_FLOPS", "CPU_CORE_PEAK_FLOPS", "REPLACED", "MODEL_CARD", "peak_flops", "Reporter",
           "read_metrics", "plot_losses", "write_model_card", "read_model_card", "heldout_prompt", "finish"]

MODEL_CARD = "model.json"              # beside model.pt: the data settings and tokenizer that belong to it
HELDOUT_TOKENS = 8192                  # the end-of-run held-out loss scores at most this many tokens (CPU, rank 0)
REPLACED = "metrics.replaced.jsonl"   # rows a resume or a fresh start took out of metrics.jsonl, appended, never lost

GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
CPU_CORE_PEAK_FLOPS = 100e9


def peak_flops(configured, device, world_size, local_world_size):
    """(FLOP/s, how it was obtained) for the whole job."""
    if configured > 0:
        return configured, "run.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        per_gpu = next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 100e12)
        return per_gpu * world_size, f"{per_gpu / 1e12:.0f} TFLOP/s per {name}"
    nodes = max(1, world_size // max(1, local_world_size))
    cores = os.cpu_count() or 1
    note = f"assumed {CPU_CORE_PEAK_FLOPS / 1e9:.0f} GFLOP/s x {cores} cores x {nodes} node(s)"
    return CPU_CORE_PEAK_FLOPS * cores * nodes, note


def _read_lines(path):
    """(rows, lines that are not JSON: a line torn by kill -9 while it was written)."""
    rows, torn = [], []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            torn.append(line)
    return rows, torn


def read_metrics(path):
    """The rows of a metrics.jsonl (torn lines skipped)."""
    return [r for r in _read_lines(path)[0] if r]


def _rewind(metrics_path, start_step):
    """Keep the rows before start_step in metrics.jsonl; append the others (a rewound run's steps past its
    checkpoint, an earlier run's rows before a fresh start, torn lines) to metrics.replaced.jsonl -> a note or None.
    The kept rows replace the file atomically (temp file + rename)."""
    rows, torn = _read_lines(metrics_path)
    before = [isinstance(r, dict) and r.get("step", start_step) < start_step for r in rows]
    kept = [r for r, keep in zip(rows, before) if keep]
    moved = [r for r, keep in zip(rows, before) if not keep] + [{"torn_line": line} for line in torn]
    if not moved:
        return None
    aside = metrics_path.with_name(REPLACED)
    with open(aside, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in moved))
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, metrics_path)
    return f"metrics: {len(moved)} row(s) of {metrics_path} from step {start_step} on moved to {aside}"


def plot_losses(metrics_path, png_path, title=""):
    """loss against step, from metrics.jsonl (matplotlib, Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


class Reporter:
    """Rank 0 writes; other ranks' calls are no-ops. Rows of metrics.jsonl from `start_step` on (a resume's steps
    past its checkpoint; everything on a fresh start) are moved to metrics.replaced.jsonl first, with a note."""

    def __init__(self, run_dir, *, rank, start_step, max_steps, progress, wandb_project="", wandb_mode="offline",
                 config=None):
        self.active = rank == 0
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.wandb = None
        if not self.active:
            return
        note = _rewind(self.metrics_path, start_step)
        self.file = open(self.metrics_path, "a")
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step - 1, desc="pretrain", dynamic_ncols=True)
        if wandb_project and wandb_mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(run_dir), config=config,
                                    name=Path(run_dir).name)
        if note:
            self.write(note)

    def log(self, row):
        """row: step, loss, lr, tokens, tokens_per_s, mfu, grad_norm (plain numbers)."""
        if not self.active:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                 mfu=f"{100 * row['mfu']:.2f}%", refresh=False)
            self.bar.update(1)
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def write(self, text):
        """Print on rank 0 without breaking the bar."""
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self, title=""):
        if not self.active:
            return
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        if read_metrics(self.metrics_path):
            plot_losses(self.metrics_path, self.metrics_path.with_name("loss.png"), title)


# ---------------------------------------------------------------------------------------------- model.json
def write_model_card(run, cfg, step):
    """Rank 0: <run dir>/model.json for the model.pt just written (temp file + os.replace, never half written)."""
    if run.rank != 0:
        return
    data = dict(dataclasses.asdict(cfg.data), corpus=[os.path.abspath(os.path.expanduser(c)) for c in cfg.data.corpus],
                cache_dir=os.path.abspath(os.path.expanduser(cfg.data.cache_dir)))
    card = {"model": "model.pt", "step": step, "label": run.label, "data": data, "data_key": run.data_key,
            "tokenizer": "tokenizer.model" if run.tokenizer is not None else None}
    path = Path(run.run_dir) / MODEL_CARD
    tmp = path.with_name(f"{MODEL_CARD}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(card, indent=1) + "\n")
    os.replace(tmp, path)


def read_model_card(model_file):
    """The model.json beside `model_file` as a dict, None if there is none (a file from before it existed, or
    one written by models.save_model alone); ValueError naming it when it is unreadable."""
    path = Path(model_file).resolve().parent / MODEL_CARD
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}): delete it, or pass --data.corpus and --tokenizer") from None
    if not isinstance(card, dict) or not isinstance(card.get("data"), dict) \
            or not isinstance(card["data"].get("corpus", []), list):
        raise ValueError(f"{path} is not a model card (no 'data' table): delete it, or pass --data.corpus")
    return card


# ---------------------------------------------------------------------------------------------- end of a run
def heldout_prompt(stream, tokenizer, max_tokens=12):
    """The first line (at most max_tokens tokens) of the first document that starts in the held-out split of the
    run's token stream (launch.tokens.TokenStream; else of the split itself): a prompt the run never trained on,
    from its own corpus."""
    import numpy as np
    from lasp.launch.data import split_bounds
    start, stop = split_bounds(len(stream.tokens), "heldout")
    offsets = np.asarray(stream.offsets)
    later = offsets[(offsets > start) & (offsets < stop)]
    at = int(later[0]) if len(later) else start
    text = tokenizer.decode([int(t) for t in np.asarray(stream.tokens[at:at + max_tokens])])
    return next((line for line in text.split("\n") if line.strip()), text) or "\n"


def _heldout_loss(model, cfg, stream):
    """(mean loss, sequences) over the first HELDOUT_TOKENS held-out tokens in whole sequences (one process, no
    group); (None, why) when the split or the budget holds no sequence."""
    from lasp.launch.data import PackedDataset, shard_batch
    from lasp.launch.evaluate import score_batch
    if cfg.data.seq_len > HELDOUT_TOKENS:
        return None, f"data.seq_len {cfg.data.seq_len} > {HELDOUT_TOKENS} tokens, more than this check scores"
    try:
        data = PackedDataset(stream, cfg.data.seq_len, split="heldout")
    except ValueError as e:
        return None, str(e)
    n = min(data.n_sequences, HELDOUT_TOKENS // cfg.data.seq_len)
    with torch.no_grad():
        total = sum(score_batch(model, shard_batch(data.rows(range(i, min(i + 4, n))), "contiguous", 0, 1))
                    for i in range(0, n, 4))
    return total[0].item() / max(total[1].item(), 1.0), n


def _tokens_per_s(run_dir, first_step):
    """This session's tokens per second of wall time over its logged steps (their harmonic mean)."""
    rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("step", 0) >= first_step]
    rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return len(rates) / sum(1 / r for r in rates) if rates else float("nan")


def finish(cfg, run, losses, preempted, write):
    """Rank 0 at the end of a run: the sample and the held-out loss (from model.pt, on CPU), then the summary:
    steps, final and held-out loss, tokens/s, where each output went -> the sample text or None."""
    from lasp import models
    from lasp.models.generation import generate
    run_dir, steps = Path(run.run_dir), sorted(losses)
    stream = getattr(run.dataset, "stream", None)               # the run's token stream (None: data.mqar)
    have_model = not preempted and (run_dir / "model.pt").exists()
    model = models.load_model(run_dir / "model.pt").eval() if have_model else None
    sample = heldout = None
    if model is not None and run.tokenizer is not None and stream is not None:    # data.mqar: no tokenizer
        if cfg.run.sample_tokens:
            prompt = cfg.run.sample_prompt or heldout_prompt(stream, run.tokenizer)
            out = generate(model, torch.tensor([run.tokenizer.encode(prompt)]), cfg.run.sample_tokens,
                           temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(0))
            sample = run.tokenizer.decode(out[0].tolist())
            write(f"--- sample (prompt {prompt!r}{'' if cfg.run.sample_prompt else ', from a held-out document'})"
                  f" ---\n{sample}\n--------------")
        heldout = _heldout_loss(model, cfg, stream)
    write(_summary_text(cfg, run, losses, steps, heldout, preempted))
    return sample


def _summary_text(cfg, run, losses, steps, heldout, preempted):
    run_dir = Path(run.run_dir)
    ran = f"steps {steps[0]}-{steps[-1]} of {cfg.optim.max_steps}" if steps else \
        f"no steps to run (resumed after step {run.start - 1}; optim.max_steps is {cfg.optim.max_steps})"
    lines = [f"=== summary: {run.label}, {ran}" + (" (stopped by SIGTERM: continue with --resume)" if preempted
                                                    else "") + " ==="]
    if steps:
        lines.append(f"final loss     {losses[steps[-1]]:.4f} (step {steps[-1]}; first logged {losses[steps[0]]:.4f})")
    evaluate = f"python -m lasp.launch.evaluate {run_dir / 'model.pt'}"
    if heldout is not None and heldout[0] is None:
        lines.append(f"held-out loss  not measured ({heldout[1]}): {evaluate}")
    elif heldout is not None:
        lines.append(f"held-out loss  {heldout[0]:.4f} (first {heldout[1]} held-out sequences of {cfg.data.seq_len};"
                     f" all of them: {evaluate})")
    if steps:
        lines.append(f"tokens/s       {_tokens_per_s(run_dir, steps[0]):,.0f}")
    outputs = [("metrics", "metrics.jsonl"), ("loss plot", "loss.png"), ("model", "model.pt"),
               ("model card", MODEL_CARD), ("tokenizer", "tokenizer.model")]
    lines += [f"{what:14s} {run_dir / name}" for what, name in outputs if (run_dir / name).exists()]
    lines.append(f"{'checkpoint':14s} {run.last_ckpt or 'none written'}")
    if (run_dir / "wandb").is_dir():
        lines.append(f"{'wandb':14s} {run_dir / 'wandb'}")
    if (run_dir / "model.pt").exists() and run.tokenizer is not None:
        lines.append(f"next: python -m lasp.launch.generate {run_dir / 'model.pt'} --prompt \"...\"")
    return "\n".join(lines)
