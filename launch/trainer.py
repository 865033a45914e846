"""The training core: the one training loop that every entry point runs (pretrain, bench's model and long modes,
the BAM recipe, the MQAR sweep), and the pieces that build a run (evaluation uses its mesh and engines).

    run = setup(cfg)                      # validate, mesh, data, model, parallelism, engine, resume state
    metrics = train_step(run, batch)      # one optimizer step on a batch the caller gives (the loop's, or bench's)
    result = train(cfg, hook)             # the loop: data -> train_step -> checks -> report -> checkpoint
    run = build(cfg, model, mesh, device) # parallelism + engine around a built model, no data (bench, BAM recipe)

Ranks form a dp × sp × tp mesh (parallel.init_mesh); each packed sequence is split over the sp ranks of its group
in `parallel.layout`, each dp group reads its own batches, and the tp ranks of a group split the model's heads, MLP
channels and vocabulary (parallel/tensor.py; checkpoints hold full weights, so a run resumes at another tp).
Each step: forward on the local shard, the loss sum normalised by the token count of the whole sequence group
(launch/engine.py explains the gradient scaling), backward (the engine averages gradients), clip, AdamW, the one
warm-up + cosine schedule (launch.engine.lr_at). Checkpoints every `checkpoint.every` steps, at the end and on
SIGTERM (launch/checkpoint.py), never after a step with a NaN/inf loss, gradient norm or weight; a resumed run
continues bit for bit (docs/launch.md says under which conditions). Before anything is written rank 0 takes the run
folder's lock (launch.checkpoint.lock_run), so a second job in the same folder stops on every rank with one message;
a resume checks the checkpoint's records against the run (launch/resume.py). It lives in the package `launch`
(imported as `launch.trainer`), not in a script: scripts parse arguments and call it; tests import it.
"""
import dataclasses
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lasp.launch import checkpoint as ckpt
from lasp.launch.config import check_config, model_changes
from lasp.launch.data import check_data, open_data, shard_batch
from lasp.launch import resume
from lasp.launch.engine import build_model, make_engine, parallelize
from lasp.launch.report import Reporter, finish, peak_flops, write_model_card
from lasp.parallel import comm
from lasp.parallel.mesh import build_mesh, check_mesh_sizes, dist_env, init_mesh, mesh_groups

__all__ = ["NonFiniteStep", "ReportedError", "Run", "setup_mesh", "build", "setup", "local_batch", "train_step",
           "train", "model_label", "mesh_table"]


class NonFiniteStep(RuntimeError):
    """A step gave a NaN/inf loss, gradient norm or weight on some rank: the run stops before any checkpoint of
    that step is written (rank 0 has printed the message, naming the last checkpoint with finite weights)."""


class StopSignal:
    """SIGTERM (Slurm preemption, torchrun shutdown) sets a flag; the loop checkpoints at the next step end."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def _process():
    """(rank, world size, local rank, local world size) of this process."""
    rank, world, local_rank = dist_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", world))


class ReportedError(ValueError):
    """A user error already printed once (by the lowest failing rank); an entry point exits 2 without printing
    again."""


def _agree(error, device):
    """One all-reduce so that every rank learns which ranks failed: all raise, none waits in a collective. The
    lowest failing rank prints its message, then all pass a barrier, so it is printed once and before any rank
    exits (torchrun stops the other workers at the first exit)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world == 1 and error is not None:
        raise error                   # one process (no group): main() prints it
    flags = torch.zeros(world, device=device)
    flags[rank] = float(error is not None)
    failed = comm.all_reduce(flags).nonzero().flatten().tolist()
    if not failed:
        return
    if rank == failed[0]:
        print(f"pretrain: error: {error}", file=sys.stderr, flush=True)
    comm.barrier()
    raise ReportedError(str(error) if error is not None else f"rank {failed[0]} failed (its message is above)")


