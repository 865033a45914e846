"""Checkpoints that cannot run code, cannot hold broken weights, lose nothing, and resume bit for bit.

Each test here was broken once on purpose (the fix reverted) and seen to fail; the docstrings say how.
Small on purpose: the tiny preset, a few steps, 2-4 gloo ranks."""
import dataclasses
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
# Imported once here, not in every forked rank (seconds each): torch.optim imports dynamo on first use, the loss plot
# matplotlib; the ZeRO and TP cases import deepspeed (whose initialize imports inductor) and megatron.core.
import matplotlib.pyplot  # noqa: F401
import torch._dynamo  # noqa: F401

from lasp.launch import checkpoint as ckpt
from lasp.launch import pretrain, trainer
from lasp.launch.engine import _import_deepspeed
from tests.dist import run_ranks
from tests.test_launch import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


# ---------------------------------------------------------------------------------------------- no unpickling
def _import_zero():
    import torch._inductor.compile_fx  # noqa: F401 - deepspeed.initialize imports it (via its Muon optimizer)
    _import_deepspeed(torch.device("cpu"))


class _Plant:
    """Unpickled by a full (not weights-only) unpickler, this calls open(marker, "w"): the marker file appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant_every_file(cfg, marker):
    """Train 2 steps (checkpoint at 2); then, one file at a time, replace that file of the checkpoint with a crafted
    pickle, recompute the manifest (it proves integrity, not authenticity) and resume -> the error of each file."""
    trainer.train(cfg)
    rank = torch.distributed.get_rank()
    root = Path(cfg.run.dir) / "checkpoints"
    folder, pristine = root / "step_00000002", root / "pristine"
    cfg.checkpoint.resume = True
    run = trainer.setup(cfg)                                   # the pristine checkpoint loads
    assert run.start == 3
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    if rank == 0:
        shutil.copytree(folder, pristine)
    errors = {}
    for name in names:
        torch.distributed.barrier()
        if rank == 0:
            shutil.rmtree(folder)
            shutil.copytree(pristine, folder)
            torch.save(_Plant(marker), folder / name)
            ckpt.write_json(folder / ckpt.MANIFEST, ckpt._manifest(folder))
        torch.distributed.barrier()
        with pytest.raises(ValueError) as e:
            trainer._resume(run)
        errors[name] = str(e.value)
    return errors


@pytest.mark.parametrize("zero", ["0", "2"])
def test_planted_pickle_in_every_checkpoint_file_runs_nothing(tmp_path, cache_dir, zero):
    """Fails when verify() stops checking the torch files and one reader unpickles fully (tried: the rng file
    with weights_only=False creates the marker; DeepSpeed's own reader does the same for the ZeRO files)."""
    if zero != "0":
        _import_zero()
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Plant(str(marker))))            # the plant is real: a full unpickler runs it
    assert marker.exists()
    marker.unlink()
    cfg = tiny(tmp_path / "run", cache_dir, "--sp", "1", "--zero", zero, "--max-steps", "2")
    errors = run_ranks(2, _plant_every_file, cfg, str(marker))
    assert not marker.exists()
    names = set(errors[0])
    assert {"trainer.json", "rng-rank0.pt", "rng-rank1.pt"} <= names
    assert ({"model.pt", "optim.pt"} <= names) if zero == "0" else any(n.startswith("deepspeed/") for n in names)
    for name in names:                                          # every rank: the file named, no hang, nothing run
        for rank_errors in errors:
            msg = rank_errors[name]
            assert name.split("/")[-1] in msg or "rank 0 failed (its message is above)" in msg, (name, msg)
        text = errors[0][name]
        assert ("open" in text and "refusing to unpickle" in text) or "not valid JSON" in text, text


def test_every_torch_load_is_weights_only():
    """Fails on any torch.load in the project without weights_only=True (tried: one with weights_only=False)."""
    bad = []
    for path in REPO.rglob("*.py"):
        if ".git" in path.parts:
            continue
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", path.read_text()):
            if "weights_only=True" not in m[0]:
                bad.append(f"{path.relative_to(REPO)}: {m[0]}")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------- finite or refuse
def _poison_gradient_at(step, rank):
    """At `step`, on one rank, the gradient of one weight becomes inf: the loss stays finite, the gradient norm is
    inf, clipping multiplies by 1/inf = 0 and inf * 0 = NaN: every weight NaN after the update."""
    def hook(s, model):
        if s == step and torch.distributed.get_rank() == rank:
            weight = model.layers[0].mlp.up_proj.weight
            handle = weight.register_hook(lambda g: (handle.remove(), g * float("inf"))[1])
    return hook


