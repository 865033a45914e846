"""A run folder belongs to one live job, and every bad file or value ends in one message before it costs memory
(issue 25, and issue 24 item 4: a changed max_steps never jumps the learning rate).

Each test was run once against the code before the fix and failed there; the docstrings say how. Launcher runs are
the expensive part: one module run folder (tiny preset, one process, 4 steps, checkpoints at 2 and 4) serves the
resume cases, each on a copy of its step 2 or 4."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lasp import models
from lasp.launch import checkpoint as ckpt
from lasp.launch import pretrain
from lasp.launch.config import check_config, parse_args
from lasp.launch.engine import lr_at
from lasp.launch.report import read_metrics
from lasp.models import serialization
from tests.dist import run_ranks

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def _argv(run_dir, cache_dir, *args):
    return ["--config", "tiny", "--run-dir", str(run_dir), "--data.cache_dir", cache_dir, "--run.sample_tokens", "0",
            *args]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    """A finished 4-step run (one process, warm-up 1, checkpoints at steps 2 and 4) -> its run folder."""
    run_dir = tmp_path_factory.mktemp("finished")
    assert pretrain.main(_argv(run_dir, cache_dir, "--max-steps", "4", "--checkpoint.every", "2",
                               "--optim.warmup_steps", "1")) == 0
    return run_dir


def _from_step(src, dst, step):
    """A new run folder holding only src's checkpoint `step` (and its metrics up to it)."""
    name = ckpt.step_dir("", step).name
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    rows = [r for r in read_metrics(src / "metrics.jsonl") if r["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def _resume(src, dst, step, cache_dir, capsys, *args):
    """pretrain --resume from a copy of src's checkpoint `step` -> (exit code, stderr)."""
    _from_step(src, dst, step)
    capsys.readouterr()
    code = pretrain.main(_argv(dst, cache_dir, "--resume", "--checkpoint.every", "2", "--optim.warmup_steps", "1",
                               *args))
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 1. one job a folder
def _wait_for_lock(path, pid, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if json.loads(path.read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never named pid {pid}")


def _main_on_rank(argv):
    return pretrain.main(argv)


def test_a_second_job_in_a_live_run_folder_stops_naming_the_holder(tmp_path, cache_dir, capfd):
    """Job A (a real process) trains in R; job B in R, fresh on 2 ranks or --resume on one, stops at once: exit 2 on
    every rank, one message naming A's host and pid, nothing of A's changed. After kill -9 of A the lock is gone
    with it and a resume runs. Before: both jobs ran and overwrote each other's checkpoints (issue 25, break 1)."""
    run_dir = tmp_path / "R"
    job_a = subprocess.Popen([sys.executable, str(REPO / "launch" / "pretrain.py"),
                              *_argv(run_dir, cache_dir, "--max-steps", "100000", "--checkpoint.every", "0")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_lock(run_dir / ckpt.LOCK, job_a.pid)
        job_a.send_signal(signal.SIGSTOP)                             # holds the lock, costs no CPU meanwhile
        capfd.readouterr()
        assert run_ranks(2, _main_on_rank, _argv(run_dir, cache_dir, "--max-steps", "2")) == [2, 2]
        assert pretrain.main(_argv(run_dir, cache_dir, "--max-steps", "2", "--resume")) == 2
        err = capfd.readouterr().err
        assert err.count("pretrain: error") == 2 and "Traceback" not in err
        assert err.count(f"is in use by another job (host {os.uname().nodename}, pid {job_a.pid}") == 2
        assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").iterdir())
        assert job_a.poll() is None                                   # A lives on
    finally:
        job_a.send_signal(signal.SIGKILL)
        job_a.wait()
    assert pretrain.main(_argv(run_dir, cache_dir, "--max-steps", "2", "--resume")) == 0
    assert ckpt.latest(run_dir / "checkpoints").name == "step_00000002"


def test_the_lock_is_dropped_with_its_process():
    """A holder killed with SIGKILL leaves run.lock behind with its name, but not the lock (the kernel drops flock
    locks with the process): the next job takes it. The same process taking it again is a no-op."""
    import tempfile
    folder = Path(tempfile.mkdtemp())
    pid = os.fork()
    if pid == 0:                                                      # the holder
        ckpt.lock_run(folder)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert json.loads((folder / ckpt.LOCK).read_text())["pid"] == pid
    assert ckpt.lock_run(folder) is None and ckpt.lock_run(folder) is None
    ckpt.unlock_run(folder)
    shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------- 2. what must not change
def test_resume_refuses_another_model_or_token_order(finished, tmp_path, cache_dir, capsys):
    """Another rope_base / norm_eps / feature map, another n_layers, another seq_len: exit 2, every difference named
    with the option that allows it. Before: the first ran on (loss 5.48 -> 6.23), the second ended in a
    load_state_dict traceback on every rank, the third was accepted without a word (issue 25, break 2)."""
    code, err = _resume(finished, tmp_path / "a", 4, cache_dir, capsys, "--max-steps", "6", "--model.rope_base", "10",
                        "--model.feature_map", "identity", "--model.norm_eps", "0.5")
    assert code == 2 and err.count("pretrain: error") == 1 and "Traceback" not in err
    assert "model.rope_base was 500000.0, now 10.0" in err and "model.norm_eps was 1e-05, now 0.5" in err
    assert "model.feature_map was 'silu', now 'identity'" in err
    assert "--checkpoint.allow_changes model.feature_map model.rope_base model.norm_eps (docs/launch.md)" in err
    code, err = _resume(finished, tmp_path / "b", 4, cache_dir, capsys, "--max-steps", "6", "--model.n_layers", "8")
    assert code == 2 and "model.n_layers was 4, now 8" in err and "Traceback" not in err
    code, err = _resume(finished, tmp_path / "c", 4, cache_dir, capsys, "--max-steps", "6", "--data.seq_len", "32",
                        "--data.batch_size", "3")
    assert code == 2 and "data.seq_len was 64, now 32" in err and "data.batch_size was 2, now 3" in err


def test_an_allowed_change_runs_and_a_shape_change_names_the_tensors(finished, tmp_path, cache_dir, capsys):
    """--checkpoint.allow_changes says the change is intended: another seq_len continues; another n_layers passes
    the record check and is then refused by the tensor check, naming the tensors (no load_state_dict traceback)."""
    code, err = _resume(finished, tmp_path / "a", 4, cache_dir, capsys, "--max-steps", "5", "--data.seq_len", "32",
                        "--checkpoint.allow_changes", "data.seq_len")
    assert code == 0, err
    code, err = _resume(finished, tmp_path / "b", 4, cache_dir, capsys, "--max-steps", "5", "--model.n_layers", "8",
                        "--checkpoint.allow_changes", "model.n_layers")
    assert code == 2 and "weights do not fit the model config" in err and "layers.4." in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"checkpoint.allow_changes: \['parallel.zero'\] cannot be allowed"):
        check_config(parse_args(_argv(tmp_path, "c", "--checkpoint.allow_changes", "parallel.zero"))[0], 1)


def test_a_longer_max_steps_continues_the_learning_rate(finished, tmp_path, cache_dir, capsys):
    """Issue 24 item 4: resumed at step 2 of 4 with --max-steps 8, the LR of step 3 is the one the run had there and
    the LR never rises afterwards: it decays from there to min_lr at step 8. Before: the schedule was rebuilt from the
    new max_steps, step 4's LR jumped above step 3's."""
    code, err = _resume(finished, tmp_path / "a", 2, cache_dir, capsys, "--max-steps", "8")
    assert code == 0, err
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")}
    before = {r["step"]: r["lr"] for r in read_metrics(finished / "metrics.jsonl")}
    assert lrs[3] == before[3]                                         # what it was
    steps = sorted(lrs)
    assert all(lrs[a] >= lrs[b] for a, b in zip(steps, steps[1:])), lrs   # never a jump up
    cfg = parse_args(_argv(tmp_path, cache_dir, "--max-steps", "8", "--optim.warmup_steps", "1"))[0]
    assert lrs[8] == pytest.approx(lr_at(7, cfg.optim, {"step": 2, "lr": before[3]}), rel=1e-12)
    assert lrs[8] > cfg.optim.min_lr and lrs[4] < lrs[3]
    # the restart is recorded: a second resume of the extended run continues the same curve
    saved = ckpt.read_trainer_state(tmp_path / "a" / "checkpoints" / "step_00000008")
    assert saved["schedule"]["restart"] == {"step": 2, "lr": before[3]}


def test_a_checkpoint_without_records_resumes_with_a_note(finished, tmp_path, cache_dir, capsys):
    """A trainer.json written before the model / data / schedule records: the resume runs and says, in one line,
    that they could not be compared."""
    folder = _from_step(finished, tmp_path / "a", 2) / "checkpoints" / "step_00000002"
    state = json.loads((folder / "trainer.json").read_text())
    old = {k: v for k, v in state.items() if k not in ("model", "data", "schedule")}
    (folder / "trainer.json").write_text(json.dumps(old))
    ckpt.write_json(folder / ckpt.MANIFEST, ckpt._manifest(folder))
    capsys.readouterr()
    assert pretrain.main(_argv(tmp_path / "a", cache_dir, "--resume", "--max-steps", "3", "--checkpoint.every", "2",
                               "--optim.warmup_steps", "1")) == 0
    out = capsys.readouterr().out
    assert out.count("predates the model and data records in trainer.json") == 1


# ---------------------------------------------------------------------------------------------- 3. files checked
def _solo_barrier(error=None):
    if error is not None:
        raise error


def _fake(root, step, files):
    def write(folder):
        for name, obj in files.items():
            torch.save(obj, folder / name) if name.endswith(".pt") else (folder / name).write_text(obj)
    return ckpt.save(root, step, write, rank=0, barrier=_solo_barrier, keep=10)


def test_latest_and_manifest_names_stay_inside_the_folder(tmp_path, monkeypatch):
    """latest naming an absolute path, another run's step or '..'; a manifest entry '../../x' (refused before any
    file is hashed: was an 8 GB sparse file hashed for 46 s); a file that is not in the manifest (was loaded
    unchecked); a link. Each refused naming what is wrong (issue 25, break 7)."""
    other = _fake(tmp_path / "other", 7, {"trainer.json": '{"step": 7}'})
    root = tmp_path / "run"
    folder = _fake(root, 3, {"trainer.json": '{"step": 3}', "model.pt": {"w": torch.ones(3)}})
    for name in (str(other), "../other/step_00000007", "step_00000003/../../other/step_00000007"):
        (root / "latest").write_text(json.dumps({"dir": name}))
        with pytest.raises(ValueError, match="not a step folder of this run"):
            ckpt.latest(root)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    monkeypatch.setattr(ckpt, "_sha256", lambda path: pytest.fail(f"hashed {path} before the names were checked"))
    for bad in ("../../x", "/etc/passwd", "a/../../x"):
        (folder / ckpt.MANIFEST).write_text(json.dumps({"files": {**manifest["files"], bad: {"size": 1,
                                                                                             "sha256": "0"}}}))
        with pytest.raises(ValueError, match="which is not a file inside the checkpoint folder"):
            ckpt.verify(folder)
    monkeypatch.undo()
    (folder / ckpt.MANIFEST).write_text(json.dumps({"files": {"trainer.json": manifest["files"]["trainer.json"]}}))
    with pytest.raises(ValueError, match=r"\['model.pt'\] are not in its manifest.json"):
        ckpt.verify(folder)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))
    (folder / "model.pt").rename(tmp_path / "elsewhere.pt")
    (folder / "model.pt").symlink_to(tmp_path / "elsewhere.pt")
    with pytest.raises(ValueError, match="model.pt is missing \\(or a link\\)"):
        ckpt.verify(folder)


@pytest.mark.parametrize("step, message", [(-100, "step must be an int >= 0"), ("15", "step must be an int"),
                                           (15.5, "step must be an int"), (True, "step must be an int"),
                                           (4, "step 4 is not its folder's")])
def test_trainer_json_fields_are_checked(tmp_path, step, message):
    """A tampered step (was: -100 ran from step -99, "15" and 15.5 crashed with TypeError tracebacks)."""
    folder = _fake(tmp_path, 3, {"trainer.json": json.dumps({"step": step, "dp": 1, "zero": 0, "data_key": "k"})})
    with pytest.raises(ValueError, match=message):
        ckpt.read_trainer_state(folder)
    (folder / "trainer.json").write_text(json.dumps({"step": 3, "dp": 0}))
    with pytest.raises(ValueError, match="dp must be an int >= 1"):
        ckpt.read_trainer_state(folder)
    (folder / "trainer.json").write_text(json.dumps({"step": 3, "schedule": {"lr": float("nan")}}))
    with pytest.raises(ValueError, match="schedule.lr must be a finite float"):
        ckpt.read_trainer_state(folder)


def _bomb(path, vocab_size):
    """A model.pt of a few KB whose zero-stride tensors declare the shapes of a `vocab_size` vocabulary."""
    cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), vocab_size=vocab_size, dim=64, n_heads=4,
                              n_kv_heads=2, ffn_dim=128, n_layers=4)
    weights = {k: torch.zeros(v.shape[-1]).expand(v.shape) for k, v in
               models.build_model(cfg, device="meta").state_dict().items()}
    torch.save({"model_config": models.config_to_dict(cfg), "model": weights}, path)
    return path


BOMB = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))          # 1.5 GiB of address space
from lasp import models
for path in sys.argv[1:]:
    try:
        models.load_model(path)
        print("loaded", path)
    except ValueError as e:
        print("refused", e)
