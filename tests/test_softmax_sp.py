"""Softmax attention under sequence parallelism: all-gather KV, ring and Ulysses against the float64 oracle.

Every rank builds the global inputs from one seed, runs the engine on its shard, and compares the output and
dq, dk, dv with the shard of `softmax_attention_dense` (1e-10 relative in float64, 2e-5 in float32), and counts
its collectives. All configurations of one (engine, W) run inside ONE run_ranks call to keep the file fast.
Backends: the tiled CPU kernel (the default) in float64 and float32, the dense `torch` twin in float64 (GQA
cases). Packed
documents of 4 and 1 tokens cross rank boundaries; longer local lengths (37, 300: no multiple of a kernel
tile) with random documents run at W = 4; a dispatch mode shows no C × T tensor in any engine's fast path.
"""
import itertools
import re

import pytest
import torch

from lasp import parallel
from lasp.kernels.softmax_attn import merge_partial
from lasp.parallel import comm
from tests.dist import rel_err, run_ranks
from tests.oracles import softmax_attention_dense
from tests.test_softmax_kernel import _documents, _LargestTensor

B, C, D_K, D_V = 2, 6, 8, 6          # C tokens per rank: zigzag halves of 3; d_k ≠ d_v on purpose
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
RUNS = ((None, torch.float64), (None, torch.float32), ("torch", torch.float64))   # (backend, dtype)
ENGINES = {"allgather": parallel.allgather_attention, "ring": parallel.ring_attention,
           "ulysses": parallel.ulysses_attention}
WORLDS = (1, 2, 3, 4, 8)


def _heads(engine, W):
    """(H, KV head counts): MHA and GQA; Ulysses needs W | H and replicates KV heads when W ∤ H_kv (H_kv = 2)."""
    if engine != "ulysses":
        return 4, (4, 2)
    H = 2 * max(W, 2)
    return H, sorted({H, H // 2, 2}, reverse=True)


def _cases(engine, W):
    H, kv_heads = _heads(engine, W)
    return [(layout, causal, H, h_kv, segmented) for layout, causal, h_kv, segmented
            in itertools.product(parallel.layout.LAYOUTS, (True, False), kv_heads, (False, True))]


def _global_inputs(W, H, H_kv, seed):
    """q (B,T,H,D_K), k (B,T,H_kv,D_K), v (B,T,H_kv,D_V), do (B,T,H,D_V), segment ids (B,T); float64, T = C·W."""
    g = torch.Generator().manual_seed(seed)
    T = C * W
    shapes = ((B, T, H, D_K), (B, T, H_kv, D_K), (B, T, H_kv, D_V), (B, T, H, D_V))
    q, k, v, do = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    starts = (torch.arange(T)[None, :] + 3 * torch.arange(B)[:, None]) % 5 < 2   # documents of 1 and 4 tokens
    return q, k, v, do, starts.long().cumsum(1)


def _oracle_shards(q, k, v, do, causal, scale, segment_ids, layout, rank, W):
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out = softmax_attention_dense(*full, causal=causal, scale=scale, segment_ids=segment_ids)
    grads = torch.autograd.grad(out, full, do)
    return [parallel.shard(x, layout, rank, W) for x in (out, *grads)]


def _run_case(engine, case, seed):
    """One configuration on this rank -> [(dtype, {name: rel err}, fwd summary, bwd summary)]."""
    W, rank = comm.group_size(), comm.group_rank()
    layout, causal, H, H_kv, segmented = case
    q, k, v, do, segment_ids = _global_inputs(W, H, H_kv, seed)
    segment_ids = segment_ids if segmented else None
    scale = None if causal else 0.3
    expected = _oracle_shards(q, k, v, do, causal, scale, segment_ids, layout, rank, W)
    local_seg = None if segment_ids is None else parallel.shard(segment_ids, layout, rank, W)
    rows = []
    for backend, dtype in RUNS if H_kv < H else RUNS[:2]:             # the twin on the grouped-head cases
        local = [parallel.shard(x, layout, rank, W).to(dtype).requires_grad_() for x in (q, k, v)]
        with parallel.count_collectives() as fwd:
            out = ENGINES[engine](*local, causal=causal, layout=layout, scale=scale, segment_ids=local_seg,
                                  backend=backend)
        with parallel.count_collectives() as bwd:
            out.backward(parallel.shard(do, layout, rank, W).to(dtype))
        got = (out, *(x.grad for x in local))
        errs = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, expected)}
        rows.append((f"{backend or 'tiled'} {dtype}", errs, fwd.summary(), bwd.summary()))
    return rows


def _check_engine(engine):
    """Every configuration on this rank -> [(case, dtype, errors, fwd summary, bwd summary)]."""
    W = comm.group_size()
    return [(case, *row) for i, case in enumerate(_cases(engine, W)) for row in _run_case(engine, case, seed=i)]