def _resume(run):
    """Load the newest checkpoint under run.root -> (the next step, the folder), (1, None) if there is none.

    Rank 0 verifies the folder (resume.verify) before any rank reads it; every rank's reads are weights-only as well,
    and the ranks agree on success twice (after the check, after the reads), so a bad file gives one clear error
    instead of a hang or code run by a crafted pickle. Notes (an old checkpoint, a continued schedule) go to
    run.notes for the log."""
    folder, error, device = None, None, run.device
    try:
        folder = ckpt.latest(run.root)
        if folder is not None and run.rank == 0:
            run.notes += resume.verify(run, folder)
    except ValueError as e:
        error = e
    _agree(error, device)
    if folder is None:
        return 1, None
    step = None
    try:
        saved = ckpt.read_trainer_state(folder)
        run.engine.load(folder)
        rng_file = folder / f"rng-rank{run.rank}.pt"
        if rng_file.exists():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file), source=rng_file)
        run.schedule, note = resume.continue_schedule(saved, run.cfg.optim)
        run.engine.set_schedule(run.cfg.optim, run.schedule["restart"])
        run.notes += [note] if note else []
        step = saved["step"] + 1
    except ValueError as e:
        error = e
    _agree(error, device)
    return step, folder


def _save(run, step):
    """Checkpoint `step` (launch/checkpoint.py), then model.pt; a failed write on any rank stops every rank with one
    message naming the path and the free space."""
    rank, device = run.rank, run.device
    def write(folder):
        run.engine.save(folder, rank)
        torch.save(ckpt.rng_state(), folder / f"rng-rank{rank}.pt")
        if rank == 0:
            ckpt.write_json(folder / "trainer.json", resume.trainer_state(step, run))
    def barrier(error=None):
        _agree(error, device)
    folder = ckpt.save(run.root, step, write, rank=rank, barrier=barrier, keep=run.cfg.checkpoint.keep)
    error = None
    try:
        run.engine.export(run.run_dir / "model.pt", rank)   # for launch/generate.py
    except ValueError as e:
        error = e
    _agree(error, device)
    return folder


def _check_free_space(root, n_params, zero):
    """ValueError unless root's file system has room for one checkpoint plus the model.pt export: fp32 weights
    (4 bytes a parameter) and AdamW's two moments (8); ZeRO also writes its fp32 master weights (4); model.pt 4."""
    need = int(n_params * (16 if zero else 12) * 1.05 + n_params * 4) + 2**20
    free = shutil.disk_usage(root).free
    if free < need:
        raise ValueError(f"checkpoint.dir {root}: {free / 2**30:.2f} GiB free, one checkpoint needs about "
                         f"{need / 2**30:.2f} GiB ({n_params} parameters and their AdamW moments): free space or "
                         f"choose another --checkpoint.dir")


def _writable(folder, key):
    """mkdir -p folder and create + remove a file in it; ValueError naming the key otherwise."""
    probe = Path(folder) / f".write-test-{os.uname().nodename}-{os.getpid()}"
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{key} {folder} is not writable ({e.strerror or e}): choose another --{key}") from None


def _lock_folders(run_dir, root):
    """The folders a run owns: its run.dir, and checkpoint.dir when that lies outside it."""
    inside = os.path.realpath(root).startswith(os.path.realpath(run_dir) + os.sep)
    return [run_dir] if inside else [run_dir, root]


def _own_folders(cfg, run_dir, root, rank, device):
    """Before anything is written: rank 0 takes the run's lock (ckpt.lock_run: a live job in the same folder stops
    this one, naming it) and, without --resume, refuses a folder holding checkpoints; every rank checks that the
    folders are writable. One agreement, so every rank stops together with one message. -> notes for the log."""
    error, notes = None, []
    try:
        _writable(run_dir, "run.dir")                   # creates them; a probe file comes and goes
        _writable(root, "checkpoint.dir")
        if rank == 0:
            notes = [n for n in (ckpt.lock_run(f) for f in _lock_folders(run_dir, root)) if n]
            if not cfg.checkpoint.resume:
                ckpt.check_fresh(root)
    except ValueError as e:
        error = e
    _agree(error, device)
    return notes


def _release(run_dir, root):
    for folder in _lock_folders(run_dir, root):
        ckpt.unlock_run(folder)


