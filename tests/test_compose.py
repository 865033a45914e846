"""The launcher composes parallelisms on bam-moe-tiny (2 attention experts, 4 FFN experts top-2): `--ep 2`,
`--zero 2 --tp 2` and `--tp 2` on 4 gloo ranks each equal one process (fp32: losses and pre-clip gradient norms
over 4 steps within 1e-5 relative, final model.pt close), and so do `--ep 4`, `--ep 2 --tp 2` and
`--zero 3 --tp 2`; a checkpoint written at ep 2 resumes at ep 1 and one at tp 2 at tp 1 (full weights); ZeRO x TP
resumes at its own world; the expert all-to-all ran (and only under ep); bad sizes raise before any collective.

Every 4-rank run reads 4 sequences of 64 tokens a step (dp 2 x 2, or dp 4 x 1), so all equal one process reading
4 sequences a step (the same samples: PackedDataset.batch(step, r, dp, B) are rows (step·dp + r)·B ...).
Equal grad norms matter: a wrong constant scale on the expert gradients leaves the losses of a few Adam steps
almost unchanged (Adam is blind to a scale) but not the norm.
"""
import shutil
import warnings

import numpy as np
import pytest
import torch

from lasp import models
from lasp.launch.config import check_config, parse_args
from lasp.launch.trainer import train
from lasp.parallel import count_collectives
from lasp.parallel.mesh import mesh_groups
from tests.dist import rel_err, run_ranks

TOL = 1e-5
# Seconds of imports done once here, before the ranks fork, instead of in each of them: the launcher's checks
# build the model on the meta device (its first use imports torch modules), TP imports megatron.core.
models.build_model(models.get_config("bam-moe-tiny"), device="meta")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core import tensor_parallel  # noqa: F401
SMALL = ("--model.n_layers", "2", "--model.pattern", "LN")      # one linear and one softmax layer, for time


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def _cfg(run_dir, cache_dir, *args):
    return parse_args(["--config", "tiny", "--model", "bam-moe-tiny", *SMALL, "--run-dir", str(run_dir),
                       "--max-steps", "4", "--data.cache_dir", cache_dir, "--run.sample_tokens", "0",
                       "--run.dtype", "fp32", "--checkpoint.every", "2", *args])[0]


def _train(cfg):
    """-> (losses, pre-clip grad norms, all_to_all_v calls) of this rank."""
    with count_collectives() as log:
        out = train(cfg)
    return list(out["losses"].values()), list(out["grad_norms"].values()), log.count("all_to_all_v")


def _rel(a, b):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _weights(run_dir):
    return models.load_model(run_dir / "model.pt").state_dict()


@pytest.fixture(scope="module")
def one(tmp_path_factory, cache_dir):
    """One process, 4 sequences a step: (losses, grad norms, a2a calls), its run folder."""
    run_dir = tmp_path_factory.mktemp("one")
    return run_ranks(1, _train, _cfg(run_dir, cache_dir, "--data.batch_size", "4"))[0], run_dir


def _resume_from_step_2(src, dst):
    """A new run folder whose checkpoints hold only src's step 2 (src kept step 2 and 4)."""
    shutil.copytree(src / "checkpoints" / "step_00000002", dst / "checkpoints" / "step_00000002")


def _check_equal(ranks, one, run_dir):
    (losses, norms, _), one_dir = one
    assert all(r[:2] == ranks[0][:2] for r in ranks)                    # every rank reports the same
    assert _rel(ranks[0][0], losses) < TOL and _rel(ranks[0][1], norms) < TOL, (ranks[0][:2], (losses, norms))
    want = _weights(one_dir)
    got = _weights(run_dir)
    assert got.keys() == want.keys()
    assert max(rel_err(got[k], want[k]) for k in want) < 1e-4


def test_ep2_equals_one_process_and_resumes_at_ep1(tmp_path, cache_dir, one):
    """dp 2 x sp 2, experts over the ep groups [0, 1], [2, 3] (the sp groups here), reduced over [0, 2], [1, 3]."""
    ranks = run_ranks(4, _train, _cfg(tmp_path / "ep2", cache_dir, "--sp", "2", "--ep", "2"))
    _check_equal(ranks, one, tmp_path / "ep2")
    # per MoE layer (2) and step (4): rows there and back in forward, again in the recomputation, and in backward
    assert all(r[2] == 4 * 2 * 6 for r in ranks) and one[0][2] == 0
    _resume_from_step_2(tmp_path / "ep2", tmp_path / "ep1")
    rest = run_ranks(2, _train, _cfg(tmp_path / "ep1", cache_dir, "--resume"))   # dp 2, all experts on each
    assert _rel(rest[0][0], one[0][0][2:]) < TOL and _rel(rest[0][1], one[0][1][2:]) < TOL
    assert rest[0][2] == 0


