"""The (gated) delta rule: the chunked kernel against its token-by-token twin and the float64 per-document oracle
(forward, final state and every gradient), against transformers' Qwen3-Next reference, its engine pieces, bad
input; then LASP-2, LASP-1 and All-Scan with beta= on 1-8 gloo ranks against the oracle, with their messages."""
import pytest
import torch
import torch.nn.functional as F

from lasp.kernels import gated_delta_attn, gated_delta_attn_recurrent
from lasp.kernels import delta_rule as dr
from tests.dist import rel_err
from tests.oracles import delta_rule_documents

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _inputs(T, H_k=2, H=4, d_k=6, d_v=5, B=2, gate="mixed", beta="mid", docs=False, seed=0):
    """q, k (unit rows), v, beta, log_gate, initial state, segment_ids, do, dfinal, float64."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    q, k, v = rand(B, T, H_k, d_k), F.normalize(rand(B, T, H_k, d_k), dim=-1), rand(B, T, H, d_v)
    u = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    b = {"mid": 2 * u, "near0": 1e-4 * u, "near1": 1 - 1e-4 * u}[beta]
    lg = {"none": None, "strong": -20 * u, "weak": -1e-4 * u, "mixed": F.logsigmoid(4 * rand(B, T, H))}[gate]
    ids = torch.randint(0, max(T // 20, 2), (B, T), generator=g).sort(1).values if docs else None
    return q, k, v, b, lg, rand(B, H, d_k, d_v), ids, rand(B, T, H, d_v), rand(B, H, d_k, d_v)


def _run(fn, dtype, q, k, v, b, lg, s0, ids, do, dfin):
    """-> [o, final, dq, dk, dv, dbeta, (dlog_gate,) dstate] in float64."""
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, b, s0) + (() if lg is None else (lg,))]
    o, final = fn(*leaves[:4], log_gate=leaves[5] if lg is not None else None, initial_state=leaves[4],
                  output_final_state=True, segment_ids=ids)
    grads = torch.autograd.grad(((o * do.to(dtype)).sum() + (final * dfin.to(dtype)).sum()), leaves)
    return [x.double() for x in (o, final, *grads)]


KERNEL_CASES = [  # (T, H_k, H, gate, beta, docs, dtype)
    (1, 2, 2, "none", "mid", False, torch.float64), (63, 2, 4, "mixed", "mid", False, torch.float64),
    (65, 1, 3, "strong", "near1", True, torch.float64), (300, 2, 2, "weak", "near0", True, torch.float64),
    (130, 2, 4, "none", "near1", True, torch.float64), (300, 2, 4, "mixed", "mid", True, torch.float32),
    (129, 1, 2, "strong", "near0", False, torch.float32)]


@pytest.mark.parametrize("T,H_k,H,gate,beta,docs,dtype", KERNEL_CASES)
def test_kernel_matches_recurrence_and_document_oracle(T, H_k, H, gate, beta, docs, dtype):
    args = _inputs(T, H_k, H, gate=gate, beta=beta, docs=docs)
    got = _run(gated_delta_attn, dtype, *args)
    twin = _run(gated_delta_attn_recurrent, torch.float64, *args)
    errors = [rel_err(a, b) for a, b in zip(got, twin)]
    assert max(errors) < TOL[dtype], f"o, final, dq, dk, dv, dbeta, dstate(, dgate) vs the twin: {errors}"
    q, k, v, b, lg, s0, ids = args[:7]
    o, final = delta_rule_documents(q, k, v, b, lg, s0, ids)
    assert rel_err(got[0], o) < TOL[dtype] and rel_err(got[1], final) < TOL[dtype]


def test_kernel_matches_transformers_qwen3_next_reference():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule
    q, k, v, b, lg, s0 = (x.float() for x in _inputs(70, 2, 4, d_k=8, d_v=8, gate="mixed")[:6])
    ref, ref_final = torch_recurrent_gated_delta_rule(q, k, v, lg, b, initial_state=s0, output_final_state=True)
    o, final = gated_delta_attn(q * 8 ** -0.5, k, v, b, log_gate=lg, initial_state=s0, output_final_state=True)
    assert rel_err(o, ref) < 2e-5 and rel_err(final, ref_final) < 2e-5


def test_pieces_are_the_segment_map_and_its_gradients():
    """S_out = A S_in + M, dP = the gradient of the entering state with no leaving gradient, and a reset at the
    first token makes the segment forget its entering state (A = 0, dP = 0)."""
    q, k, v, b, lg, s0, ids, do, _ = _inputs(100, 2, 4, gate="mixed", docs=True)
    ids[1] = 7                                                           # row 1: one document, A ≠ 0
    for first in (None, torch.tensor([True, False])):
        inp = dr.DeltaInputs(q, k, v, b, lg, dr.document_resets(ids, first))
        pieces = dr.delta_pieces(inp)
        A, M, entering = dr.delta_transition(pieces, keep_entering=True)
        o, final, states = dr.delta_outputs(pieces, s0, torch.float64)
        assert rel_err(final, A @ s0 + M) < 1e-12
        assert rel_err(dr.delta_outputs(pieces, s0, torch.float64, entering)[0], o) < 1e-12
        s = s0.clone().requires_grad_()
        o2 = dr._GatedDelta.apply(q, k, v, b, lg, s, inp.resets)[0]
        assert rel_err(o, o2) < 1e-12
        dP = torch.autograd.grad((o2 * do).sum(), s)[0]
        assert rel_err(dr.delta_entry_grad(dr.delta_entry_queries(pieces, entering), do), dP) < 1e-12
        grads = dr.delta_backward(inp, states, do)
        assert rel_err(grads[-1], dP) < 1e-12
        if first is not None:
            assert A[0].abs().max() == 0 and dP[0].abs().max() == 0 and A[1].abs().max() > 0


@pytest.mark.parametrize("change,match", [
    (dict(beta=2.5), r"beta .* \[0, 2\]"), (dict(beta=-0.1), r"\[0, 2\]"), (dict(beta_shape=(2, 9, 4)), "beta must"),
    (dict(v_heads=3), "multiple of its H_k = 2"), (dict(gate=0.5), "log_gate"), (dict(state_shape=(2, 4, 6, 6)),
                                                                                  "initial_state"),
    (dict(ids_shape=(2, 8)), "segment_ids"), (dict(backend="triton"), "CUDA"), (dict(backend="cuda"), "one of")])
def test_bad_input_raises_value_error_naming_it(change, match):
    q, k, v, b, lg, s0, ids = _inputs(10, 2, 4, docs=True)[:7]
    if "beta" in change:
        b = torch.full_like(b, change["beta"])
    if "beta_shape" in change:
        b = torch.rand(change["beta_shape"], dtype=torch.float64)
    if "v_heads" in change:
        v = v[:, :, :change["v_heads"]]
        b, lg, s0 = b[..., :3], lg[..., :3], s0[:, :3]
    if "gate" in change:
        lg = torch.full_like(lg, change["gate"])
    if "state_shape" in change:
        s0 = torch.zeros(change["state_shape"], dtype=torch.float64)
    if "ids_shape" in change:
        ids = torch.zeros(change["ids_shape"], dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        gated_delta_attn(q, k, v, b, log_gate=lg, initial_state=s0, segment_ids=ids, backend=change.get("backend"))


def test_fla_backend_maps_documents_and_states_onto_cu_seqlens(monkeypatch):
    """The CUDA path's argument mapping, with fla's op replaced by a stand-in that runs each cu_seqlens sequence
    through our twin (no GPU here): documents, per-row initial and final states, GVA heads, scale 1."""
    import sys
    import types
    from lasp.kernels.delta_rule_fla import fla_gated_delta_attn
    calls = []

    def fake(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens=None):
        calls.append((scale, q.shape[0], None if cu_seqlens is None else cu_seqlens.tolist()))
        cu = cu_seqlens.tolist() if cu_seqlens is not None else None
        if cu is None:
            return gated_delta_attn_recurrent(q, k, v, beta, log_gate=g, initial_state=initial_state,
                                              output_final_state=True)
        outs, finals = [], []
        for i, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
            o, f = gated_delta_attn_recurrent(*(x[:, a:e] for x in (q, k, v, beta)), log_gate=g[:, a:e],
                                              initial_state=initial_state[i:i + 1], output_final_state=True)
            outs.append(o)
            finals.append(f)
        return torch.cat(outs, 1), torch.cat(finals)
    module = types.ModuleType("fla.ops.gated_delta_rule")
    module.chunk_gated_delta_rule = fake
    for name in ("fla", "fla.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule", module)
    q, k, v, b, lg, s0, ids = _inputs(40, 2, 4, docs=True)[:7]
    for seg in (None, ids):
        o, final = fla_gated_delta_attn(q, k, v, b, lg, s0, seg)
        ref, ref_final = delta_rule_documents(q, k, v, b, lg, s0, seg)
        assert rel_err(o, ref) < 1e-12 and rel_err(final, ref_final) < 1e-12
    assert calls[0][:2] == (1.0, 2) and calls[1][1] == 1 and calls[1][2][-1] == 80


# ------------------------------------------------------------------------------------------------- engines
B_E, H_K, H_V, D_K, D_V = 2, 1, 2, 4, 3


def _documents(T, W, seed):
    """Row 0: documents cut at random (p = 0.2), at the first rank edge and around a one-token document; row 1 one
    document over every rank."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(T, generator=g) < 0.2
    starts[[min(T // W, T - 1), min(3, T - 1), min(4, T - 1)]] = True
    return torch.stack([starts.long().cumsum(0), torch.full((T,), 5)])


def _reference(W, engine, layout, gated, docs, dtype, T_local, blocks=None):
    """The global inputs, document ids, output and gradients of the float64 oracle (computed once, in the parent:
    the forked ranks inherit them)."""
    T = T_local * W
    q, k, v, b, lg, _, _, do, _ = _inputs(T, H_K, H_V, D_K, D_V, B_E, gate="mixed" if gated else "none", seed=W)
    ids = _documents(T, W, W) if docs else None
    full = [x.clone().requires_grad_() for x in (q, k, v, b) + ((lg,) if gated else ())]
    ref = delta_rule_documents(*full[:4], full[4] if gated else None, None, ids)[0]
    return [x.detach() for x in full], ids, do, ref.detach(), torch.autograd.grad(ref, full, do)


def _engine_case(W, engine, layout, gated, docs, dtype, T_local, blocks, reference):
    """One engine call with beta= on this rank's shard -> (errors o, dq, dk, dv, dbeta(, dgate) vs the oracle's
    shard, forward and backward comm summaries)."""
    import torch.distributed as dist
    from lasp import allscan, lasp1, lasp2
    from lasp.parallel import count_collectives, shard
    r = dist.get_rank()
    full, ids, do, ref, ref_grads = reference
    local = [shard(x, layout, r, W).to(dtype).requires_grad_() for x in full]
    fn = {"lasp2": lasp2, "lasp1": lasp1, "allscan": allscan}[engine]
    kw = dict(layout=layout) if engine != "lasp1" else {}
    kw.update(blocks=blocks) if engine == "allscan" else None
    with count_collectives() as fwd:
        o = fn(*local[:3], beta=local[3], log_gate=local[4] if gated else None,
               segment_ids=None if ids is None else shard(ids, layout, r, W), **kw)
    with count_collectives() as bwd:
        grads = torch.autograd.grad(o, local, shard(do, layout, r, W).to(dtype))
    errors = [rel_err(o, shard(ref, layout, r, W))] + [rel_err(a, shard(x, layout, r, W))
                                                       for a, x in zip(grads, ref_grads)]
    return errors, fwd.summary(), bwd.summary()


ENGINE_CASES = [  # (engine, layout, gated, docs, dtype, T_local, All-Scan blocks)
    ("lasp2", "contiguous", True, True, torch.float64, 5, None),
    ("lasp2", "zigzag", True, True, torch.float64, 6, None),
    ("lasp2", "contiguous", False, False, torch.float32, 7, None),
    ("lasp1", "contiguous", True, True, torch.float64, 5, None),
    ("lasp1", "contiguous", False, True, torch.float32, 4, None),
    ("allscan", "zigzag", True, True, torch.float64, 6, 2),
    ("allscan", "contiguous", False, True, torch.float64, 7, None),
    ("allscan", "zigzag", True, False, torch.float32, 4, 3)]
LONG_CASES = {1: [("lasp2", "contiguous", True, True, torch.float64, 300, None)],      # several chunks and blocks
              2: [("lasp2", "zigzag", True, True, torch.float64, 130, None),
                  ("allscan", "contiguous", True, True, torch.float64, 65, None)],
              3: [("lasp1", "contiguous", True, True, torch.float64, 63, None)]}


def _engine_cases(W, references):
    return [_engine_case(W, *case, ref) for case, ref in zip(_cases_for(W), references)]


def _cases_for(W):
    return (ENGINE_CASES if W != 8 else ENGINE_CASES[1::2]) + LONG_CASES.get(W, [])


def _lasp2_bytes(W, n, dtype, docs):
    """Received per rank: forward (W−1)·n·B·H·(d_k² + d_k·d_v) (+ 16 bytes of document ids per segment and row:
    first and last, int64) + the 2-number header; backward (W−1)·n·B·H·d_k·d_v."""
    elem = torch.finfo(dtype).bits // 8
    fwd = (W - 1) * ((n * B_E * H_V * (D_K * D_K + D_K * D_V) + 2) * elem + (16 * n * B_E if docs else 0))
    return fwd, (W - 1) * n * B_E * H_V * D_K * D_V * elem


@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_engines_with_beta_match_the_float64_oracle_and_count_their_messages(W):
    from tests.dist import run_ranks
    references = [_reference(W, *case) for case in _cases_for(W)]
    for r, results in enumerate(run_ranks(W, _engine_cases, W, references)):
        for case, (errors, fwd, bwd) in zip(_cases_for(W), results):
            engine, layout, gated, docs, dtype = case[:5]
            assert max(errors) < TOL[dtype], f"W={W} rank {r} {case}: errors o, dq, dk, dv, dbeta(, dg) = {errors}"
            n = 1 if layout == "contiguous" else 2
            if engine == "lasp2":
                assert fwd == {"all_gather": (1, _lasp2_bytes(W, n, dtype, docs)[0])}, (case, fwd)
                assert bwd == {"all_gather": (1, _lasp2_bytes(W, n, dtype, docs)[1])}, (case, bwd)
            else:           # the chain: one d_k×d_v state per hop, never a transition
                elem, state = torch.finfo(dtype).bits // 8, B_E * H_V * D_K * D_V
                for log in (fwd, bwd):
                    got = log.get("recv", (0, 0))[1]
                    assert got % (state * elem) == 0 and got <= n * state * elem, (case, log)
                # All-Scan's length header carries the ids; LASP-1 gathers them once (it has no other gather)
                assert fwd.get("all_gather", (0, 0))[0] == int(docs or engine == "allscan"), (case, fwd)
                assert "all_gather" not in bwd, (case, bwd)


@pytest.mark.parametrize("engine", ["lasp2", "lasp1", "allscan", "ring_linear_attention"])
def test_engines_refuse_bad_delta_input_before_any_collective(engine):
    import lasp
    from lasp.parallel import count_collectives
    q, k, v, b, lg = _inputs(8, 1, 2)[:5]
    fn = getattr(lasp, engine)
    bad = [dict(beta=b[..., :1]), dict(beta=b + 3), dict(beta=b, log_decay=torch.zeros(1)),
           dict(beta=b, causal=False), dict(beta=b, log_gate=-lg.abs()[:, :4])]
    for kw in (bad[:1] if engine == "ring_linear_attention" else bad):
        with count_collectives() as log, pytest.raises(ValueError, match="beta|log_gate|delta"):
            fn(q, k, v, **kw)
        assert log.summary() == {}


def test_apply_binds_delta_mixers_to_the_engine():
    from lasp import apply_sequence_parallel
    from lasp.parallel import count_collectives

    class Mixer(torch.nn.Module):
        def delta_attn(self, q, k, v, **kw):                      # the single-process default a model would hold
            return gated_delta_attn(q, k, v, kw.pop("beta"), **kw)[0]
    model = apply_sequence_parallel(torch.nn.Sequential(Mixer()), linear="lasp2", softmax="local")
    q, k, v, b, lg = _inputs(40, 1, 2)[:5]
    with count_collectives() as log:
        o = model[0].delta_attn(q, k, v, beta=b, log_gate=lg)
    assert log.count("all_gather") == 1
    assert rel_err(o, gated_delta_attn(q, k, v, b, log_gate=lg)[0]) < 1e-12


def test_planner_counts_delta_rule_terms():
    """The planner's delta-rule terms: LASP-2's buffer is the gathered (A, M), the chains' two states; saved and
    work grow linearly in the local tokens, the work at most one 1,024-token block."""
    from lasp.parallel.memory import engine_terms
    shapes = dict(heads=4, kv_heads=2, d_k=8, d_v=6, delta=True)
    terms = {e: engine_terms("L", shapes, e, 1, 4096, 16384, 4, 4, "torch") for e in ("lasp2", "allscan")}
    assert terms["lasp2"][2] == 4 * 4 * 4 * (8 * 8 + 8 * 6) and terms["allscan"][2] == 4 * 4 * 2 * 8 * 6
    small, big = (engine_terms("L", shapes, "lasp2", 1, C, 4 * C, 4, 4, "torch") for C in (2048, 4096))
    assert 1.9 < big[0] / small[0] < 2.1 and big[1] > small[1]


def test_gpu_check_has_delta_rule_rows():
    """`python -m lasp.kernels.bench --check` reports the delta rule too (on CPU: the torch path, fp32 and bf16)."""
    from lasp.kernels.acceptance import _delta_rows
    rows = _delta_rows(torch.device("cpu"), 40)
    assert {(r["backend"], r["dtype"]) for r in rows} == {("torch", "float32"), ("torch", "bfloat16")}
    assert all(r["ok"] for r in rows) and rows[0]["worst_rel_err"] < 2e-5