def setup_mesh(sp, tp, ep=1):
    """The dp × sp × tp mesh (+ ep groups) of this job (on the default group if one exists, e.g. the test helper's)."""
    if dist.is_initialized():  # e.g. the test helper made the default group
        return build_mesh(dist.get_rank(), dist.get_world_size(), sp, tp, ep)
    return init_mesh(sp, tp, ep)


def _autocast(device, dtype):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@dataclass
class Run:
    """Everything a rank's training steps need: `build` fills the first block, `setup` the data and resume state."""
    cfg: object                 # launch.config.TrainConfig
    rank: int
    device: torch.device
    mesh: object
    model: torch.nn.Module
    engine: object              # launch.engine.DDPEngine or DeepSpeedEngine: forward, backward, step, save, load
    n_params: int               # the full model, counted before TP splits it and ZeRO-3 partitions it
    label: str = ""             # what is trained (model_label)
    run_dir: Path = None
    root: Path = None           # checkpoints
    data_key: str = None        # the corpus/tokenizer cache entry (checked on resume)
    tokenizer: object = None
    dataset: object = None      # PackedDataset or MQARDataset: batch(index, dp_rank, dp, batch_size)
    start: int = 1              # first step to run (1-based)
    last_ckpt: Path = None
    schedule: dict = None       # the LR schedule trainer.json records (resume.schedule_record)
    notes: list = field(default_factory=list)   # lines for the log (rank 0): an old checkpoint, a continued schedule


def build(cfg, model, mesh, device):
    """Apply cfg.parallel to a built (plain) model from outside (launch.engine.parallelize) and wrap it in its
    engine (DDP or ZeRO, cfg.optim) -> Run without data: the caller passes the batches to train_step."""
    from lasp.parallel.tensor import replica_group
    n_params = sum(p.numel() for p in model.parameters())
    parallelize(model, cfg.parallel, mesh)
    engine = make_engine(model, cfg, mesh.world_size, device, data_group=replica_group(mesh),
                         expert_data_group=mesh.group("edp"))
    return Run(cfg, mesh.rank, device, mesh, model, engine, n_params)


def setup(cfg):
    """Validate (ValueError before any group work), then mesh, the run's lock, data, model, parallelism, engine,
    resume state. The lock is held until train() ends (or the process does)."""
    rank, world, local_rank, local_world = _process()
    check_config(cfg, world, local_world)
    check_data(cfg.data)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(cfg.run.dir)
    root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    mesh = setup_mesh(cfg.parallel.sp, cfg.parallel.tp, cfg.parallel.ep)
    try:
        notes = _own_folders(cfg, run_dir, root, rank, device)
        run = _setup_owned(cfg, mesh, rank, device, run_dir, root)
    except BaseException:
        _release(run_dir, root)                  # only what this process holds
        raise
    run.notes = notes + run.notes
    return run


def _setup_owned(cfg, mesh, rank, device, run_dir, root):
    """setup's part after the run's folders are owned: data, model, engine, resume state."""
    data = open_data(cfg.data, rank, lambda error: _agree(error, device))   # rank 0 builds, all load (data.py)
    vocab_size = data.vocab_size
    model = build_model(cfg.model, vocab_size, cfg.run.seed, device)
    error = None
    try:
        if rank == 0 and data.tokenizer_file is not None:  # launch/generate.py decodes with it
            _write_bytes(run_dir / "tokenizer.model", data.tokenizer_file.read_bytes())
        if rank == 0:                                        # before step 1: room for one checkpoint
            _check_free_space(root, sum(p.numel() for p in model.parameters()), cfg.parallel.zero)
    except ValueError as e:
        error = e
    _agree(error, device)
    run = build(cfg, model, mesh, device)
    run.label, run.run_dir, run.root = model_label(cfg.model, model.config), run_dir, root
    run.data_key, run.tokenizer, run.dataset = data.key, data.tokenizer, data.dataset
    run.schedule = resume.schedule_record(cfg.optim)
    if cfg.checkpoint.resume:
        run.start, run.last_ckpt = _resume(run)
    return run