def _train_until_nonfinite(cfg, hook):
    try:
        trainer.train(cfg, hook)
    except trainer.NonFiniteStep as e:
        return str(e)
    return None


@pytest.mark.parametrize("zero", ["0"])   # ZeRO passes too (DeepSpeed itself skips an inf step); 12 s, not run
def test_nonfinite_gradient_stops_before_the_checkpoint(tmp_path, cache_dir, zero):
    """A finite loss with an inf gradient on one rank at step 3, a checkpoint due at every step: every rank stops
    at step 3, naming step_00000002 (finite), and no step_00000003 exists. Fails without the check (tried: the old
    loss-only check saved step_00000003 with NaN weights and went on)."""
    if zero != "0":
        import deepspeed  # noqa: F401
    cfg = tiny(tmp_path / "run", cache_dir, "--sp", "1", "--zero", zero, "--max-steps", "4", "--checkpoint.every", "1",
               "--checkpoint.keep", "1")
    messages = run_ranks(2, _train_until_nonfinite, cfg, _poison_gradient_at(3, rank=1))
    assert all(m and "non-finite gradient norm" in m and "at step 3" in m for m in messages), messages
    root = tmp_path / "run" / "checkpoints"
    assert "step_00000002" in messages[0] and ckpt.latest(root).name == "step_00000002"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"] and not list(root.glob(".tmp-*"))
    ckpt.verify(root / "step_00000002", allow=_safe_types(zero))
    for f in (root / "step_00000002").rglob("*.pt"):
        if "rng" not in f.name:
            tensors = _tensors(ckpt.load_tensors(f, allow=_safe_types(zero)))
            assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), f


def _safe_types(zero):
    from lasp.launch.engine import _deepspeed_safe_types
    return _deepspeed_safe_types() if zero != "0" else ()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for x in items for t in _tensors(x)]


# ---------------------------------------------------------------------------------------------- lineage
def _fake_checkpoints(root, steps):
    for step in steps:
        ckpt.save(root, step, lambda folder: (folder / "trainer.json").write_text(f'{{"step": {step}}}'), rank=0,
                  barrier=_solo_barrier, keep=10)


def _solo_barrier(error=None):
    if error is not None:
        raise error


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path, cache_dir, capsys):
    """`make run`, then a fresh `--max-steps 50` in the same folder: refused, naming --resume and --run-dir, and
    nothing changed. Fails without check_fresh (tried: the new run pruned its own step_00000005)."""
    run_dir = tmp_path / "run"
    _fake_checkpoints(run_dir / "checkpoints", [30, 35, 40])
    (run_dir / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 41)))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    argv = ["--config", "tiny", "--run-dir", str(run_dir), "--data.cache_dir", cache_dir, "--run.sample_tokens", "0"]
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of another run" in err and "--resume" in err and "--run-dir" in err
    assert err.count("pretrain: error") == 1 and "Traceback" not in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ckpt.LOCK} == before


def test_pruning_keeps_latest_and_never_touches_higher_steps(tmp_path):
    """The issue's data loss: step 5 and 10 written into a folder holding 30/35/40 were pruned at once (pruning kept
    the highest numbers) and `latest` named a deleted folder. Fails with the old _prune (tried)."""
    root = tmp_path / "ckpt"
    _fake_checkpoints(root, [30, 35, 40])
    for step in (5, 10, 15):
        ckpt.save(root, step, lambda folder: None, rank=0, barrier=_solo_barrier, keep=2)
        assert ckpt.latest(root) == ckpt.step_dir(root, step)
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{s:08d}" for s in (10, 15, 30, 35, 40)]
    ckpt.save(root, 16, lambda folder: None, rank=0, barrier=_solo_barrier, keep=1)
    assert sorted(p.name for p in root.glob("step_*"))[0] == "step_00000016"


