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
        A, M = dr.delta_transition(pieces)
        o, final, states = dr.delta_outputs(pieces, s0, torch.float64)
        assert rel_err(final, A @ s0 + M) < 1e-12
        s = s0.clone().requires_grad_()
        o2 = dr._GatedDelta.apply(q, k, v, b, lg, s, inp.resets)[0]
        assert rel_err(o, o2) < 1e-12
        dP = torch.autograd.grad((o2 * do).sum(), s)[0]
        assert rel_err(dr.delta_entry_grad(pieces, do), dP) < 1e-12
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