def _write_bytes(path, data):
    """Write a file atomically; ValueError naming it and the free space when that fails (no temp file left)."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ckpt.write_failure(path, e) from None


def _check_finite(step, loss_sum, grad_norm, run, reporter, write_error=None):
    """Stop (NonFiniteStep on every rank) if the loss, the global gradient norm or any weight this rank's optimizer
    updated is NaN/inf on ANY rank: one all-reduce of three flags, before any checkpoint of this step is written.
    Every checkpoint is written after this check passed, so the newest one holds finite weights. A fourth flag
    carries a failed metrics write (rank 0): every rank then stops with its one message (ReportedError)."""
    flags = torch.stack([~torch.isfinite(loss_sum), torch.tensor(not math.isfinite(grad_norm), device=run.device),
                         ~run.engine.weights_finite(), torch.tensor(write_error is not None, device=run.device)])
    flags = comm.all_reduce(flags.float())
    if flags[3]:
        if write_error is not None:
            print(f"pretrain: error: {write_error}", file=sys.stderr, flush=True)
        comm.barrier()
        raise ReportedError(str(write_error) if write_error else "a metrics write failed (its message is above)")
    flags = flags[:3]
    if not flags.any():
        return
    what = [name for name, n in zip(("loss", "gradient norm", "weights after the update"), flags.tolist()) if n]
    last = run.last_ckpt or "none (no checkpoint was written yet)"
    message = (f"non-finite {' and '.join(what)} at step {step} (loss sum {loss_sum.item()}, gradient norm "
               f"{grad_norm}; on {int(flags.max())} of {run.mesh.world_size} ranks); stopped without saving step "
               f"{step}. The last checkpoint with finite weights is {last}: continue from it with --resume (and "
               f"e.g. a lower --optim.lr)")
    if run.rank == 0:                     # printed before any rank exits: torchrun kills the rest at the first exit
        reporter.write(f"pretrain: {message}")
        sys.stdout.flush()
    comm.barrier()
    raise NonFiniteStep(message)


def model_label(cfg_model, config):
    """What the run trains: model.preset, or with model.init_from the preset the file's config equals (with the
    run's model fields, then without) or else its family, and the file: "tnl-tiny (from m.pt)"."""
    from lasp import models
    if not cfg_model.init_from:
        return cfg_model.preset
    found = models.config_to_dict(config)

    def same(name, overrides):
        preset = models.get_config(name)
        fields = {f.name for f in dataclasses.fields(preset)}
        if not set(overrides) <= fields:
            return False
        candidate = dataclasses.replace(preset, **overrides, vocab_size=config.vocab_size)
        return models.config_to_dict(candidate) == found
    names = [cfg_model.preset] if same(cfg_model.preset, model_changes(cfg_model)) else [
        n for n in sorted({**models.PRESETS, **models.BAM_PRESETS, **models.MINIMAX_PRESETS, **models.QWEN3_NEXT_PRESETS}) if same(n, {})]
    what = names[0] if names else f"a {found['family']} model matching no preset"
    return f"{what} (from {cfg_model.init_from})"


def _summary(cfg, run, n_params, tokens_per_step, peak_note):
    p, mesh = cfg.parallel, run.mesh
    return (f"{run.label}: {n_params / 1e6:.2f}M parameters, vocab {run.model.config.vocab_size}; "
            f"world {mesh.world_size} = dp {mesh.dp} x sp {mesh.sp} x tp {mesh.tp} ({p.linear} + {p.softmax}, "
            f"{p.layout}){f', experts over ep {p.ep}' if p.ep > 1 else ''}, "
            f"{'ZeRO-%d' % p.zero if p.zero else 'DDP'} on {run.device.type}; {tokens_per_step} tokens/step; "
            f"MFU peak: {peak_note}" + (f"; resumed from {run.last_ckpt}" if run.last_ckpt else "")
            + (f"; no checkpoint in {run.root}, starting fresh" if cfg.checkpoint.resume and not run.last_ckpt else ""))