"""


def test_a_zero_stride_bomb_is_refused_before_allocation(tmp_path):
    """Under a 1.5 GiB address-space limit: a 14 KB file declaring a 4M-token vocabulary (2 GiB of weights) is
    refused by the memory estimate, one declaring 1M (0.5 GiB, fits) by the storage check; nothing is allocated.
    Before: the first ended in an allocation failure, the second loaded 0.5 GiB of zeros (generate used 2.56 GB and
    exited 0; issue 25, break 4)."""
    big, small = _bomb(tmp_path / "big.pt", 4 << 20), _bomb(tmp_path / "small.pt", 1 << 20)
    assert big.stat().st_size < 100_000
    out = subprocess.run([sys.executable, "-c", BOMB, str(big), str(small)], capture_output=True, text=True,
                         timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    assert lines[0].startswith("refused") and "needs about 2" in lines[0] and "RLIMIT_AS" in lines[0]
    assert lines[1].startswith("refused") and "expanded or overlapping tensor" in lines[1]


def test_an_expanded_tensor_in_a_checkpoint_is_refused(tmp_path):
    folder = _fake(tmp_path, 3, {"optim.pt": {"exp_avg": torch.zeros(4).expand(1 << 20, 4)}})
    with pytest.raises(ValueError, match=r"optim.pt: tensor exp_avg declares shape \(1048576, 4\)"):
        ckpt.verify(folder)


@pytest.mark.parametrize("flag, value", [("--data.seq_len", "1000000000000"), ("--data.batch_size", "1000000000"),
                                         ("--model.n_layers", "100000"), ("--model.dim", "4000000")])
def test_sizes_beyond_memory_are_refused_by_the_estimate(tmp_path, flag, value):
    """One message naming the key, the planner's estimate and the memory, before anything is allocated. Before:
    seq_len 1e12 tried to allocate 8 TB inside the config check, the others grew to the memory limit."""
    cfg = parse_args(_argv(tmp_path, "c", flag, value))[0]
    with pytest.raises(ValueError, match=rf"{flag[2:]}={value}.* needs about .* GiB, more than the .* GiB this process "
                                         rf"can have"):
        check_config(cfg, 1)


# ---------------------------------------------------------------------------------------------- 4, 9. writes
def test_a_full_disk_while_writing_model_pt(finished, tmp_path, cache_dir, capsys, monkeypatch):
    """torch.save fails half-way through model.pt (as ENOSPC does: 'basic_ios::clear'): exit 2, one message naming
    model.pt and the free space, no model.pt.tmp* left, the checkpoint of that step intact. Before: a chain of
    errors on rank 0, a gloo traceback on the others, and a stray model.pt.tmp* (issue 25, break 3)."""
    save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if Path(path).name.startswith("model.pt.tmp"):
            Path(path).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing "
                               "file: basic_ios::clear")
        return save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    code, err = _resume(finished, tmp_path / "a", 2, cache_dir, capsys, "--max-steps", "4")
    assert code == 2 and err.count("pretrain: error") == 1 and "Traceback" not in err
    assert f"writing {tmp_path / 'a' / 'model.pt'} failed (" in err and "GiB free under" in err
    assert not list((tmp_path / "a").glob("model.pt.tmp*"))
    assert ckpt.verify(ckpt.latest(tmp_path / "a" / "checkpoints"))


def _full_metrics_disk(cfg):
    from lasp.launch import report
    log = report.Reporter.log

    def failing(self, row):
        if self.active and row["step"] == 3:                           # rank 0 writes metrics
            raise OSError(28, "No space left on device")
        return log(self, row)
    report.Reporter.log = failing
    return pretrain.main(cfg)


def test_a_full_disk_while_writing_metrics_stops_every_rank(finished, tmp_path, cache_dir, capfd):
    """metrics.jsonl cannot be written at step 3 (rank 0 writes it): both ranks stop with exit 2, one message
    naming metrics.jsonl and the free space, before step 3's checkpoint; loss.png failing at the end is one
    message too. Before: an OSError traceback on rank 0 while rank 1 waited in the next collective."""
    _from_step(finished, tmp_path / "a", 2)
    capfd.readouterr()
    codes = run_ranks(2, _full_metrics_disk, _argv(tmp_path / "a", cache_dir, "--resume", "--max-steps", "4",
                                                     "--optim.warmup_steps", "1", "--checkpoint.every", "1",
                                                     "--sp", "2"))
    err = capfd.readouterr().err
    assert codes == [2, 2] and err.count("pretrain: error") == 1 and "Traceback" not in err, err
    assert f"writing {tmp_path / 'a' / 'metrics.jsonl'} failed" in err and "GiB free" in err
    assert ckpt.latest(tmp_path / "a" / "checkpoints").name == "step_00000002"


def test_a_full_disk_while_drawing_loss_png(finished, tmp_path, cache_dir, capsys, monkeypatch):
    """loss.png cannot be written at the end: exit 2, one message naming loss.png and the free space, the PNG cut
    short removed (was an OSError traceback after the '_idat' errors of a half-written PNG)."""
    from lasp.launch import report

    def full_disk(metrics_path, png_path, title=""):
        Path(png_path).write_bytes(b"\x89PNG")                        # cut short
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report, "plot_losses", full_disk)
    code, err = _resume(finished, tmp_path / "a", 2, cache_dir, capsys, "--max-steps", "3")
    assert code == 2 and err.count("pretrain: error") == 1 and "Traceback" not in err
    assert f"writing {tmp_path / 'a' / 'loss.png'} failed ([Errno 28] No space left on device)" in err
    assert not (tmp_path / "a" / "loss.png").exists()                   # no broken plot left


def test_a_killed_prune_leaves_nothing_that_pruning_never_removes(tmp_path):
    """Pruning renames a folder to .del-* before deleting it; the next save removes a .del-* folder, a stale
    .tmp-* and a step folder without a manifest (what a kill during the old rmtree left; issue 25, break 9)."""
    root = tmp_path / "ckpt"
    for step in (1, 2):
        _fake(root, step, {"trainer.json": "{}"})
    (root / "step_00000001" / ckpt.MANIFEST).unlink()                 # the old half-deleted folder
    shutil.copytree(root / "step_00000002", root / ".del-step_00000000")   # a prune killed after its rename
    (root / ".tmp-step_00000005").mkdir()                             # a save killed before its rename
    ckpt.save(root, 3, lambda folder: None, rank=0, barrier=_solo_barrier, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


# ---------------------------------------------------------------------------------------------- 6, 8. model values
@pytest.mark.parametrize("flag, value, message", [
    ("--model.init_std", "-1", "model.init_std must be > 0, got -1.0"),
    ("--model.init_std", "nan", "model.init_std must be a finite number"),
    ("--model.loss_chunk_tokens", "0", "model.loss_chunk_tokens must be >= 1"),
    ("--model.rope_base", "0", "model.rope_base must be > 0"),
    ("--model.rope_base", "-5", "model.rope_base must be > 0"),
    ("--model.norm_eps", "-1", "model.norm_eps must be > 0"),
    ("--model.n_heads", "0", "model.n_heads must be >= 1")])
def test_bad_model_values_name_the_key(tmp_path, flag, value, message):
    """Before: tracebacks on every rank (init_std, loss_chunk_tokens, n_heads: ZeroDivisionError), or accepted and
    then exit 3 at step 1 advising a lower learning rate (rope_base, norm_eps; issue 25, break 6)."""
    with pytest.raises(ValueError, match=message):
        parse_args(_argv(tmp_path, "c", flag, value))


def test_every_preset_passes_the_field_rules():
    for name in sorted({**models.PRESETS, **models.BAM_PRESETS}):
        serialization.check_config(models.get_config(name))


@pytest.mark.parametrize("value", ["4", [4], 4.0, None])
def test_crafted_config_types_in_a_model_file(tmp_path, cache_dir, capsys, value):
    """n_layers "4" or a list in a model file: one message naming the field in load_model (evaluate, generate) and
    in model.init_from. Before: TypeError tracebacks (issue 25, break 8)."""
    cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), vocab_size=512, dim=64, n_heads=4,
                              n_kv_heads=2, ffn_dim=128, n_layers=4)
    payload = {"model_config": {**models.config_to_dict(cfg), "n_layers": value},
               "model": models.build_model(cfg).state_dict()}
    torch.save(payload, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="n_layers must be an int, got"):
        models.load_model(tmp_path / "m.pt")
    capsys.readouterr()
    assert pretrain.main(_argv(tmp_path / "run", cache_dir, "--model.init_from", str(tmp_path / "m.pt"))) == 2
    err = capsys.readouterr().err
    assert "model.init_from" in err and "n_layers must be an int" in err and "Traceback" not in err


class _LossScaler:
    """Stands for DeepSpeed's loss scaler in a ZeRO file: a class DDP's weights-only reader refuses."""


def test_zero_checkpoint_resumed_with_another_zero_names_both(finished, tmp_path, cache_dir, capsys):
    """trainer.json says zero 2 (its DeepSpeed files hold data classes DDP's reader does not allow): --zero 0 says
    'parallel.zero was 2, now 0' (was: 'holds more than tensors ... never code', because the files were unpickled
    before the records were compared)."""
    dst = _from_step(finished, tmp_path / "a", 4)
    folder = dst / "checkpoints" / "step_00000004"
    state = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**state, "zero": 2}))

    torch.save({"scaler": _LossScaler()}, folder / "optim.pt")
    ckpt.write_json(folder / ckpt.MANIFEST, ckpt._manifest(folder))
    capsys.readouterr()
    assert pretrain.main(_argv(dst, cache_dir, "--resume", "--max-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "parallel.zero was 2, now 0" in err and "never code" not in err