def test_metrics_are_moved_aside_never_truncated(tmp_path, capsys):
    """A resume from step 4 moves rows 5.. (and a line torn by kill -9) to metrics.replaced.jsonl with a note.
    Fails with the old Reporter (tried: rows 5-8 vanished; the torn line crashed json.loads)."""
    from lasp.launch.report import REPLACED, Reporter, read_metrics
    rows = [f'{{"step": {s}, "loss": {s}.5}}\n' for s in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 9, "lo')
    reporter = Reporter(tmp_path, rank=0, start_step=5, max_steps=10, progress=False)
    reporter.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    aside = read_metrics(tmp_path / REPLACED)
    assert [r.get("step") for r in aside] == [5, 6, 7, 8, None] and aside[-1]["torn_line"] == '{"step": 9, "lo'
    assert "5 row(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bit-exact resume
class _Killed(BaseException):
    """Raised by the hook as kill -9 would strike: mid-run, after a checkpoint, nothing more saved."""


def _train_until_killed(cfg, kill_at=None):
    def hook(step, model):
        if step == kill_at:
            raise _Killed
    try:
        out = trainer.train(cfg, hook)
    except _Killed:
        return None
    return out["losses"], out["grad_norms"]


def _weights(run_dir):
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["model"]


@pytest.mark.parametrize("world, args", [
    (4, ("--sp", "2")),                     # dp 2 x sp 2, the default job's layout: DDP's rebuilt buckets broke it
    (4, ("--sp", "2", "--zero", "2")),      # ZeRO-2 with SP
    (8, ("--sp", "2", "--tp", "2")),        # dp 2 x sp 2 x tp 2: gradients averaged over 4 replicas of each shard
    (2, ("--zero", "3")),                   # 2 ranks (a + b is order-free): ZeRO-3's partitioned state restored
])                                          # ZeRO-1 (DeepSpeed's stage-2 code) passed too; left out for time
def test_kill_and_resume_is_bit_exact(tmp_path, cache_dir, world, args):
    """Uninterrupted 6 steps vs killed during step 5 (checkpoint at 3) + --resume: every loss, every gradient norm
    and every final weight equal bit for bit; 3 steps after the resume pass the step where DDP rebuilt its buckets.
    Fails with torch DDP in DDPEngine (tried: dp 2 x sp 2 -> 34 of 45 final tensors differ; dp 2 x sp 2 x tp 2 ->
    the gradient norm of step 4, the first after the resume, differs)."""
    if "--zero" in args:
        _import_zero()
    if "--tp" in args:
        import megatron.core  # noqa: F401
    common = ("--max-steps", "6", "--checkpoint.every", "3", "--optim.warmup_steps", "2", *args)
    full = run_ranks(world, _train_until_killed, tiny(tmp_path / "full", cache_dir, *common))[0]
    cut = tiny(tmp_path / "cut", cache_dir, *common)
    assert run_ranks(world, _train_until_killed, cut, 5)[0] is None
    assert ckpt.latest(tmp_path / "cut" / "checkpoints").name == "step_00000003"
    cut.checkpoint.resume = True
    rest = run_ranks(world, _train_until_killed, cut)[0]
    assert sorted(rest[0]) == [4, 5, 6]
    assert rest[0] == {s: v for s, v in full[0].items() if s > 3} and rest[1] == {s: v for s, v in full[1].items()
                                                                                    if s > 3}
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


# ---------------------------------------------------------------------------------------------- checks and messages
def _main_argv(run_dir, cache_dir, *args):
    return ["--config", "tiny", "--run-dir", str(run_dir), "--data.cache_dir", cache_dir, "--run.sample_tokens", "0",
            *args]


def test_truncated_latest_names_the_file_and_the_intact_checkpoints(tmp_path):
    """Was 'Unterminated string starting at: line 3 column 2' with no file named."""
    root = tmp_path / "ckpt"
    _fake_checkpoints(root, [2, 4])
    text = (root / "latest").read_text()
    (root / "latest").write_text(text[:12])
    with pytest.raises(ValueError, match=r"latest is unreadable.*not valid JSON.*intact checkpoints here: "
                                         r"\['step_00000002', 'step_00000004'\]"):
        ckpt.latest(root)
    (root / "latest").write_text('{"dir": "step_00000009"}')
    with pytest.raises(ValueError, match="names step_00000009, which does not exist"):
        ckpt.latest(root)


def test_a_failed_write_stops_with_a_message_and_leaves_no_tmp(tmp_path):
    """Disk full in the middle of a save (torch.save reports it as RuntimeError 'basic_ios::clear')."""
    def write(folder):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file: "
                           "basic_ios::clear")
    with pytest.raises(ValueError, match=r"writing .*\.tmp-step_00000003 failed .*GiB free"):
        ckpt.save(tmp_path, 3, write, rank=0, barrier=_solo_barrier)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_or_full_folders_are_found_before_step_1(tmp_path, cache_dir, capsys, monkeypatch):
    """A read-only checkpoint folder (here under /proc, read-only even for root) and a full disk: exit 2 with the
    folder named before any step (was: the first save crashed with 'basic_ios::clear')."""
    argv = _main_argv(tmp_path / "run", cache_dir)
    assert pretrain.main([*argv, "--checkpoint.dir", "/proc/lasp-checkpoints"]) == 2
    assert "checkpoint.dir /proc/lasp-checkpoints is not writable" in capsys.readouterr().err
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000,
                                                                                                 1000))
    assert pretrain.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(r"0\.00 GiB free, one checkpoint needs about 0\.0\d GiB", err) and err.count("error") == 1
    assert not list((tmp_path / "run").rglob("step_*")) and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_init_from_a_non_model_file_or_another_family(tmp_path, cache_dir, capsys):
    """init_from optim.pt: a clear error (was KeyError: models/serialization.py tested a proper subset of the keys);
    init_from a tnl-tiny file: the run is labelled tnl-tiny (was linear-llama3-tiny)."""
    from lasp import models
    from lasp.launch.config import parse_args
    from lasp.models.serialization import load_model_config
    torch.save({"optimizer": {}, "scheduler": {}}, tmp_path / "optim.pt")
    assert pretrain.main(_main_argv(tmp_path / "run", cache_dir, "--model.init_from", str(tmp_path / "optim.pt"))) == 2
    assert "optim.pt is not a model checkpoint: expected keys 'model_config' and 'model', found ['optimizer'" in \
        capsys.readouterr().err
    tnl = models.build_model(dataclasses.replace(models.get_config("tnl-tiny"), vocab_size=512), device="meta")
    cfg, _ = parse_args(["--config", "tiny", "--model.init_from", "m.pt"])
    assert trainer.model_label(cfg.model, tnl.config) == "tnl-tiny (from m.pt)"
    cfg.model.init_from = ""
    assert trainer.model_label(cfg.model, tnl.config) == "linear-llama3-tiny"
    own = models.build_model(dataclasses.replace(cfg.model.arch, vocab_size=512), device="cpu")
    models.save_model(tmp_path / "own.pt", own)
    cfg.model.init_from = str(tmp_path / "own.pt")
    assert trainer.model_label(cfg.model, load_model_config(tmp_path / "own.pt")).startswith("linear-llama3-tiny (")