def train_step(run, batch, stop=False):
    """One optimizer step on this rank's shard `batch` ({tokens, positions, segment_ids, labels, loss_mask} on
    run.device, as launch.data.shard_batch cuts them; segment_ids / loss_mask may be None) -> {"loss": the job's
    mean loss, "loss_sum": the job's loss sum (tensor), "grad_norm" (before clipping), "lr" (used by this step),
    "stop": whether any rank passed stop=True (one vote, in the loss all-reduce), "seconds": {"forward" (incl. the
    loss all-reduces), "backward" (incl. the engine's gradient averaging), "optimizer" (clip, AdamW, schedule)}}."""
    engine, mesh, device = run.engine, run.mesh, run.device
    start = time.perf_counter()
    lr = engine.lr()
    with _autocast(device, run.cfg.run.dtype):
        loss_sum, count = engine.forward(**batch)
    # tokens of this sequence group (no grad), then the whole job's sums for logging and the stop vote; when the
    # sequence group is the whole job (dp = tp = 1) its count is among the totals: one all-reduce fewer
    whole = mesh.sp == mesh.world_size
    group_count = None if whole else comm.all_reduce(count.detach().to(torch.float32).reshape(1), mesh.group("sp"))
    totals = comm.all_reduce(torch.stack([loss_sum.detach().float(), count.float(),
                                          torch.tensor(float(stop), device=device)]))
    group_count = totals[1:2] if whole else group_count
    loss = (totals[0] / totals[1]).item()
    forward = time.perf_counter()
    engine.backward(loss_sum * mesh.sp / group_count.clamp_min(1.0)[0])   # see engine.py: Σ over sp, mean over dp
    backward = time.perf_counter()
    grad_norm = engine.step()
    seconds = {"forward": forward - start, "backward": backward - forward,
               "optimizer": time.perf_counter() - backward}
    return {"loss": loss, "loss_sum": totals[0], "grad_norm": grad_norm, "lr": lr, "stop": totals[2].item() > 0,
            "seconds": seconds}


def local_batch(run, step):
    """This rank's shard of the step's batch (1-based step) on its device."""
    cfg, mesh = run.cfg, run.mesh
    batch = run.dataset.batch(step - 1, mesh.rank_in("dp"), mesh.dp, cfg.data.batch_size)
    batch = shard_batch(batch, cfg.parallel.layout, mesh.rank_in("sp"), mesh.sp)
    return {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def _reporter(cfg, run):
    """The run's Reporter, its summary line written; -> (reporter, tokens per step, peak FLOP/s)."""
    mesh = run.mesh
    peak, peak_note = peak_flops(cfg.run.peak_flops, run.device, mesh.world_size,
                                 int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size)))
    tokens_per_step = mesh.dp * cfg.data.batch_size * cfg.data.seq_len
    reporter = Reporter(run.run_dir, rank=run.rank, start_step=run.start, max_steps=cfg.optim.max_steps,
                        progress=cfg.run.progress, wandb_project=cfg.run.wandb_project,
                        wandb_mode=cfg.run.wandb_mode, config=dataclasses.asdict(cfg))
    reporter.write(_summary(cfg, run, run.n_params, tokens_per_step, peak_note))
    for note in run.notes:
        reporter.write(note)
    return reporter, tokens_per_step, peak


def train(cfg, hook=None):
    """Run the configured training on this rank -> {"losses", "grad_norms": {step: value}, "last_checkpoint",
    "sample"}.

    hook(step, model), if given, runs before each step's forward (tests use it to send SIGTERM or break weights).
    Raises ValueError for bad input (before any collective that could hang), NonFiniteStep on a NaN/inf loss,
    gradient norm or weight (no checkpoint of that step is written).
    """
    run = setup(cfg)
    try:
        return _loop(cfg, run, hook)
    finally:
        _release(run.run_dir, run.root)


def _log(reporter, row):
    """reporter.log(row) -> None, or the ValueError naming metrics.jsonl and the free space when the write failed."""
    try:
        reporter.log(row)
    except OSError as e:
        return ckpt.write_failure(reporter.metrics_path, e)
    return None


