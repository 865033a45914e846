"""Throughput regression tests on 4 CPU gloo ranks: exact collectives per layer, the serial communication rounds
on the critical path (deterministic, from the message logs), and time RATIOS of the linear engines measured in
one run (engines interleaved in every repetition, medians, generous margins, no absolute times), once on the
real gloo and once under the network model of parallel/comm.py. Long measurements live in launch/bench.py.
"""
import statistics

import pytest
import torch
import torch.distributed as dist

from tests.dist import run_ranks

W = 4
B, H, D_K, D_V = 1, 4, 32, 32
SIZES = (2048, 4096)               # global tokens; the largest decides the ring ratio
MODEL_SIZE = 16384                 # global tokens of the network-model checks: compute dominates the CPU time
REPS = 7
ENGINES = ("lasp2", "lasp1", "ring_linear")
STATE = B * H * D_K * D_V * 4      # one float32 state (B, H, d_k, d_v)


def _layer(engine, T):
    """This rank's shard of one layer's inputs and a forward+backward closure -> (step, fwd log, bwd log)."""
    import lasp
    from lasp.parallel import count_collectives, shard
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (shard(torch.randn(B, T, H, d, generator=g) * 0.5, "contiguous", dist.get_rank(), W)
                   for d in (D_K, D_K, D_V, D_V))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    fn = lasp.ENGINES[engine].fn                         # the engine's declaration (parallel/engines.py)
    log_decay = -torch.logspace(-4, -1, H)
    with count_collectives() as fwd:
        o = fn(q, k, v, log_decay=log_decay)
    with count_collectives() as bwd:
        torch.autograd.grad(o, (q, k, v), do)
    return (lambda: torch.autograd.grad(fn(q, k, v, log_decay=log_decay), (q, k, v), do)), fwd, bwd


def _slowest_rank_seconds(step):
    """Seconds of step() until the slowest rank has finished it (the job's step time), all starting together."""
    import time
    dist.barrier()
    start = time.perf_counter()
    step()
    dist.barrier()
    return time.perf_counter() - start


def _under_model(T):
    """LASP-2 and LASP-1 under a network model whose per-pass gather time, (W−1)·α, is half of the local
    kernel's fwd+bwd CPU time K on the same shard (measured in this run): with 4 ranks on 2 cores each pass
    computes for about K of wall time, so the gather fits with a 2x margin. -> (α, {engine: [(wall s, CPU s,
    gather wait s, gather model s)]}). CPU seconds are the process's (all threads): sleeps and waits do not count."""
    import time
    from lasp.kernels import lightning_attn
    from lasp.parallel import comm, count_collectives
    steps = {e: _layer(e, T)[0] for e in ("lasp2", "lasp1")}
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, T // W, H, d, generator=g) for d in (D_K, D_K, D_V, D_V))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    log_decay = -torch.logspace(-4, -1, H)

    def kernel():
        torch.autograd.grad(lightning_attn(q, k, v, log_decay=log_decay)[0], (q, k, v), do)
    kernel()
    cpu = []
    for _ in range(3):
        start = time.process_time()
        kernel()
        cpu.append(time.process_time() - start)
    alpha = comm.all_reduce(torch.tensor([statistics.median(cpu)])).item() / W / (2 * (W - 1))   # same α everywhere
    out = {e: [] for e in steps}
    with comm.simulated_network(comm.NetworkModel(latency_s=alpha)):
        for step in steps.values():
            step()                                                      # warm-up under the model
        for rep in range(REPS):
            for e in (("lasp2", "lasp1") if rep % 2 else ("lasp1", "lasp2")):
                cpu = time.process_time()
                with count_collectives() as log:
                    wall = _slowest_rank_seconds(steps[e])
                gathers = [r for r in log.records if r.op == "all_gather"]
                out[e].append((wall, time.process_time() - cpu, sum(r.wait_s for r in gathers),
                               sum(r.model_s for r in gathers)))
    return alpha, out


def _measure():
    """{T: {engine: (fwd summary, bwd summary, [seconds per repetition on this rank])}, "model": _under_model}"""
    import time
    out = {}
    for T in SIZES:
        steps = {e: _layer(e, T) for e in ENGINES}           # the first call is also the warm-up
        times = {e: [] for e in ENGINES}
        for rep in range(REPS):
            order = ENGINES[rep % 3:] + ENGINES[:rep % 3]    # interleaved and rotated: load spikes and the
            for e in order:                                  # aftermath of the heavy ring hit every engine alike
                step = steps[e][0]
                dist.barrier()
                start = time.perf_counter()
                step()
                dist.barrier()                               # the job's step ends when its slowest rank does
                times[e].append(time.perf_counter() - start)
        out[T] = {e: (fwd.summary(), bwd.summary(), times[e]) for e, (_, fwd, bwd) in steps.items()}
    out["model"] = _under_model(MODEL_SIZE)
    return out