def test_tp2_equals_one_process_and_resumes_at_tp1(tmp_path, cache_dir, one):
    ranks = run_ranks(4, _train, _cfg(tmp_path / "tp2", cache_dir, "--tp", "2"))
    _check_equal(ranks, one, tmp_path / "tp2")
    _resume_from_step_2(tmp_path / "tp2", tmp_path / "tp1")
    rest = run_ranks(2, _train, _cfg(tmp_path / "tp1", cache_dir, "--resume"))
    assert _rel(rest[0][0], one[0][0][2:]) < TOL and _rel(rest[0][1], one[0][1][2:]) < TOL


def test_zero2_tp2_equals_one_process_and_resumes(tmp_path, cache_dir, one):
    """ZeRO-2 partitions over the ranks holding the same tp shard ([0, 2], [1, 3]); model.pt is the full model; its
    own checkpoint (DeepSpeed's partitions of the shards) resumes at the same world, stage and tp."""
    import deepspeed  # noqa: F401 - imported once here, before the ranks fork
    args = ("--zero", "2", "--tp", "2")
    ranks = run_ranks(4, _train, _cfg(tmp_path / "z2", cache_dir, *args))
    _check_equal(ranks, one, tmp_path / "z2")
    _resume_from_step_2(tmp_path / "z2", tmp_path / "z2b")
    rest = run_ranks(4, _train, _cfg(tmp_path / "z2b", cache_dir, *args, "--resume"))
    assert _rel(rest[0][0], one[0][0][2:]) < TOL and _rel(rest[0][1], one[0][1][2:]) < TOL
    _resume_from_step_2(tmp_path / "z2", tmp_path / "z2c")                     # same world and dp, tp 1: refused
    with pytest.raises(AssertionError, match=r"written by ZeRO at tp=2, this run has tp=1"):
        run_ranks(4, _train, _cfg(tmp_path / "z2c", cache_dir, "--zero", "2", "--sp", "2", "--resume"))


@pytest.mark.parametrize("args", [
    ("--ep", "4", "--data.batch_size", "1"),       # dp 4: every expert on one rank, its replica group of one
    ("--ep", "2", "--tp", "2"),                    # experts over dp within each tp index, and split over tp
    ("--zero", "3", "--tp", "2"),                  # ZeRO-3 partitions the tp shards over their replicas
    ("--zero", "1", "--tp", "2"),                  # ZeRO-1: optimizer states of the tp shards partitioned
])
def test_other_compositions_equal_one_process(tmp_path, cache_dir, one, args):
    if "--zero" in args:
        import deepspeed  # noqa: F401 - imported once here, before the ranks fork
    ranks = run_ranks(4, _train, _cfg(tmp_path / "run", cache_dir, *args))
    _check_equal(ranks, one, tmp_path / "run")
    assert all(r[2] > 0 for r in ranks) == ("--ep" in args)


def test_expert_groups_of_the_mesh():
    """ep: blocks of consecutive dp·sp ranks of one tp index; edp: the ranks holding the same experts."""
    lines = mesh_groups(4, sp=2, ep=2)                                        # dp 2 x sp 2, ep 2
    assert lines["ep"] == [[0, 1], [2, 3]] and lines["edp"] == [[0, 2], [1, 3]]
    lines = mesh_groups(8, sp=2, tp=2, ep=2)                                  # dp 2 x sp 2 x tp 2, ep 2
    assert lines["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]] and lines["edp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert mesh_groups(4, ep=4)["edp"] == [[0], [1], [2], [3]]
    from lasp.launch.trainer import mesh_table                                     # --dry-run prints the same groups
    table = mesh_table(8, 2, 8, tp=2, ep=2)
    assert f"ep groups: {lines['ep']}" in table and f"edp groups (same experts): {lines['edp']}" in table
    assert not any(line.startswith("ep groups") for line in mesh_table(8, 2, 8, tp=2))


@pytest.mark.parametrize("world, args, message", [
    (4, ("--ep", "3"), r"ep=3 must divide dp x sp = 4"),
    (8, ("--ep", "8"), r"parallel.ep=8 does not fit .*n_ffn_experts divisible by 8, got 4"),
    (4, ("--ep", "2", "--model", "linear-llama3-tiny"), r"parallel.ep=2 does not fit .*no MoE layer"),
    (4, ("--ep", "2", "--zero", "2"), r"parallel.zero=2 needs parallel.ep=1"),
    (4, ("--ep", "0"), r"parallel.ep must be >= 1"),
])
def test_bad_sizes_raise_before_any_collective(tmp_path, cache_dir, world, args, message):
    cfg = parse_args(["--config", "tiny", "--model", "bam-moe-tiny", "--run-dir", str(tmp_path), *args])[0]
    with count_collectives() as log, pytest.raises(ValueError, match=message):
        check_config(cfg, world)
    assert log.count() == 0 and not torch.distributed.is_initialized()