def _expected_calls(engine, W, segmented):
    """(forward, backward) {op: calls}. Ring: K|V (+ ids) W−1 hops forward and backward, dK|dV W hops home."""
    tensors = 1 + segmented
    if engine == "allgather":
        return {"all_gather": tensors}, {"reduce_scatter": 1}
    if engine == "ulysses":
        return {"all_to_all": 2, **({"all_gather": 1} if segmented else {})}, {"all_to_all": 2}
    fwd = (W - 1) * tensors
    bwd = fwd + (W if W > 1 else 0)
    return ({op: fwd for op in ("send", "recv")} if fwd else {}), ({op: bwd for op in ("send", "recv")} if bwd else {})


def _kv_bytes(W, case, dtype):
    """Forward bytes received for K|V: GQA-sized (H_kv heads, never repeated to H) on the all-gather and ring."""
    _, _, _, H_kv, _ = case
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return (W - 1) * B * C * H_kv * (D_K + D_V) * itemsize


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_matches_float64_oracle(engine, world):
    per_rank = [_check_engine(engine)] if world == 1 else run_ranks(world, _check_engine, engine)
    failures = []
    for rank, rows in enumerate(per_rank):
        for case, dtype, errs, fwd, bwd in rows:
            where = f"{engine} W={world} rank={rank} case={case} {dtype}"
            tol = TOL[torch.float32 if "float32" in dtype else torch.float64]
            bad = {name: err for name, err in errs.items() if not err < tol}
            if bad:
                failures.append(f"{where}: errors {bad} above {tol}")
            calls = ({op: n for op, (n, _) in fwd.items()}, {op: n for op, (n, _) in bwd.items()})
            if calls != _expected_calls(engine, world, case[-1]):
                failures.append(f"{where}: collectives {calls}, expected {_expected_calls(engine, world, case[-1])}")
            op = {"allgather": "all_gather", "ring": "recv"}.get(engine)
            kv_bytes = _kv_bytes(world, case, torch.float32 if "float32" in dtype else torch.float64)
            if op and not case[-1] and fwd.get(op, (0, 0))[1] != kv_bytes:
                failures.append(f"{where}: forward K/V (calls, bytes) {fwd.get(op)}, expected {kv_bytes} bytes")
    assert not failures, "\n".join(failures[:20])
    runs = sum(len(RUNS) if h_kv < H else 2 for _, _, H, h_kv, _ in _cases(engine, world))
    assert len(per_rank) == world and all(len(rows) == runs for rows in per_rank)


def test_merge_of_empty_partials_gives_zeros_not_nan():
    g = torch.Generator().manual_seed(0)
    empty_out, empty_lse = torch.zeros(2, 4, 4, D_V), torch.full((2, 4, 4), float("-inf"))
    merged, merged_lse = merge_partial(empty_out, empty_lse, empty_out, empty_lse)
    assert (merged == 0).all() and torch.isneginf(merged_lse).all()
    out_b, lse_b = torch.randn(2, 4, 4, D_V, generator=g), torch.randn(2, 4, 4, generator=g)
    merged, merged_lse = merge_partial(empty_out, empty_lse, out_b, lse_b)
    assert torch.equal(merged, out_b) and torch.equal(merged_lse, lse_b)


def _check_long_shards():
    """Local lengths 37 (contiguous) and 300 (zigzag), random documents (one of one token, some spanning ranks),
    GQA, causal, every engine on one oracle per case: -> [(engine, case, dtype, errors)] on this rank."""
    W, rank = comm.group_size(), comm.group_rank()
    rows = []
    for i, (layout, C) in enumerate((("contiguous", 37), ("zigzag", 300))):
        g = torch.Generator().manual_seed(i)
        T, H, H_kv = C * W, 4, 2
        q, k, v, do = (torch.randn(s, generator=g, dtype=torch.float64)
                       for s in ((1, T, H, D_K), (1, T, H_kv, D_K), (1, T, H_kv, D_V), (1, T, H, D_V)))
        seg = _documents(1, T, seed=i)
        expected = _oracle_shards(q, k, v, do, True, None, seg, layout, rank, W)
        local_seg = parallel.shard(seg, layout, rank, W)
        for engine, dtype in itertools.product(sorted(ENGINES), TOL):
            local = [parallel.shard(x, layout, rank, W).to(dtype).requires_grad_() for x in (q, k, v)]
            out = ENGINES[engine](*local, layout=layout, segment_ids=local_seg)
            out.backward(parallel.shard(do, layout, rank, W).to(dtype))
            errs = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), (out, *(x.grad for x in local)),
                                                       expected)}
            rows.append((engine, (layout, C), dtype, errs))
    return rows


def test_long_shards_with_documents():
    """Every engine at W = 4 in one run_ranks call (37 and 300 tokens per rank, random documents)."""
    per_rank = run_ranks(4, _check_long_shards)
    failures = [f"{engine} rank {r} {case} {dtype}: {errs}" for r, rows in enumerate(per_rank)
                for engine, case, dtype, errs in rows if not max(errs.values()) < TOL[dtype]]
    assert not failures, "\n".join(failures)
    assert all(len(rows) == 2 * len(ENGINES) * len(TOL) for rows in per_rank)