@pytest.fixture(scope="module")
def measured():
    return run_ranks(W, _measure)


def _median_of_slowest(measured, T, engine):
    """Median over repetitions of the slowest rank's time (the step time of the job)."""
    per_rep = zip(*(rank[T][engine][2] for rank in measured))
    return statistics.median(max(ts) for ts in per_rep)


def test_lasp2_one_gather_each_way_payload_independent_of_length(measured):
    for rank in measured:
        for T in SIZES:
            fwd, bwd, _ = rank[T]["lasp2"]
            assert fwd == {"all_gather": (1, (W - 1) * (STATE + 2 * 4))}, (T, fwd)  # + the (T_local, n) header
            assert bwd == {"all_gather": (1, (W - 1) * STATE)}, (T, bwd)


def test_lasp1_one_state_hop_each_way(measured):
    for r, rank in enumerate(measured):
        first, last = r == 0, r == W - 1
        for T in SIZES:
            fwd, bwd, _ = rank[T]["lasp1"]
            assert fwd == {k: v for k, v in (("recv", (1, STATE)), ("send", (1, 0))) if
                           (k == "recv" and not first) or (k == "send" and not last)}, (r, T, fwd)
            assert bwd == {k: v for k, v in (("recv", (1, STATE)), ("send", (1, 0))) if
                           (k == "recv" and not last) or (k == "send" and not first)}, (r, T, bwd)


