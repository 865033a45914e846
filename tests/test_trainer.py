"""The training core (launch/trainer.py): one training loop in launch/, single steps equal to the loop, and the
benchmark's step (launch/bench.py model/long modes) is the core's, exact across sequence-parallel ranks."""
import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _calls(path):
    """(function name, receiver text, method) of every `x.backward(...)` / `x.step(...)` call in a file."""
    tree = ast.parse(path.read_text())
    found = []
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)):
            if call.func.attr in ("backward", "step"):
                found.append((fn.name, ast.unparse(call.func.value), call.func.attr))
    return found


def test_one_training_loop_in_launch():
    """Backward and optimizer steps run only inside the engines (launch/engine.py), and the engines' backward and
    step are called only by launch.trainer.train_step. Fails for a second loop, e.g. bench's former own
    train_step (`loss.backward()`, `optimizer.step()`) or the BAM recipe's former loop."""
    outside = {}
    for path in sorted(LAUNCH.glob("*.py")):
        calls = _calls(path)
        if path.name == "engine.py":
            continue
        allowed = {("train_step", "engine", "backward"), ("train_step", "engine", "step")} if \
            path.name == "trainer.py" else set()
        extra = [c for c in calls if c not in allowed]
        if extra:
            outside[path.name] = extra
    assert not outside, outside
    assert {c[2] for c in _calls(LAUNCH / "trainer.py")} == {"backward", "step"}      # the scan sees calls


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def _by_hand(cfg):
    """setup, then the steps one by one through local_batch + train_step -> losses and gradient norms."""
    from lasp.launch import trainer
    run = trainer.setup(cfg)
    steps = [trainer.train_step(run, trainer.local_batch(run, s)) for s in range(1, cfg.optim.max_steps + 1)]
    return [m["loss"] for m in steps], [m["grad_norm"] for m in steps]


def _looped(cfg):
    from lasp.launch import trainer
    out = trainer.train(cfg)
    return list(out["losses"].values()), list(out["grad_norms"].values())


def test_single_steps_equal_the_loop(tmp_path, cache_dir):
    """A caller running train_step itself gets the loop's numbers bit for bit (2 ranks, sp 2, 3 steps)."""
    from tests.test_launch import tiny
    argv = ("--sp", "2", "--max-steps", "3", "--checkpoint.every", "0")
    looped = run_ranks(2, _looped, tiny(tmp_path / "a", cache_dir, *argv))
    by_hand = run_ranks(2, _by_hand, tiny(tmp_path / "b", cache_dir, *argv))
    assert by_hand == looped


def _bench_steps(pair, seq_len):
    """Two steps of bench's long mode (bench_run + the core's train_step) on this rank -> [(loss, grad norm)]."""
    from lasp.launch import bench
    from lasp.launch.trainer import setup_mesh, train_step
    args = bench.parse_args(["--mode", "long", "--engines", pair, "--layout", "zigzag", "--model.n_layers", "2",
                             "--model.pattern", "LN"])
    mesh = setup_mesh(dist.get_world_size(), 1)
    run = bench.bench_run(args, pair, mesh, torch.device("cpu"))
    batch = bench.sequence_batch(seq_len, run.cfg.parallel.layout, args, mesh.group("sp"), "cpu")
    return [(m["loss"], m["grad_norm"]) for m in (train_step(run, batch) for _ in range(2))]


@pytest.mark.parametrize("pair", ["lasp2+allgather", "ring_linear+ring"])
def test_bench_step_on_4_ranks_equals_one_process(pair):
    """bench's step over 4 sequence-parallel ranks = one process (fp32, 2e-5): loss and pre-clip gradient norm of
    two steps (the second after an AdamW update). The gradients meet only in the engine's averaging, so a wrong
    scale (the sp factor, or a sum where a mean belongs) changes the norm; ring_linear (a baseline that training
    does not offer) is bound after the core built the run."""
    one = run_ranks(1, _bench_steps, pair, 256)[0]
    for rank in run_ranks(4, _bench_steps, pair, 256):
        for (loss, norm), (loss_1, norm_1) in zip(rank, one):
            assert loss == pytest.approx(loss_1, rel=2e-5) and norm == pytest.approx(norm_1, rel=2e-5)


def _loss_reductions(sp):
    """The small all-reduces (the loss sums, the token counts, the stop vote) of one bench step on this rank."""
    from lasp.launch import bench
    from lasp.launch.trainer import setup_mesh, train_step
    from lasp.parallel import count_collectives
    args = bench.parse_args(["--mode", "long", "--engines", "lasp2+allgather", "--model.n_layers", "1",
                             "--model.pattern", "L"])
    mesh = setup_mesh(sp, 1)
    run = bench.bench_run(args, "lasp2+allgather", mesh, torch.device("cpu"))
    batch = bench.sequence_batch(64 * sp, run.cfg.parallel.layout, args, mesh.group("sp"), "cpu")
    with count_collectives() as log:
        train_step(run, batch)
    return [r.bytes for r in log.records if r.op == "all_reduce" and r.bytes <= 64]


def test_loss_sums_take_one_all_reduce_when_the_sequence_group_is_the_job():
    """sp = W (dp = 1): the group's token count comes with the job's totals, one small all-reduce; dp = 2: the
    sequence group's count needs its own, two. Fails if the merged path stops being taken, or if dp > 1 lost the
    group count (the loss would then be scaled by the job's tokens instead of the group's)."""
    assert [len(x) for x in run_ranks(2, _loss_reductions, 2)] == [1, 1]
    assert [len(x) for x in run_ranks(2, _loss_reductions, 1)] == [2, 2]
