"""Packed documents (segment_ids) in linear attention: kernels, engines and models against each document ALONE.

Shapes: q (B, T, H, d_k), k, v (B, T, H_kv, ·), log_gate (B, T, H_kv), log_decay (H_kv,), segment_ids (B, T)
non-decreasing. The oracle (tests/oracles.py documents_alone) runs every document on its own from a zero state,
in float64 by the dense definition. Boundaries are placed on chunk and rank edges on purpose, with one-token
documents at the start, the middle and the end of a row.
"""
import pytest
import torch

from lasp.kernels import lightning_attn, linear_attn_chunked, linear_attn_recurrent
from lasp.kernels.linear_attn import deferred_grads, deferred_outputs, deferred_state_grads, deferred_states
from tests.dist import assert_close as _assert_all_close
from tests.dist import rel_err
from tests.test_kernels import _arriving  # LASP-2's finisher stand-in
from tests.oracles import documents_alone

F64_TOL, FP32_TOL = 1e-10, 2e-5


def document_ids(B, T, starts_per_row):
    """(B, T) int64 ids from each row's document starts (token indices, 0 implied); ids have gaps (not 0..n)."""
    ids = torch.zeros(B, T, dtype=torch.int64)
    for b, starts in enumerate(starts_per_row):
        for s in starts:
            ids[b, s:] += 3
    return ids + 5


def make_inputs(B, T, H, H_kv, d_k, d_v, mode, dtype=torch.float64, seed=0):
    """q, k, v, log_decay (H_kv,) or None, log_gate (B, T, H_kv) or None, do; mode: none | decay | gate."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d_k, generator=g, dtype=torch.float64) / d_k ** 0.25
    k = torch.randn(B, T, H_kv, d_k, generator=g, dtype=torch.float64) / d_k ** 0.25
    v = torch.randn(B, T, H_kv, d_v, generator=g, dtype=torch.float64)
    do = torch.randn(B, T, H, d_v, generator=g, dtype=torch.float64)
    log_decay = -torch.linspace(0.01, 0.5, H_kv, dtype=torch.float64) if mode in ("decay", "gate") else None
    log_gate = -torch.rand(B, T, H_kv, generator=g, dtype=torch.float64) * 0.4 if mode == "gate" else None
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(q), cast(k), cast(v), log_decay, cast(log_gate), cast(do)


def oracle_grads(q, k, v, log_decay, log_gate, ids, do):
    """(o, dq, dk, dv, d log_gate or None) of the documents-alone oracle in float64."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    gate = None if log_gate is None else log_gate.detach().double().requires_grad_()
    o = documents_alone(*leaves, ids, gate, log_decay)
    grads = torch.autograd.grad(o, leaves + ([gate] if gate is not None else []), do.double())
    return (o.detach(), *grads) + ((None,) if gate is None else ())


def assert_close(got, want, tol, names=("o", "dq", "dk", "dv", "dlog_gate")):
    _assert_all_close(got, want, tol, names)


# row 0: a boundary on a chunk edge (8), a one-token document (8), a one-token document at the end;
# row 1: a one-token document first, a long one across chunks
STARTS_63 = [[8, 9, 30, 62], [1, 40]]


