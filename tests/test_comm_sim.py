"""The network model of parallel/comm.py (LASP_SIM_NETWORK): parsing, start-up errors, and that its delays are
applied. Only lower bounds on time (a sleep never ends early); never an upper bound on this shared machine."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from lasp.parallel import comm
from tests.dist import run_ranks

ALPHA = 0.02                        # 20 ms per message: long against the gloo overhead, short for the suite


def test_parse_and_formulas():
    m = comm.parse_network("latency_us=50,gbps=25")
    assert m.latency_s == pytest.approx(50e-6) and m.bytes_per_s == 25e9 / 8
    assert comm.parse_network("") is None and comm.parse_network("off") is None
    assert comm.parse_network("gbps=8").latency_s == 0
    assert comm.parse_network("latency_us=3").bytes_per_s == float("inf")
    W, nbytes = 4, 2 ** 20
    assert m.collective("all_gather", W, nbytes) == pytest.approx(3 * (50e-6 + nbytes / (4 * m.bytes_per_s)))
    assert m.collective("all_reduce", W, nbytes) == pytest.approx(2 * m.collective("reduce_scatter", W, nbytes))
    assert m.collective("all_to_all", 1, nbytes) == 0
    assert m.message(nbytes) == pytest.approx(50e-6 + nbytes / m.bytes_per_s)


@pytest.mark.parametrize("spec", ["latency=50", "latency_us", "latency_us=fast", "gbps=0", "latency_us=-1",
                                  "latency_us=1,latency_us=2", "latency_us=50;gbps=25", "gbps=inf"])
def test_malformed_value_names_the_variable_and_keys(spec):
    with pytest.raises(ValueError, match=r"LASP_SIM_NETWORK.*latency_us.*gbps"):
        comm.parse_network(spec)


def test_malformed_value_fails_at_start_up():
    env = dict(os.environ, LASP_SIM_NETWORK="latency_ms=5")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", "import parallel"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "LASP_SIM_NETWORK" in proc.stderr and "latency_us" in proc.stderr, proc.stderr


def test_off_by_default():
    if os.environ.get(comm.NETWORK_VAR):
        pytest.skip("LASP_SIM_NETWORK is set in this environment")
    assert comm.network_model() is None
    with comm.count_collectives() as log:
        comm.all_gather(torch.ones(3))
    assert log.records[0].model_s == 0


def _elapsed(fn):
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _delays():
    """Seconds for each pattern under the model, on this rank, with the model's times from the records."""
    W, r = dist.get_world_size(), dist.get_rank()
    x = torch.ones(4096)                                    # 16 KiB
    out = {}
    with comm.simulated_network(f"latency_us={ALPHA * 1e6}"), comm.count_collectives() as log:
        out["all_gather"] = _elapsed(lambda: comm.all_gather(x))
        out["all_reduce"] = _elapsed(lambda: comm.all_reduce(x.clone()))
        out["reduce_scatter"] = _elapsed(lambda: comm.reduce_scatter(x))
        out["all_to_all"] = _elapsed(lambda: comm.all_to_all(x))

        def overlapped():                                    # async: compute between issue and wait hides it
            issued, (_, work) = time.perf_counter(), comm.all_gather(x, async_op=True)
            out["polled"] = (work.is_completed(), time.perf_counter() - issued)    # LASP-2 polls before a block
            time.sleep(2 * ALPHA)
            work.wait()
            out["completed"] = work.is_completed()
        out["overlapped"] = _elapsed(overlapped)

        def chain():                                         # W−1 dependent hops: rank r holds it after r hops
            buf = torch.zeros(16)
            if r > 0:
                comm.recv(buf, r - 1)
            if r < W - 1:
                comm.send(buf + 1, r + 1)
        out["chain"] = _elapsed(chain)
        out["ring_shift"] = _elapsed(lambda: comm.wait_all(comm.ring_shift([x])[0]))
    with comm.simulated_network("gbps=0.008"):               # 1 MB/s: 16 KiB take 16.4 ms on the wire
        def back_to_back():                                  # 3 messages share one link: 3·m/β
            if r == 0:
                comm.wait_all(comm.exchange([(x, 1)] * 3, []))
            elif r == 1:
                comm.wait_all(comm.exchange([], [(torch.empty_like(x), 0) for _ in range(3)]))
        out["back_to_back"] = _elapsed(back_to_back)
    out["model_s"] = {rec.op: rec.model_s for rec in log.records}
    out["wait_s"] = sum(rec.wait_s for rec in log.records)
    return out


def test_delays_are_applied_lower_bounds_only():
    W = 4
    for r, t in enumerate(run_ranks(W, _delays)):
        assert t["all_gather"] >= 0.99 * (W - 1) * ALPHA, (r, t)
        assert t["reduce_scatter"] >= 0.99 * (W - 1) * ALPHA and t["all_to_all"] >= 0.99 * (W - 1) * ALPHA, (r, t)
        assert t["all_reduce"] >= 0.99 * 2 * (W - 1) * ALPHA, (r, t)
        assert t["overlapped"] >= 2 * ALPHA, (r, t)      # the sleep, and the gather finished behind it
        done, after = t["polled"]                        # is_completed() keeps to the model's finish time too
        assert t["completed"] and (not done or after >= (W - 1) * ALPHA), (r, t)
        assert t["chain"] >= 0.8 * r * ALPHA, (r, t)       # hops add up (0.8: the barrier's exit skew)
        assert t["ring_shift"] >= 0.8 * ALPHA, (r, t)
        if r == 1:
            assert t["back_to_back"] >= 0.8 * 3 * 4096 * 4 / 1e6, (r, t)
        assert t["model_s"]["all_gather"] == pytest.approx((W - 1) * ALPHA, rel=1e-3), t["model_s"]
        assert t["model_s"]["all_reduce"] == pytest.approx(2 * (W - 1) * ALPHA, rel=1e-3), t["model_s"]
        assert t["wait_s"] >= (W - 1) * ALPHA, t


def _engines_under_model(W):
    """Every linear engine gives bitwise the same output and gradients with the model on (the courier path)."""
    import lasp
    from lasp.parallel import shard
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (shard(torch.randn(1, 8 * W, 2, 4, generator=g), "contiguous", dist.get_rank(), W) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    decay = torch.tensor([-0.1, -0.5])
    same = []
    for fn in (lasp.lasp2, lasp.lasp1, lasp.allscan, lasp.ring_linear_attention):
        runs = []
        for spec in ("", "latency_us=200,gbps=1"):
            with comm.simulated_network(spec):
                o = fn(q, k, v, log_decay=decay)
                runs.append([o, *torch.autograd.grad(o, (q, k, v), do)])
        same.append(all(torch.equal(a, b) for a, b in zip(*runs)))
    return same


def test_engines_unchanged_under_the_model():
    for r, same in enumerate(run_ranks(4, _engines_under_model, 4)):
        assert all(same), (r, same)