def _largest_engine_tensors(C):
    """{engine: largest tensor any aten op returned in forward + backward} at C tokens per rank, causal, docs."""
    W, rank = comm.group_size(), comm.group_rank()
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, C, 2, 16, generator=g) for _ in range(4))
    seg = (rank * C + torch.arange(C))[None] // 1000
    largest = {}
    for name, engine in sorted(ENGINES.items()):
        for backend, n in ((None, C), ("torch", C // 4)):          # the twin on a quarter: it is O(T²)
            with _LargestTensor() as probe:
                engine(*(x[:, :n].detach().requires_grad_() for x in (q, k, v)), layout="zigzag",
                       segment_ids=seg[:, :n], backend=backend).backward(do[:, :n])
            largest[name, backend] = probe.largest
    return largest


def test_no_tensor_of_c_by_t_elements_in_the_engines():
    """W = 2, C = 1,024, T = 2,048 (zigzag, documents): no aten result of C·T/8 elements with the tiled kernel
    (the gathered K|V is C·T/16); the twin's scores (at C/4 tokens per rank) are seen by the same probe. (The
    kernel's own test runs 2,048 × 8,192.)"""
    C, T = 1024, 2048
    for largest in run_ranks(2, _largest_engine_tensors, C):
        for (name, backend), n in largest.items():
            if backend is None:
                assert n < C * T // 8, f"{name}: a tensor of {n} elements"
            else:
                assert n >= (C // 4) ** 2 // 2, f"{name} twin: the probe missed its scores ({n})"


def _bad_inputs(W):
    """(engine names, q, k, v, layout, segment_ids, sizes the message must name), each invalid."""
    def qkv(T=C, H=4, H_kv=2, H_v=None, D_q=D_K, D_k=D_K, B_k=B):
        return (torch.randn(B, T, H, D_q), torch.randn(B_k, C, H_kv, D_k), torch.randn(B_k, C, H_v or H_kv, D_V))
    seg = torch.zeros(B, C, dtype=torch.long)
    cases = [
        (ENGINES, (torch.randn(B, 5, 4, D_K), torch.randn(B, 5, 2, D_K), torch.randn(B, 5, 2, D_V), "zigzag", None),
         ["(5)"]),
        (ENGINES, (*qkv(T=C + 1), "contiguous", None), ["(2, 7)", "(2, 6)"]),
        (ENGINES, (*qkv(B_k=B + 1), "contiguous", None), ["(2, 6)", "(3, 6)"]),
        (ENGINES, (*qkv(H_kv=3), "contiguous", None), ["(4)", "3"]),
        (ENGINES, (*qkv(H_v=4), "contiguous", None), ["k 2", "v 4"]),
        (ENGINES, (*qkv(D_k=4, D_q=8), "contiguous", None), ["8 vs 4"]),
        (ENGINES, (torch.randn(B, C, D_K), *qkv()[1:], "contiguous", None), [f"({B}, {C}, {D_K})"]),
        (ENGINES, (*qkv(), "contiguous", torch.zeros(B, C + 1, dtype=torch.long)), ["(2, 6)", "(2, 7)"]),
        (ENGINES, (*qkv(), "contiguous", seg.float()), ["integer", "float32"]),
        (ENGINES, (*qkv(), "striped", None), ["'striped'"]),
        (ENGINES, (*qkv(), "contiguous", None, "flash"), ["'flash'", "cpu"]),
        (ENGINES, (*qkv(), "contiguous", None, "flash_cuda"), ["flash_cuda", "cpu"]),
    ]
    if W > 1:  # Ulysses: W must divide the query heads (and the KV heads after replication)
        cases.append((["ulysses"], (*qkv(H=3, H_kv=3), "contiguous", None), [f"{W} sequence", "(3)"]))
    return cases


def _check_bad_inputs():
    """Each bad input raises ValueError naming the sizes with no collective issued; then a good call still works."""
    W = comm.group_size()
    checked = 0
    for engines, (q, k, v, layout, segment_ids, *backend), sizes in _bad_inputs(W):
        for name in engines:
            with parallel.count_collectives() as log:
                with pytest.raises(ValueError, match=".*".join(re.escape(s) for s in sizes)) as raised:
                    ENGINES[name](q, k, v, layout=layout, segment_ids=segment_ids, backend=(backend or [None])[0])
            assert log.count() == 0, f"{name} issued {log.ops()} before raising {raised.value}"
            checked += 1
    q, k, v = torch.randn(B, C, 4, D_K), torch.randn(B, C, 2, D_K), torch.randn(B, C, 2, D_V)
    for engine in ENGINES.values():                                  # the group is still usable: no rank hangs
        assert torch.isfinite(engine(q, k, v, layout="zigzag")).all()
    return checked


def test_bad_inputs_raise_before_any_collective_one_process():
    assert _check_bad_inputs() == 3 * 12


def test_bad_inputs_raise_before_any_collective_two_ranks():
    assert run_ranks(2, _check_bad_inputs, timeout=60) == [3 * 12 + 1] * 2
