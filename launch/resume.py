"""What a checkpoint records about its run (trainer.json) and what a resume may change.

trainer.json holds the position (step), the mesh (dp, sp, tp, world size, ZeRO stage), and what decides the run:
the model config (every field, models.config_to_dict), the data settings that decide the token order (the corpus
and tokenizer cache key, seq_len, batch size, dp) and the LR schedule (lr, min_lr, warmup_steps, max_steps, and a
restart when a resume changed max_steps). A resume compares them with the run's own before any tensor is read:

    changed                      what happens
    model.<field>, data.*,       refused, every difference named, unless --checkpoint.allow_changes names the key
    parallel.dp, optim.lr,       (then the run continues with the new value; a model change that alters shapes is
    optim.min_lr, warmup_steps   still refused by the tensor check, naming the tensors)
    parallel.zero (and the       refused always: the checkpoint's partitions belong to that engine and world
    world size under ZeRO)
    optim.max_steps              accepted: the LR continues from the value it had at the checkpoint's step on a
                                 cosine to min_lr at the new max_steps (launch.engine.lr_at's restart), never a jump
    sp, tp, world size (DDP)     accepted (checkpoints hold full weights); not bit-identical afterwards

A checkpoint written before these records (no "model" / "data" / "schedule" in trainer.json) resumes with a one-line
note that they could not be compared.
"""
from pathlib import Path
from types import SimpleNamespace

from lasp.launch import checkpoint as ckpt
from lasp.launch.engine import lr_at

__all__ = ["schedule_record", "trainer_state", "check_compatible", "continue_schedule", "verify"]


def schedule_record(optim, restart=None):
    """The LR schedule's fields as trainer.json records them (restart: launch.engine.lr_at)."""
    return {"lr": optim.lr, "min_lr": optim.min_lr, "warmup_steps": optim.warmup_steps, "max_steps": optim.max_steps,
            "restart": restart}


def trainer_state(step, run):
    """trainer.json: the position, the mesh, and what a resume must keep (the model config, the data settings that
    decide the token order, the schedule)."""
    from lasp import models
    cfg, mesh = run.cfg, run.mesh
    return {"step": step, "samples_per_step": mesh.dp * cfg.data.batch_size, "dp": mesh.dp, "sp": mesh.sp,
            "tp": mesh.tp, "world_size": mesh.world_size, "zero": cfg.parallel.zero, "data_key": run.data_key,
            "model": models.config_to_dict(run.model.config),
            "data": {"corpus": run.data_key, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
                     "dp": mesh.dp},
            "schedule": run.schedule or schedule_record(cfg.optim)}


def _record(state):
    """{key: value} of what a resume must keep, named as the flags that set it."""
    data, schedule = state.get("data") or {}, state.get("schedule") or {}
    out = {"parallel.zero": state.get("zero"), "parallel.world_size": state.get("world_size"),
           "parallel.dp": state.get("dp"), "data.corpus": state.get("data_key")}
    out.update({f"data.{k}": data[k] for k in ("seq_len", "batch_size") if k in data})
    out.update({f"model.{k}": v for k, v in (state.get("model") or {}).items()})
    out.update({f"optim.{k}": schedule[k] for k in ("lr", "min_lr", "warmup_steps") if k in schedule})
    return out


def check_compatible(saved, now, folder, allow=()):
    """The model, the token order (corpus, seq_len, batch, dp) and the schedule's shape must be the checkpoint's
    unless `allow` (checkpoint.allow_changes) names the key; ZeRO partitions need the same stage (and world).
    -> notes for the log (an old checkpoint without records). ValueError naming every difference otherwise."""
    old, new = _record(saved), _record(now)
    fixed = ["parallel.zero"] + (["parallel.world_size"] if now["zero"] else [])
    diff = {k: (old[k], new[k]) for k in old if k in new and old[k] != new[k]
            and (k in fixed or (k != "parallel.world_size" and k not in allow))}
    if diff:
        text = "; ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in diff.items())
        if "parallel.zero" in diff or "parallel.world_size" in diff:
            hint = ("a checkpoint resumes with the engine it was written by: DDP for --zero 0, DeepSpeed for 1-3 at "
                    "the same world size; pass the run's own --zero, or start a new run with a new --run-dir")
        else:
            hint = (f"a resume continues the same run: pass the checkpoint's values, or, if the change is intended, "
                    f"--checkpoint.allow_changes {' '.join(diff)} (docs/launch.md), or start a new --run-dir")
        raise ValueError(f"checkpoint {folder} does not fit this run: {text} ({hint})")
    if "model" not in saved or "data" not in saved:
        return [f"note: {folder} predates the model and data records in trainer.json: the model config, "
                f"data.seq_len and data.batch_size could not be compared with this run's, and the LR follows this "
                f"run's optim fields"]
    return []


def continue_schedule(saved, optim):
    """-> (the schedule the resumed steps follow, a note or None). The same fields: the checkpoint's (with its
    restart). Another max_steps: the LR continues from the value it had at the checkpoint's step on a cosine to
    min_lr at the new max_steps (lr_at's restart), never a jump. Other fields changed (allowed by
    checkpoint.allow_changes): the new schedule as written."""
    old, step = saved.get("schedule"), saved["step"]
    now = schedule_record(optim)
    if old is None:
        return now, None                        # an old checkpoint: check_compatible's note says so
    if any(old[k] != now[k] for k in ("lr", "min_lr", "warmup_steps")):
        return now, f"note: the schedule's fields changed (allowed): the LR follows the new one from step {step + 1}"
    if old["max_steps"] == now["max_steps"]:
        return {**now, "restart": old.get("restart")}, None
    if step < optim.warmup_steps:
        return now, None
    lr = lr_at(step, SimpleNamespace(**old), old.get("restart"))
    return {**now, "restart": {"step": step, "lr": lr}}, (
        f"note: optim.max_steps {old['max_steps']} -> {optim.max_steps}: the learning rate continues from {lr:.6g} at "
        f"step {step + 1} on a cosine to optim.min_lr {optim.min_lr:g} at step {optim.max_steps}")


def _check_model_file(folder, run):
    """A DDP checkpoint's model.pt (full weights): names, shapes, storage against the run's model, memory-mapped."""
    from lasp import models
    from lasp.models.serialization import check_weights
    path = folder / "model.pt"
    if path.is_file():
        expected = models.build_model(run.model.config, device="meta").state_dict()
        check_weights(ckpt.load_tensors(path, mmap=True), expected, f"checkpoint {path}")


def _others(root, folder):
    """' (other complete checkpoints here: [...]; resume from one by writing {"dir": ...} into latest)' or ''."""
    others = [p.name for p in ckpt._complete(root) if p != folder]
    return (f" (other checkpoints here: {others}; to resume from one, write {{\"dir\": \"{others[-1]}\"}} into "
            f"{Path(root) / 'latest'})") if others else ""


def verify(run, folder):
    """Rank 0, before any rank reads the checkpoint: manifest (names, sizes, checksums), trainer.json (types, and
    what must not change), then the torch files memory-mapped (weights-only, tensor headers) -> notes."""
    try:
        files = ckpt.verify_manifest(folder)
        saved = ckpt.read_trainer_state(folder)
    except ValueError as e:
        raise ValueError(f"{e}{_others(run.root, folder)}") from None
    notes = check_compatible(saved, trainer_state(0, run), folder, run.cfg.checkpoint.allow_changes)
    try:
        ckpt.verify_tensors(folder, files, run.engine.safe_types)
        _check_model_file(folder, run)
    except ValueError as e:
        raise ValueError(f"{e}{_others(run.root, folder)}") from None
    return notes