def test_ring_baseline_moves_kv_blocks_growing_with_length(measured):
    for rank in measured:
        for T in SIZES:
            fwd, bwd, _ = rank[T]["ring_linear"]
            block = B * (T // W) * H * (D_K + D_V) * 4
            assert fwd == {"send": (W - 1, 0), "recv": (W - 1, (W - 1) * block)}, (T, fwd)
            assert bwd == {"send": (2 * W - 1, 0), "recv": (2 * W - 1, (2 * W - 1) * block)}, (T, bwd)


def test_lasp2_not_slower_than_lasp1(measured):
    """Same compute, one gather instead of a serial ring. Here 4 ranks share 2 cores, so the gather's overlap
    cannot pay off: on an idle 2-core machine LASP-2 / LASP-1 measured 1.13-1.72 (median of repetitions, 26
    measurements), 1.15-2.10 on 2026-12-01 (12 measurements, old and new LASP-2 schedules alike), and 3.20 once in a
    full-suite run with other jobs on the cores (load 5). The bound sits above that spread, so it only catches gross
    regressions (a serialised LASP-2, a hang-like wait); a doubled intra-chunk compute measured 1.47-1.69 and would
    NOT be caught. The exact collective tests above and the serial-round count below are what pin LASP-2's
    behaviour; this ratio is a coarse guard."""
    for T in SIZES:
        ratio = _median_of_slowest(measured, T, "lasp2") / _median_of_slowest(measured, T, "lasp1")
        assert ratio <= 4.0, f"T={T}: LASP-2 / LASP-1 time = {ratio:.2f}"


def test_lasp2_beats_the_left_product_ring(measured):
    """O(C·chunk) per rank against O(T·C): at the largest size LASP-2 must be at least 3x faster."""
    T = SIZES[-1]
    ratio = _median_of_slowest(measured, T, "ring_linear") / _median_of_slowest(measured, T, "lasp2")
    assert ratio >= 3, f"T={T}: ring (left product) / LASP-2 time = {ratio:.2f}"


def test_lasp2_overlaps_its_gather_and_keeps_its_compute(measured):
    """Two checks that can fail, where the wall-time ratio above cannot:
    - overlap: under the network model (each pass's gather about half its compute), a (rank, repetition) whose
      gather waits were under half the modelled gather time proves that much compute ran between the gather's
      issue and its wait; a LASP-2 that waits right away has almost none (the model sleeps until issue + model
      time; only a scheduling stall between issue and wait counts as hidden). Required: a quarter of them (the
      real gloo wait under load is the noise: 15 of 28 at load average 40; broken on purpose, 0 of 28);
    - compute: CPU seconds (the process's, sleeps and blocking waits excluded, so the 2-core oversubscription
      and the model's sleeps do not enter) of LASP-2 over LASP-1's, the same kernels: measured 1.0-1.1; 1.76
      with LASP-2's intra-chunk compute run twice (on purpose, once), which the wall ratio above lets pass.
    Wall time under the model is not asserted: with 4 ranks on 2 cores LASP-1's serial chain staggers the ranks'
    compute, so it runs less contended than LASP-2's; a real cluster (a device per rank) would not."""
    alpha, _ = measured[0]["model"]
    hidden, cpu = [], {"lasp2": [], "lasp1": []}
    for rank in measured:
        runs = rank["model"][1]
        hidden += [1 - wait / model for _, _, wait, model in runs["lasp2"]]
        for e in cpu:
            cpu[e] += [c for _, c, _, _ in runs[e]]
    overlapped = sum(h >= 0.5 for h in hidden) / len(hidden)
    ratio = statistics.median(cpu["lasp2"]) / statistics.median(cpu["lasp1"])
    assert overlapped >= 0.25, (f"α = {alpha * 1e3:.2f} ms: LASP-2 hid half its gather in only {overlapped:.0%} "
                                f"of rank-repetitions; hidden shares {[round(h, 2) for h in hidden]}")
    assert ratio <= 1.5, f"LASP-2 / LASP-1 CPU seconds = {ratio:.2f} (same kernels: ≈ 1)"


def _rounds_logs(layout_engines):
    """Per-pass message logs [(op, peer)] of each engine on tiny inputs: this rank's program order."""
    import lasp
    from lasp.parallel import count_collectives, shard
    fns = {"lasp2": lasp.lasp2, "lasp1": lasp.lasp1, "allscan": lasp.allscan, "ring_linear": lasp.ring_linear_attention}
    out = {}
    for engine, layout in layout_engines:
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (shard(torch.randn(1, 16 * W, 2, 4, generator=g), layout, dist.get_rank(), W) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        kw = {} if engine in ("lasp1", "ring_linear") else dict(layout=layout)
        with count_collectives() as fwd:
            o = fns[engine](q, k, v, **kw)
        with count_collectives() as bwd:
            torch.autograd.grad(o, (q, k, v), do)
        out[engine, layout] = [_events(log) for log in (fwd, bwd)]
    return out


def _events(log):
    """This rank's communication events in program order: a send where it is issued, a receive where it is
    first waited for (its data usable), a collective where it is issued. -> [(op, peer)]"""
    events = [(r.waited if r.op == "recv" else r.issued, r.op, r.peer) for r in log.records]
    assert all(tick is not None for tick, _, _ in events), "a receive was never waited for"
    return [(op, peer) for _, op, peer in sorted(events)]


def serial_rounds(logs):
    """Longest chain of dependent communication rounds across ranks, given each rank's ordered [(op, peer)].

    A send leaves one round after everything this rank had received before it (see `_events`); a collective
    is one round after the latest of its ranks and, being async in these engines (waited after the local
    compute), gates no later message. Blocks of one message stream travel in the same round, so K pipelined
    blocks count once."""
    W = len(logs)
    pos, clock, rounds = [0] * W, [0] * W, 0
    sent = {}                                    # (src, dst) -> rounds of the messages in order
    taken = {}
    while any(pos[r] < len(logs[r]) for r in range(W)):
        progressed = False
        for r in range(W):
            while pos[r] < len(logs[r]):
                op, peer = logs[r][pos[r]]
                if op == "send":
                    sent.setdefault((r, peer), []).append(clock[r] + 1)
                elif op == "recv":
                    queue, i = sent.get((peer, r), []), taken.get((peer, r), 0)
                    if i >= len(queue):
                        break                    # the matching send is not issued yet: run other ranks
                    taken[peer, r] = i + 1
                    clock[r] = max(clock[r], queue[i])
                else:
                    if any(pos[s] >= len(logs[s]) or logs[s][pos[s]][0] != op for s in range(W)):
                        break                    # a collective waits for every rank to reach it
                    rounds = max(rounds, max(clock) + 1)
                    for s in range(W):
                        pos[s] += s != r
                pos[r] += 1
                progressed = True
        assert progressed, f"unmatched messages: positions {pos}"
    return max(rounds, *clock)


def test_serial_communication_rounds_on_the_critical_path():
    """Deterministic: LASP-2 is one collective per pass, LASP-1 and All-Scan W−1 dependent hops (All-Scan's K
    blocks pipeline within a hop; zigzag: 2(W−1), through the first segments and back), the left-product ring
    W−1 steps forward and W backward (the dK|dV accumulators come home after W hops)."""
    cases = [("lasp2", "contiguous"), ("lasp2", "zigzag"), ("lasp1", "contiguous"), ("allscan", "contiguous"),
             ("allscan", "zigzag"), ("ring_linear", "contiguous")]
    per_rank = run_ranks(W, _rounds_logs, cases)
    want = {"lasp2": (1, 1), "lasp1": (W - 1, W - 1), "ring_linear": (W - 1, W)}
    for engine, layout in cases:
        hops = (W - 1) * (2 if layout == "zigzag" else 1)
        expected = want.get(engine, (hops, hops))
        got = tuple(serial_rounds([rank[engine, layout][p] for rank in per_rank]) for p in (0, 1))
        assert got == expected, (engine, layout, got, expected)