def _close(reporter, run, ended):
    """reporter.close (metrics, loss.png); a failure is one message naming the file and the free space, raised only
    when the run `ended` well (after an error, that error is the message); a loss.png it cut short is removed."""
    png = run.run_dir / "loss.png"
    before = png.stat().st_mtime_ns if png.exists() else None
    try:
        reporter.close(title=f"{run.label}, dp {run.mesh.dp} x sp {run.mesh.sp}"
                             + (f" x tp {run.mesh.tp}" if run.mesh.tp > 1 else ""))
    except (OSError, RuntimeError, ValueError) as e:
        if png.exists() and png.stat().st_mtime_ns != before:    # a PNG the failed write cut short
            png.unlink()
        if ended:
            path = getattr(e, "filename", None) or run.run_dir / "loss.png"
            raise ckpt.write_failure(path, e) from None


def _loop(cfg, run, hook):
    every = cfg.checkpoint.every
    reporter, tokens_per_step, peak = _reporter(cfg, run)
    stop, losses, grad_norms, preempted, ended = StopSignal(), {}, {}, False, False
    try:
        for step in range(run.start, cfg.optim.max_steps + 1):
            t0 = time.perf_counter()
            batch = local_batch(run, step)
            if hook is not None:
                hook(step, run.model)
            out = train_step(run, batch, stop.requested)
            dt = time.perf_counter() - t0
            losses[step], grad_norms[step], preempted = out["loss"], out["grad_norm"], out["stop"]
            failed = _log(reporter, {"step": step, "loss": out["loss"], "lr": out["lr"],
                                     "tokens": step * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
                                     "mfu": 6 * run.n_params * tokens_per_step / dt / peak,
                                     "grad_norm": out["grad_norm"]})
            _check_finite(step, out["loss_sum"], out["grad_norm"], run, reporter, failed)   # before anything is saved
            if preempted or step == cfg.optim.max_steps or (every and step % every == 0):
                run.last_ckpt = _save(run, step)
                write_model_card(run, cfg, step)             # model.json beside model.pt (launch/report.py)
            if preempted:
                reporter.write(f"SIGTERM: saved {run.last_ckpt} at step {step}; continue with --resume")
                break
        ended = True
    finally:
        stop.restore()
        _close(reporter, run, ended)
    # rank 0: sample, held-out loss, summary of steps, losses, tokens/s and outputs (launch/report.py)
    sample = finish(cfg, run, losses, preempted, reporter.write) if run.rank == 0 else None
    return {"losses": losses, "grad_norms": grad_norms, "sample": sample,
            "last_checkpoint": str(run.last_ckpt) if run.last_ckpt else None}


def mesh_table(world, sp, local_world, tp=1, ep=1):
    """Lines describing every rank's node and (dp, sp[, tp]) coordinates, and the groups, without any process
    group. tp is the fastest axis (parallel/mesh.py); its column and groups appear only when tp > 1, the expert
    groups (ep, and edp: the ranks holding the same experts) only when ep > 1."""
    dp = check_mesh_sizes(world, sp, tp, ep)
    ranks = torch.arange(world).view(dp, sp, tp)
    with_tp = (lambda text: text) if tp > 1 else (lambda text: "")
    lines = [f"world {world} = dp {dp} x sp {sp}{with_tp(f' x tp {tp}')}; {max(1, world // local_world)} node(s) "
             f"x {local_world} rank(s)", "rank  node  local  dp  sp" + with_tp("  tp")]
    lines += [f"{r:4d}  {r // local_world:4d}  {r % local_world:5d}  {r // (sp * tp):2d}  {r // tp % sp:2d}"
              + with_tp(f"  {r % tp:2d}") for r in range(world)]
    lines.append(f"sp groups: {ranks.movedim(1, -1).reshape(-1, sp).tolist()}")
    lines.append(f"dp groups: {ranks.movedim(0, -1).reshape(-1, dp).tolist()}")
    lines += [f"tp groups: {ranks.reshape(-1, tp).tolist()}"] if tp > 1 else []
    if ep > 1:
        groups = mesh_groups(world, sp, tp, ep)
        lines += [f"ep groups: {groups['ep']}", f"edp groups (same experts): {groups['edp']}"]
    if sp > local_world:
        lines.append(f"note: sp={sp} spans nodes ({local_world} ranks per node): SP collectives cross the network")
    if tp > local_world:
        lines.append(f"note: tp={tp} spans nodes ({local_world} ranks per node): TP all-reduces cross the network")
    return lines