def _main_on_rank(argv):
    return pretrain.main(argv)


def test_an_error_after_the_group_is_printed_once(tmp_path, cache_dir, capfd):
    """A truncated checkpoint on --resume, 2 ranks: exit 2 on both, one message naming the file and the older
    intact checkpoint (was: every rank printed it, and under torchrun only some did)."""
    run_dir = tmp_path / "run"
    run_ranks(2, trainer.train, tiny(run_dir, cache_dir, "--max-steps", "2", "--checkpoint.every", "1"))
    model_file = run_dir / "checkpoints" / "step_00000002" / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-10])
    capfd.readouterr()
    codes = run_ranks(2, _main_on_rank, _main_argv(run_dir, cache_dir, "--max-steps", "4", "--resume"))
    err = capfd.readouterr().err
    assert codes == [2, 2] and err.count("pretrain: error") == 1 and "model.pt has" in err and "Traceback" not in err
    assert 'other checkpoints here: [\'step_00000001\']; to resume from one, write {"dir": "step_00000001"}' in err


def _average_on_rank():
    from lasp.launch.engine import average_gradients, fixed_buckets
    rank = torch.distributed.get_rank()
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in (5, 3, 7)]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=torch.float64) * (rank + 1) + i
    params[1].grad = None if rank == 0 else params[1].grad      # a missing gradient counts as zeros
    buckets = fixed_buckets(params, cap=8)
    average_gradients(buckets)
    return [[p.numel() for p in b] for b in buckets], [p.grad.tolist() for p in params]


def test_average_gradients_in_fixed_buckets_on_3_ranks():
    """The DDP engine's gradient mean on an odd world, float64, against the mean written out."""
    results = run_ranks(3, _average_on_rank)
    for layout, grads in results:
        assert layout == [[5, 3], [7]]
        for i, (n, got) in enumerate(zip((5, 3, 7), grads)):
            ranks = [r for r in range(3) if not (i == 1 and r == 0)]
            want = [sum(k * (r + 1) + i for r in ranks) / 3 for k in range(n)]
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12), i