def _kernel_run(q, k, v, log_decay, log_gate, ids, do, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    gate = None if log_gate is None else log_gate.detach().clone().requires_grad_()
    o = linear_attn_chunked(*leaves, log_decay, log_gate=gate, segment_ids=ids, **kw)[0]
    grads = torch.autograd.grad(o, leaves + ([gate] if gate is not None else []), do)
    return (o.detach(), *grads) + ((None,) if gate is None else ())


@pytest.mark.parametrize("mode", ["none", "decay", "gate"])
def test_torch_kernel_matches_documents_alone(mode):
    """Chunks of 8 in blocks of 2 (the scan across chunks and blocks both cross boundaries): o and every gradient,
    gate gradients included, equal each document run alone (float64, 1e-10)."""
    q, k, v, log_decay, log_gate, do = make_inputs(2, 63, 2, 2, 5, 4, mode)
    ids = document_ids(2, 63, STARTS_63)
    got = _kernel_run(q, k, v, log_decay, log_gate, ids, do, chunk_len=8, block_chunks=2)
    assert_close(got, oracle_grads(q, k, v, log_decay, log_gate, ids, do), F64_TOL)


def test_torch_kernel_fp32_and_strong_gates():
    """fp32 within 2e-5, with gates strong enough that a cumsum of log 0 = −inf would give NaN."""
    q, k, v, log_decay, log_gate, do = make_inputs(2, 63, 2, 2, 5, 4, "gate", torch.float32)
    log_gate = log_gate * 40
    ids = document_ids(2, 63, STARTS_63)
    got = _kernel_run(q, k, v, log_decay, log_gate, ids, do, chunk_len=8, block_chunks=2)
    assert_close(got, oracle_grads(q, k, v, log_decay, log_gate, ids, do), FP32_TOL)


def test_initial_state_survives_until_the_first_reset_and_final_state_grads():
    """With an initial state and a final-state gradient: o, final and all gradients equal the token-by-token
    recurrence that empties the state at each document start (autograd, float64)."""
    q, k, v, log_decay, log_gate, do = make_inputs(2, 37, 2, 2, 4, 3, "gate")
    ids = document_ids(2, 37, [[8, 36], [20]])
    g = torch.Generator().manual_seed(1)
    state, dfinal = (torch.randn(2, 2, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    runs = []
    for fn in (lambda *a, **kw: linear_attn_chunked(*a, chunk_len=8, block_chunks=2, **kw),
               linear_attn_recurrent):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, log_gate, state)]
        o, final = fn(*leaves[:3], log_decay, leaves[4], log_gate=leaves[3], segment_ids=ids)
        runs.append((o, final, *torch.autograd.grad([o, final], leaves, [do, dfinal])))
    assert_close(runs[0], runs[1], F64_TOL, ("o", "final", "dq", "dk", "dv", "dlog_gate", "dstate"))


@pytest.mark.parametrize("mode", ["none", "gate"])
def test_deferred_kernel_with_documents(mode):
    """LASP-2's split kernel with documents, P and G arriving at once or late -> bitwise equal runs, equal to the
    chunked kernel entering from P and leaving with G (float64, 1e-10), M and dM as the state pass gives them."""
    q, k, v, log_decay, log_gate, do = make_inputs(2, 63, 2, 2, 5, 4, mode)
    ids = document_ids(2, 63, [[16, 17, 50], [62]])
    g = torch.Generator().manual_seed(2)
    P, G = (torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, P)] + ([] if log_gate is None else
                                                                   [log_gate.clone().requires_grad_()])
    gate = leaves[4] if log_gate is not None else None
    o, final = linear_attn_chunked(*leaves[:3], log_decay, leaves[3], 8, log_gate=gate, block_chunks=2,
                                   segment_ids=ids)
    grads = torch.autograd.grad([o, final], leaves, [do, G])
    want = (o, *grads[:3]) + ((grads[4],) if gate is not None else ())
    M = linear_attn_chunked(q, k, v, log_decay, None, 8, log_gate=log_gate, segment_ids=ids)[1]
    runs = []
    for polls in (0, 2, None):
        final0, entries = deferred_states(k, v, log_decay, log_gate, 8, 2, segment_ids=ids)
        o2, checkpoints = deferred_outputs(q, k, v, log_decay, log_gate, entries, _arriving(P, polls), 8, 2,
                                           segment_ids=ids)
        dstate, dP = deferred_state_grads(q, do, log_decay, log_gate, 8, 2, segment_ids=ids)
        dg = deferred_grads(q, k, v, do, log_decay, log_gate, checkpoints, dP, _arriving(G, polls), 8, 2,
                            segment_ids=ids)
        runs.append((o2, *dg[:3]) + ((dg[3],) if gate is not None else ()))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run)), "late arrival changes the result"
    assert_close(runs[0], want, F64_TOL)
    assert_close((final0, dstate), (M, grads[3]), F64_TOL, ("M", "dM"))


def test_lightning_attn_documents_and_none_unchanged():
    """The public op takes segment_ids; one document everywhere equals segment_ids=None bitwise."""
    q, k, v, log_decay, log_gate, _ = make_inputs(1, 40, 2, 2, 4, 4, "gate")
    ids = document_ids(1, 40, [[]])
    a = lightning_attn(q, k, v, log_decay=log_decay, log_gate=log_gate, backend="torch")[0]
    b = lightning_attn(q, k, v, log_decay=log_decay, log_gate=log_gate, segment_ids=ids, backend="torch")[0]
    assert rel_err(a, b) < 1e-14
    ids = document_ids(1, 40, [[13]])
    c = lightning_attn(q, k, v, log_decay=log_decay, log_gate=log_gate, segment_ids=ids, backend="torch")[0]
    assert rel_err(c, documents_alone(q, k, v, ids, log_gate, log_decay)) < F64_TOL


