"""What a run reports, on rank 0: a tqdm bar, <run dir>/metrics.jsonl, wandb, and loss.png at the end.

MFU = 6 · params · tokens/s / peak FLOP/s of the job. Assumed peaks unless run.peak_flops is set: per GPU
the dense bf16 peak of the card (H100 989 TFLOP/s, H200 989, A100 312, else 100); on CPU 100 GFLOP/s per core
(an AVX2 core's fp32 FMA peak at ~3 GHz: 2 units × 8 lanes × 2 FLOP × 3 GHz) times the cores of every node.
It ignores attention FLOPs, so it slightly understates the work of softmax layers.
"""
import json
import os
from pathlib import Path

import torch

__all__ = ["GPU_PEAK_FLOPS", "CPU_CORE_PEAK_FLOPS", "REPLACED", "peak_flops", "Reporter", "read_metrics",
           "plot_losses"]

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
