"""Checkpoints that cannot run code, cannot hold broken weights, lose nothing, and resume bit for bit.

Each test here was broken once on purpose (the fix reverted) and seen to fail; the docstrings say how.
Small on purpose: the tiny preset, a few steps, 2-4 gloo ranks."""
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from launch import pretrain
from tests.dist import run_ranks
from tests.test_launch import tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


# ---------------------------------------------------------------------------------------------- no unpickling
class _Plant:
    """Unpickled by a full (not weights-only) unpickler, this calls open(marker, "w"): the marker file appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant_every_file(cfg, marker):
    """Train 2 steps (checkpoint at 2); then, one file at a time, replace that file of the checkpoint with a crafted
    pickle, recompute the manifest (it proves integrity, not authenticity) and resume -> the error of each file."""
    pretrain.train(cfg)
    rank = torch.distributed.get_rank()
    root = Path(cfg.run.dir) / "checkpoints"
    folder, pristine = root / "step_00000002", root / "pristine"
    cfg.checkpoint.resume = True
    run = pretrain._setup(cfg)                                   # the pristine checkpoint loads
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
            pretrain._resume(run.engine, root, rank, pretrain._trainer_state(0, cfg, run.mesh, run.data_key),
                             run.device)
        errors[name] = str(e.value)
    return errors


@pytest.mark.parametrize("zero", ["0", "2"])
def test_planted_pickle_in_every_checkpoint_file_runs_nothing(tmp_path, cache_dir, zero):
    """Fails when verify() stops checking the torch files and one reader unpickles fully (tried: the rng file
    with weights_only=False creates the marker; DeepSpeed's own reader does the same for the ZeRO files)."""
    if zero != "0":
        import deepspeed  # noqa: F401 - imported before the ranks fork
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
            assert name.split("/")[-1] in msg or "another rank failed" in msg, (name, msg)
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