@pytest.mark.parametrize("make, match", [
    (lambda ids: ids[:, :-1], r"segment_ids must be \(B, T\) = \(2, 20\), got \(2, 19\)"),
    (lambda ids: ids.double(), r"segment_ids \(2, 20\) must be an integer tensor"),
    (lambda ids: ids.flip(1), r"segment_ids \(2, 20\) must be non-decreasing"),
])
def test_bad_segment_ids_raise(make, match):
    q, k, v, *_ = make_inputs(2, 20, 2, 2, 4, 4, "none")
    ids = document_ids(2, 20, [[5], [7]])
    with pytest.raises(ValueError, match=match):
        lightning_attn(q, k, v, segment_ids=make(ids), backend="torch")


# ---------------------------------------------------------------------------------------------------------------
# engines on gloo ranks: LASP-2 (both overlap paths), LASP-1, All-Scan against each document alone

def engine_starts(T, W):
    """Document starts for global length T on W ranks (sub-chunks of c = T/(2W)): row 0 has a boundary on a
    sub-chunk edge (c), a one-token document (c), a boundary on a rank edge (2c, contiguous), one inside, and a
    one-token last document; row 1 a one-token first document and one from 3 to T/2 + 1 (three ranks at W ≥ 4)."""
    c = T // (2 * W)
    rows = [[c, c + 1, 2 * c, 2 * c + 3, T - 1], [1, 3, T // 2 + 1]]
    return [sorted({s for s in row if 0 < s < T}) for row in rows]


def _engine_call(engine, local, kwargs, layout):
    from lasp import allscan, lasp1, lasp2
    if engine == "lasp1":
        return lasp1(*local, **kwargs)
    if engine == "allscan":
        return allscan(*local, layout=layout, **kwargs)
    if engine == "lasp2-triton":            # the overlap path of other backends: zero-state kernel + cross terms
        return lasp2(*local, layout=layout, backend="triton", **kwargs)
    return lasp2(*local, layout=layout, overlap=engine == "lasp2", **kwargs)     # "lasp2-fused": overlap=False


def _engine_case(engine, layout, mode, q_heads, dtype, W, T):
    """One engine call on this rank's shard with documents -> (errors vs the oracle shard, collective counts with
    documents, without documents) per pass."""
    from lasp.parallel import count_collectives, shard
    r = torch.distributed.get_rank()
    q, k, v, log_decay, log_gate, do = make_inputs(2, T, q_heads, 2, 4, 3, mode, seed=W)
    ids = document_ids(2, T, engine_starts(T, W))
    want = oracle_grads(q, k, v, log_decay, log_gate, ids, do)
    counts = []
    for segment_ids in (ids, None):
        local = [shard(x, layout, r, W).to(dtype).requires_grad_() for x in (q, k, v)]
        kwargs = dict(log_decay=log_decay, segment_ids=None if segment_ids is None else shard(segment_ids, layout, r, W))
        if log_gate is not None:
            kwargs["log_gate"] = shard(log_gate, layout, r, W).to(dtype).requires_grad_()
        with count_collectives() as fwd:
            o = _engine_call(engine, local, kwargs, layout)
        leaves = local + ([kwargs["log_gate"]] if log_gate is not None else [])
        with count_collectives() as bwd:
            grads = torch.autograd.grad(o, leaves, shard(do, layout, r, W).to(dtype))
        counts.append(({op: n for op, (n, _) in fwd.summary().items()},
                       {op: n for op, (n, _) in bwd.summary().items()}))
        if segment_ids is not None:
            got = (o, *grads) + ((None,) if log_gate is None else ())
            errors = [None if b is None else rel_err(a, shard(b, layout, r, W)) for a, b in zip(got, want)]
    return errors, counts[0], counts[1]


ENGINE_CASES = [  # engine, layout, mode, query heads (2 K/V heads), dtype
    ("lasp2", "contiguous", "none", 2, torch.float64), ("lasp2", "zigzag", "gate", 4, torch.float64),
    ("lasp2-fused", "zigzag", "decay", 2, torch.float64), ("lasp2-fused", "contiguous", "gate", 2, torch.float64),
    ("lasp1", "contiguous", "gate", 4, torch.float64), ("lasp1", "contiguous", "decay", 2, torch.float64),
    ("allscan", "contiguous", "decay", 4, torch.float64), ("allscan", "zigzag", "gate", 2, torch.float64),
    ("allscan", "zigzag", "none", 2, torch.float64),
]


def _engine_cases(W, cases, T):
    return [(case, *_engine_case(*case, W, T)[0:3]) for case in cases]


def _check_engine_results(results, W, tol=F64_TOL):
    for rank, rows in enumerate(results):
        for (engine, layout, mode, heads, dtype), errors, with_docs, without in rows:
            bad = [e for e in errors if e is not None and not e < tol]
            assert not bad, f"{engine} {layout} {mode} H={heads} W={W} rank {rank}: o,dq,dk,dv,dg errors {errors}"
            assert with_docs == without, f"{engine} {layout} W={W}: collectives {with_docs} != {without}"


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_engines_match_documents_alone(W):
    """Every linear engine, both layouts, no decay / constant decay / gates, GQA: o and every gradient equal each
    document run alone (float64, 1e-10), boundaries on sub-chunk and rank edges, one-token documents, a document
    over three ranks; the collectives (count per op, each pass) are those of the same call without documents."""
    from tests.dist import run_ranks
    _check_engine_results(run_ranks(W, _engine_cases, W, ENGINE_CASES, 16 * W), W)


def test_engines_w8_and_fp32():
    """W = 8 (few cases: slow) and one fp32 case per engine (2e-5), LASP-2 on the Triton kernels (interpreter) too."""
    from tests.dist import run_ranks
    cases = [("lasp2", "zigzag", "gate", 4, torch.float64), ("allscan", "contiguous", "gate", 2, torch.float64),
             ("lasp1", "contiguous", "decay", 2, torch.float64)]
    _check_engine_results(run_ranks(8, _engine_cases, 8, cases, 128), 8)
    fp32 = [("lasp2", "zigzag", "gate", 2, torch.float32), ("lasp2-fused", "contiguous", "gate", 2, torch.float32),
            ("lasp2-triton", "zigzag", "gate", 4, torch.float32),
            ("lasp1", "contiguous", "gate", 2, torch.float32), ("allscan", "zigzag", "gate", 2, torch.float32)]
    _check_engine_results(run_ranks(3, _engine_cases, 3, fp32, 48), 3, FP32_TOL)


def _bad_ids_case(engine, layout, W):
    """Rank 1's shard holds ids below rank 0's: every rank must raise (no hang) - LASP-2 and All-Scan: all ranks
    (the ids travel in an all-gather); LASP-1: rank 1 and the later ones (the ring message carries the flag)."""
    from lasp.parallel import shard
    r = torch.distributed.get_rank()
    q, k, v, *_ = make_inputs(1, 8 * W, 2, 2, 4, 3, "none")
    ids = torch.arange(8 * W)[None] // 5
    local = shard(ids, layout, r, W)
    if r == 1:
        local = local - 100
    try:
        _engine_call(engine, [shard(x, layout, r, W) for x in (q, k, v)], {"segment_ids": local}, layout)
    except ValueError as error:
        return str(error)
    return None


@pytest.mark.parametrize("engine, layout", [("lasp2", "zigzag"), ("allscan", "contiguous"), ("lasp1", "contiguous")])
def test_ranks_that_disagree_raise_without_hanging(engine, layout):
    from tests.dist import run_ranks
    messages = run_ranks(3, _bad_ids_case, engine, layout, 3, timeout=60)
    raised = [m is not None and "segment_ids decrease" in m for m in messages]
    assert raised == ([False, True, True] if engine == "lasp1" else [True] * 3), messages


def _local_bad_input(W):
    from lasp import allscan, lasp1, lasp2
    from lasp import ring_linear_attention
    q, k, v, *_ = make_inputs(2, 8, 2, 2, 4, 3, "none")
    ids = document_ids(2, 8, [[3], [5]])
    errors = []
    for fn, kw, bad in [(lasp2, {}, ids[:, :5]), (lasp2, {"layout": "zigzag"}, ids.flip(1)),
                        (allscan, {}, ids.float()), (lasp1, {}, ids[:1]), (lasp2, {"causal": False}, ids),
                        (ring_linear_attention, {}, ids)]:
        try:
            fn(q, k, v, segment_ids=bad, **kw)
            errors.append(None)
        except ValueError as error:
            errors.append(str(error))
    return errors


def test_bad_segment_ids_raise_before_any_collective():
    """Wrong shape, dtype, order, non-causal, ring_linear: ValueError naming the shape on each rank, before any
    collective (the other ranks never wait: every rank raises locally)."""
    from tests.dist import run_ranks
    for errors in run_ranks(2, _local_bad_input, 2, timeout=60):
        assert all(e is not None for e in errors), errors
        assert "(2, 5)" in errors[0] and "non-decreasing" in errors[1] and "integer" in errors[2], errors
        assert "(1, 8)" in errors[3] and "causal=True" in errors[4] and "lasp2, lasp1 or allscan" in errors[5], errors


# ---------------------------------------------------------------------------------------------------------------
# models: a packed sequence = each document run alone

@pytest.mark.parametrize("preset", ["linear-llama3-tiny", "linear-llama3-tiny-gated-hybrid", "tnl-tiny",
                                    "bam-moe-tiny"])
def test_model_hidden_states_on_packed_documents(preset):
    """Hidden states of a packed sequence (documents of 1, 9, 20 and 10 tokens) equal each document run through
    the model alone at the same positions (float64, 1e-10): every linear and softmax layer keeps them apart."""
    from lasp.models import build_model
    torch.manual_seed(0)
    model = build_model(preset).double()
    T = 40
    tokens = torch.randint(1, 256, (1, T))
    positions = torch.arange(T)
    starts = [0, 1, 10, 30, T]
    ids = document_ids(1, T, [starts[1:-1]])
    with torch.no_grad():
        packed = model(tokens, positions, ids)
        alone = torch.cat([model(tokens[:, s:e], positions[s:e]) for s, e in zip(starts[:-1], starts[1:])], dim=1)
        leaky = model(tokens, positions)
    assert rel_err(packed, alone) < F64_TOL
    assert rel_err(leaky, alone) > 1e-3           # without documents the state leaks: the check can fail


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes

@pytest.mark.parametrize("mode", ["decay", "gate"])
def test_triton_kernel_with_documents(mode):
    """backend="triton" (fp32, blocks of 16) with documents, an initial state and a final-state gradient: o, final
    and every gradient (gates included) equal the float64 recurrence that resets at each document (2e-5);
    boundaries on a block edge (16), one-token documents (16, 36)."""
    q, k, v, log_decay, log_gate, do = make_inputs(2, 37, 2, 2, 8, 8, mode, torch.float32)
    ids = document_ids(2, 37, [[16, 17, 36], [5]])
    g = torch.Generator().manual_seed(3)
    state, dfinal = (torch.randn(2, 2, 8, 8, generator=g) for _ in range(2))
    runs = []
    for backend, cast in (("triton", torch.float32), ("ref", torch.float64)):
        leaves = [None if x is None else x.to(cast).clone().requires_grad_() for x in (q, k, v, log_gate, state)]
        if backend == "triton":
            o, final = lightning_attn(*leaves[:3], log_decay=log_decay, log_gate=leaves[3], initial_state=leaves[4],
                                      output_final_state=True, backend="triton", segment_ids=ids)
        else:
            o, final = linear_attn_recurrent(*leaves[:3], log_decay, leaves[4], log_gate=leaves[3], segment_ids=ids)
        inputs = [x for x in leaves if x is not None]
        runs.append((o, final, *torch.autograd.grad([o, final], inputs, [do.to(cast), dfinal.to(cast)])))
    names = ("o", "final", "dq", "dk", "dv") + (("dlog_gate",) if log_gate is not None else ()) + ("dstate",)
    assert_close(runs[0], runs[1], FP32_TOL, names)


def _lasp2_bytes(W):
    from lasp import lasp2
    from lasp.parallel import count_collectives, shard
    r = torch.distributed.get_rank()
    q, k, v, log_decay, log_gate, do = make_inputs(2, 8 * W, 2, 2, 4, 3, "gate", torch.float32)
    ids = document_ids(2, 8 * W, [[3, 9], [W * 4]])
    sizes = []
    for segment_ids in (None, shard(ids, "zigzag", r, W)):
        local = [shard(x, "zigzag", r, W).requires_grad_() for x in (q, k, v)]
        with count_collectives() as fwd:
            o = lasp2(*local, log_decay=log_decay, log_gate=shard(log_gate, "zigzag", r, W), layout="zigzag",
                      segment_ids=segment_ids)
        with count_collectives() as bwd:
            torch.autograd.backward(o, shard(do, "zigzag", r, W))
        sizes.append((fwd.summary()["all_gather"], bwd.summary()["all_gather"]))
    return sizes


def test_lasp2_document_bytes():
    """Documents add (W−1)·n·B·16 bytes (two int64 ids per segment and row) to LASP-2's forward gather, nothing to
    its backward, and no call."""
    W, n, B = 3, 2, 2
    from tests.dist import run_ranks
    for (fwd0, bwd0), (fwd1, bwd1) in run_ranks(W, _lasp2_bytes, W):
        assert fwd1 == (fwd0[0], fwd0[1] + (W - 1) * n * B * 16) and fwd0[0] == 1, (fwd0, fwd1)
        assert bwd1 == bwd0 and bwd0[0] == 1, (bwd0, bwd1)


def _sp_model_case(preset, linear, layout, W):
    """The model on W ranks (linear engine, allgather softmax) with documents -> the
    largest relative error of this rank's hidden states and of every all-reduced parameter gradient against the
    same model on one process (which equals each document alone: test above)."""
    from lasp.apply import apply_sequence_parallel
    from lasp.models import build_model
    from lasp.parallel import comm, local_positions, shard
    r = torch.distributed.get_rank()
    torch.manual_seed(0)
    reference = build_model(preset).double()
    model = build_model(preset).double()
    model.load_state_dict(reference.state_dict())
    T = 16 * W
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 256, (1, T), generator=g)
    ids = document_ids(1, T, [[1, T // (2 * W), T // 2 + 3, T - 1]])
    weight = torch.randn(1, T, 128, generator=g, dtype=torch.float64)          # both presets: dim 128
    hidden = reference(tokens, torch.arange(T), ids)
    (hidden * weight).sum().backward()
    apply_sequence_parallel(model, linear=linear, softmax="allgather", layout=layout)
    local = model(shard(tokens, layout, r, W), local_positions(T, layout, r, W), shard(ids, layout, r, W))
    (local * shard(weight, layout, r, W)).sum().backward()
    errors = [rel_err(local, shard(hidden, layout, r, W))]
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        if p_ref.grad is not None:                                    # the output head is not used here
            errors.append(rel_err(comm.all_reduce(p.grad.clone()), p_ref.grad))
    return max(errors)


def test_sequence_parallel_model_with_documents():
    """The gated hybrid made sequence-parallel from outside (LASP-2 zigzag + all-gather softmax on 2 ranks) on a
    packed sequence equals the one-process model: hidden states and every gradient, 1e-10."""
    from tests.dist import run_ranks
    for error in run_ranks(2, _sp_model_case, "linear-llama3-tiny-gated-hybrid", "lasp2", "zigzag", 2):
        assert error < F64_TOL, error


def _replayed_case(W):
    """LASP-2 with documents recorded, then replayed as a checkpointed layer's recomputation does
    (parallel/checkpointing.py): the replay issues no collective, gives the same o, and its backward (which needs
    the gathered ids) matches the documents-alone oracle."""
    from lasp import lasp2
    from lasp.parallel import count_collectives, shard
    from lasp.parallel.checkpointing import _contexts
    r = torch.distributed.get_rank()
    q, k, v, log_decay, log_gate, do = make_inputs(1, 16 * W, 2, 2, 4, 3, "gate")
    ids = document_ids(1, 16 * W, [[5, 16, 17]])
    want = oracle_grads(q, k, v, log_decay, log_gate, ids, do)
    local = [shard(x, "zigzag", r, W).requires_grad_() for x in (q, k, v, log_gate)]
    kwargs = dict(log_decay=log_decay, layout="zigzag", segment_ids=shard(ids, "zigzag", r, W))
    record, replay = _contexts()
    with record:
        first = lasp2(*local[:3], log_gate=local[3], **kwargs)
    with replay, count_collectives() as log:
        again = lasp2(*local[:3], log_gate=local[3], **kwargs)
    grads = torch.autograd.grad(again, local, shard(do, "zigzag", r, W))
    errors = [rel_err(a, shard(b, "zigzag", r, W)) for a, b in zip((again, *grads), want)]
    return torch.equal(first, again), log.summary(), max(errors)


def test_lasp2_replay_keeps_the_documents():
    from tests.dist import run_ranks
    for same, collectives, error in run_ranks(2, _replayed_case, 2):
        assert same and collectives == {} and error < F64_TOL, (same, collectives, error)
