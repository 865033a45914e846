"""kernels/: the torch chunked path and the Triton kernels (interpreter, CPU) against float64 oracles.

Shapes: q, k (B, T, H, d_k); v (B, T, H, d_v); log_decay (H,); states (B, H, d_k, d_v). Oracles: the
token-by-token recurrence (kernels.linear_attn_recurrent, differentiated by autograd in float64) and the dense
O(T²) definition (tests/oracles.py). Sizes are tiny: the Triton interpreter runs every tl op in numpy.
Odd lengths (T = 63, 130) leave a masked tail block; log λ = -30 makes λ^16 underflow to 0 in float32.
"""
import pytest
import torch

from lasp.kernels import lightning_attn, lightning_attn_bwd, lightning_attn_fwd, linear_attn_chunked, linear_attn_recurrent
from tests.dist import assert_close, rel_err, run_ranks
from tests.oracles import gated_linear_attention, linear_attention_dense

FP32_TOL = 2e-5
# fp16: inputs are rounded to fp16 before both sides run, so the error is the fp16 rounding of o and of each
# gradient (unit roundoff 2^-11 ≈ 4.9e-4). The kernel must stay within twice the torch path's fp16 error
# (house rule for low precision), and under this absolute bound.
FP16_TOL = 1e-3

DECAYS = {
    "none": None,                                   # λ = 1: plain causal linear attention
    "mixed": [0.0, -0.25],                          # one λ = 1 head, one decaying head
    "strong": [-30.0, -0.01],                       # λ^c underflows to 0 in float32 for the first head
}


def _inputs(B, T, H, d_k, d_v, decay, with_state, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, d_k, generator=g) / d_k ** 0.25 for _ in range(2))
    v = torch.randn(B, T, H, d_v, generator=g)
    state = torch.randn(B, H, d_k, d_v, generator=g) if with_state else None
    log_decay = None if DECAYS[decay] is None else torch.tensor(DECAYS[decay][:H], dtype=torch.float64)
    do = torch.randn(B, T, H, d_v, generator=g)
    dfinal = torch.randn(B, H, d_k, d_v, generator=g)
    cast = (lambda x, to=dtype: None if x is None else x.to(to))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32   # states: float32, float64 for float64
    return cast(q), cast(k), cast(v), log_decay, cast(state, sdt), cast(do), cast(dfinal, sdt)


def _oracle(q, k, v, log_decay, state, do, dfinal):
    """float64 recurrence: (o, final_state, dq, dk, dv, dstate or None)."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if state is not None:
        leaves.append(state.detach().double().requires_grad_())
    o, final = linear_attn_recurrent(*leaves[:3], log_decay, leaves[3] if state is not None else None)
    outs, grads = [o], [do.double()]
    if dfinal is not None:
        outs.append(final)
        grads.append(dfinal.double())
    dx = torch.autograd.grad(outs, leaves, grads)
    return (o.detach(), final.detach(), *dx[:3], dx[3] if state is not None else None)


def _assert_close(got, want, tol, names=("o", "final", "dq", "dk", "dv", "dstate")):
    assert_close(got, want, tol, names)


# ---------------------------------------------------------------------------------------------------------------
# 1. torch chunked path, float64 (cheap: pure math)

@pytest.mark.parametrize("T, chunk_len", [(63, 16), (1, 16), (130, 64), (64, 16), (65, 64), (128, 64)])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_chunked_matches_recurrence_and_dense(T, chunk_len, decay):
    q, k, v, log_decay, _, _, _ = _inputs(2, T, 2, 12, 6, decay, False, torch.float64)
    o, final = linear_attn_chunked(q, k, v, log_decay, chunk_len=chunk_len)
    o_rec, final_rec = linear_attn_recurrent(q, k, v, log_decay)
    assert rel_err(o, linear_attention_dense(q, k, v, log_decay)) < 1e-10
    assert rel_err(o, o_rec) < 1e-10 and rel_err(final, final_rec) < 1e-10


@pytest.mark.parametrize("T", [63, 1, 130])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_chunked_state_and_grads_match_recurrence(T, decay):
    """Initial state in, final state out, d_k = 2·d_v; gradients of the torch backward (autograd) too."""
    args = _inputs(1, T, 2, 8, 4, decay, True, torch.float64)
    q, k, v, log_decay, state, do, dfinal = args
    o, final = lightning_attn_fwd(q, k, v, log_decay, state, backend="torch")
    grads = lightning_attn_bwd(q, k, v, log_decay, state, do, dfinal, backend="torch")
    _assert_close((o, final, *grads), _oracle(*args), 1e-10)


@pytest.mark.parametrize("T", [1, 63, 65, 300])
@pytest.mark.parametrize("decay, with_state", [("none", False), ("mixed", True), ("strong", True), ("mixed", False)])
def test_handwritten_backward_matches_autograd_of_recurrence(T, decay, with_state):
    """linear_attn_chunked's own backward (chunk 64, blocks of 2 chunks: T = 300 is two blocks and a tail of 44)
    through torch autograd, against autograd of the float64 recurrence; d_k = 12, d_v = 5."""
    q, k, v, log_decay, state, do, dfinal = _inputs(1, T, 2, 12, 5, decay, with_state, torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([state.clone().requires_grad_()] if with_state else [])
    o, final = linear_attn_chunked(*leaves[:3], log_decay, leaves[3] if with_state else None, block_chunks=2)
    torch.autograd.backward([o, final], [do, dfinal])
    got = (o.detach(), final.detach(), *(x.grad for x in leaves), *([] if with_state else [None]))
    _assert_close(got, _oracle(q, k, v, log_decay, state, do, dfinal), 1e-10)


GATES = {"strong": -20.0, "weak": -1e-4}          # g = scale·u, u ~ U(0, 1): down to -20, or barely below 0


def _gated_oracle(q, k, v, log_gate, log_decay, state, do, dfinal):
    """float64 quadratic oracle and autograd: (o, final, dq, dk, dv, dstate or None, dlog_gate)."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, log_gate)]
    s0 = None if state is None else state.detach().double().requires_grad_()
    o, final = gated_linear_attention(*leaves, log_decay, s0)
    wrt = leaves if s0 is None else leaves + [s0]
    dx = torch.autograd.grad([o, final], wrt, [do.double(), dfinal.double()])
    return (o.detach(), final.detach(), *dx[:3], None if s0 is None else dx[4], dx[3])


@pytest.mark.parametrize("T", [1, 63, 64, 77, 200])
@pytest.mark.parametrize("gate", list(GATES))
def test_torch_gated_matches_quadratic_oracle(T, gate):
    """log_gate + log_decay, initial state, d_k ≠ d_v, blocks of 2 chunks of 16 (several blocks and a tail)."""
    q, k, v, log_decay, state, do, dfinal = _inputs(1, T, 2, 8, 4, "mixed", True, torch.float64)
    log_gate = GATES[gate] * torch.rand(1, T, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _gated_oracle(q, k, v, log_gate, log_decay, state, do, dfinal)
    o, final = linear_attn_chunked(q, k, v, log_decay, state, 16, log_gate=log_gate, block_chunks=2)
    grads = lightning_attn_bwd(q, k, v, log_decay, state, do, dfinal, backend="torch", log_gate=log_gate)
    _assert_close((o, final, *grads), want, 1e-10, ("o", "final", "dq", "dk", "dv", "dstate", "dlog_gate"))


def _arriving(value, polls):
    """A finisher as LASP-2's: finish(wait) -> value, or None before poll number `polls` (None: only when waited)."""
    seen = []

    def finish(wait):
        seen.append(wait)
        return value if wait or (polls is not None and len(seen) > polls) else None
    return finish


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 77, 200])
def test_deferred_kernel_matches_oracle_whenever_the_state_arrives(T, gated, dtype):
    """LASP-2's split kernel (kernels/linear_attn.py deferred_*; chunks of 16 in blocks of 2): P entering and G
    leaving arrive at the first poll, after two blocks, or only when waited for -> bitwise the same o, dq, dk, dv,
    d log_gate, and these are the kernel's entering from P and leaving with G (float64 oracle: 1e-10, fp32: 2e-5);
    M is the state leaving from zero, dM the gradient of the state entering from dO alone."""
    from lasp.kernels.linear_attn import deferred_grads, deferred_outputs, deferred_state_grads, deferred_states
    q, k, v, log_gate, log_decay, P, do, G = _gated_inputs(T, "strong", dtype)
    gate = log_gate if gated else None
    oracle_gate = log_gate if gated else torch.zeros_like(log_gate)
    want = _gated_oracle(q, k, v, oracle_gate, log_decay, P, do, G)
    M = _gated_oracle(q, k, v, oracle_gate, log_decay, None, do, G)[1]
    dM = _gated_oracle(q, k, v, oracle_gate, log_decay, P, do, torch.zeros_like(G))[5]
    runs = []
    for polls in (0, 2, None):
        final, entries = deferred_states(k, v, log_decay, gate, 16, 2)
        o, checkpoints = deferred_outputs(q, k, v, log_decay, gate, entries, _arriving(P, polls), 16, 2)
        dstate, dP = deferred_state_grads(q, do, log_decay, gate, 16, 2)
        grads = deferred_grads(q, k, v, do, log_decay, gate, checkpoints, dP, _arriving(G, polls), 16, 2)
        runs.append((o, *grads[:3]) + ((grads[3],) if gated else ()))
    for polls, run in zip((2, None), runs[1:]):
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run)), f"arriving after poll {polls} differs"
    tol = 1e-10 if dtype == torch.float64 else FP32_TOL
    names = ("o", "dq", "dk", "dv") + (("dlog_gate",) if gated else ())
    _assert_close(runs[0], [want[i] for i in (0, 2, 3, 4, 6)][:len(names)], tol, names)
    _assert_close((final, dstate), (M, dM), tol, ("M", "dM"))


# ---------------------------------------------------------------------------------------------------------------
# 2. Triton kernels under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1), block 16

def _triton_through_autograd(q, k, v, log_decay, state, do, dfinal):
    """lightning_attn(..., backend="triton") and autograd: (o, final, dq, dk, dv, dstate)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    state_leaf = None if state is None else state.clone().requires_grad_()
    o, final = lightning_attn(*leaves, log_decay=log_decay, initial_state=state_leaf, output_final_state=True,
                              backend="triton")
    outs, grads = [o], [do]
    if dfinal is not None:
        outs.append(final)
        grads.append(dfinal)
    torch.autograd.backward(outs, grads)
    return (o.detach(), final.detach(), *(x.grad for x in leaves), None if state is None else state_leaf.grad)


@pytest.mark.parametrize("T, d_k, d_v, decay, with_state", [
    (63, 32, 16, "mixed", True),      # tail block of 15, d_k = 2·d_v, state in and out
    (63, 16, 32, "strong", True),     # d_v > d_k, λ^16 underflows
    (130, 16, 8, "none", False),      # λ = 1, tail of 2, padded d_v, no state (dstate must be None)
    (1, 8, 8, "mixed", True),         # a single token
    (48, 32, 32, "strong", False),    # T a multiple of the block
    (34, 16, 16, "strong", True),     # tail of 2 with log λ = -30: λ^{c-1-i} for padded rows would overflow
])
def test_triton_fp32_matches_recurrence(T, d_k, d_v, decay, with_state):
    args = _inputs(2, T, 2, d_k, d_v, decay, with_state, torch.float32)
    q, k, v, log_decay, state, do, dfinal = args
    log_decay = None if log_decay is None else log_decay.float()
    got = _triton_through_autograd(q, k, v, log_decay, state, do, dfinal if with_state else None)
    want = _oracle(*args[:6], dfinal if with_state else None)
    _assert_close(got, want, FP32_TOL)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32


def test_triton_split_dv_blocks_and_final_state_grad_only():
    """d_v = 48 in three blocks of 16: dq and dk are sums of per-block partials. Gradient from the final state
    alone (do = 0) checks the suffix recurrence R ← λ^c R + (Λ_q Q)ᵀ dO starting from dS_final."""
    from lasp.kernels.lightning_triton import triton_bwd, triton_fwd
    q, k, v, log_decay, state, do, dfinal = _inputs(1, 37, 2, 16, 48, "mixed", True, torch.float32)
    ld = log_decay.float()
    o, final = triton_fwd(q, k, v, ld, state, block_len=16, block_v=16)
    for grad_o in (do, torch.zeros_like(do)):
        grads = triton_bwd(q, k, v, ld, state, grad_o, dfinal, block_len=16, block_v=16)
        want = _oracle(q, k, v, log_decay, state, grad_o, dfinal)
        _assert_close((o, final, *grads), want, FP32_TOL)


def test_triton_empty_sequence():
    """T = 0: no block runs; the final state is the initial one and its gradient passes straight through."""
    from lasp.kernels.lightning_triton import triton_bwd, triton_fwd
    q, k, v, log_decay, state, do, dfinal = _inputs(1, 0, 2, 16, 8, "mixed", True, torch.float32)
    o, final = triton_fwd(q, k, v, log_decay.float(), state)
    dq, dk, dv, dstate, _ = triton_bwd(q, k, v, log_decay.float(), state, do, dfinal)
    assert o.shape == (1, 0, 2, 8) and dq.shape == (1, 0, 2, 16) and dv.shape == (1, 0, 2, 8)
    assert torch.equal(final, state) and torch.equal(dstate, dfinal)


@pytest.mark.parametrize("decay", ["mixed", "strong"])
def test_triton_fp16_within_twice_torch_error(decay):
    """fp16 in, fp16 out (states float32): error at most twice the torch path's own fp16 error, and < 1e-3."""
    args = _inputs(1, 63, 2, 32, 16, decay, True, torch.float16)
    q, k, v, log_decay, state, do, dfinal = args
    want = _oracle(*args)
    ld = log_decay.float()
    got = _triton_through_autograd(q, k, v, ld, state, do, dfinal)
    ref = (*lightning_attn_fwd(q, k, v, ld, state, backend="torch"),
           *lightning_attn_bwd(q, k, v, ld, state, do, dfinal, backend="torch"))
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float16 and got[1].dtype == torch.float32
    for name, a, r, b in zip(("o", "final", "dq", "dk", "dv", "dstate"), got, ref, want):
        err, ref_err = rel_err(a, b), rel_err(r, b)
        assert err <= 2 * ref_err + 1e-6 and err < FP16_TOL, f"{name}: {err:.2e} vs torch fp16 {ref_err:.2e}"


def _gated_inputs(T, gate, dtype, seed=0):
    """B = 2, H = 2, d_k = 32 ≠ d_v = 16, a mixed decay on top of the gate, an initial state."""
    q, k, v, log_decay, state, do, dfinal = _inputs(2, T, 2, 32, 16, "mixed", True, dtype, seed)
    log_gate = GATES[gate] * torch.rand(2, T, 2, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, log_gate.to(dtype), log_decay, state, do, dfinal


def _through_autograd(backend, q, k, v, log_gate, log_decay, state, do, dfinal):
    """lightning_attn and autograd: (o, final, dq, dk, dv, dstate, dlog_gate)."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v, log_gate, state)]
    o, final = lightning_attn(*leaves[:3], log_decay=log_decay, log_gate=leaves[3], initial_state=leaves[4],
                              output_final_state=True, backend=backend)
    torch.autograd.backward([o, final], [do, dfinal])
    grads = [x.grad for x in leaves]
    return (o.detach(), final.detach(), *grads[:3], grads[4], grads[3])


GATED_NAMES = ("o", "final", "dq", "dk", "dv", "dstate", "dlog_gate")


@pytest.mark.parametrize("T", [1, 63, 64, 77, 200])
@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gated_fp32_matches_quadratic_oracle(backend, gate, T):
    """Both backends in float32 through lightning_attn: forward and all five gradients within 2e-5."""
    q, k, v, log_gate, log_decay, state, do, dfinal = _gated_inputs(T, gate, torch.float32)
    want = _gated_oracle(q, k, v, log_gate, log_decay, state, do, dfinal)
    got = _through_autograd(backend, q, k, v, log_gate, log_decay.float(), state, do, dfinal)
    _assert_close(got, want, FP32_TOL, GATED_NAMES)


@pytest.mark.parametrize("gate", list(GATES))
def test_triton_gated_fp16_within_twice_torch_error(gate):
    """fp16 q, k, v, do and gates (states float32): error at most twice the torch path's own fp16 error."""
    q, k, v, log_gate, log_decay, state, do, dfinal = _gated_inputs(63, gate, torch.float16)
    want = _gated_oracle(q, k, v, log_gate, log_decay, state, do, dfinal)
    got = _through_autograd("triton", q, k, v, log_gate, log_decay.float(), state, do, dfinal)
    ref = _through_autograd("torch", q, k, v, log_gate, log_decay.float(), state, do, dfinal)
    assert got[0].dtype == torch.float16 and got[6].dtype == torch.float16 and got[1].dtype == torch.float32
    for name, a, r, b in zip(GATED_NAMES, got, ref, want):
        err, ref_err = rel_err(a, b), rel_err(r, b)
        assert err <= 2 * ref_err + 1e-6 and err < FP16_TOL, f"{name}: {err:.2e} vs torch fp16 {ref_err:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# 3. the LASP-2 engine on the Triton backend (2 gloo ranks, zigzag: 2 segments of 10 tokens per rank)

def _lasp2_triton_rank(q, k, v, log_decay, do, want):
    """On one rank: LASP-2 forward/backward on the Triton backend -> (relative errors vs the oracle's shard,
    the Triton calls made). Floats only: tensors returned through the queue die with the forked rank."""
    import torch.distributed as dist

    import lasp.kernels.lightning_triton as lt
    from lasp import lasp2
    from lasp.parallel.layout import shard

    calls = []
    fwd, bwd = lt.triton_fwd, lt.triton_bwd                  # count calls: proves the engine used the kernels
    lt.triton_fwd = lambda *a, **kw: (calls.append("fwd"), fwd(*a, **kw))[1]
    lt.triton_bwd = lambda *a, **kw: (calls.append("bwd"), bwd(*a, **kw))[1]
    rank, world = dist.get_rank(), dist.get_world_size()
    local = [shard(x, "zigzag", rank, world).clone().requires_grad_() for x in (q, k, v)]
    o = lasp2(*local, log_decay=log_decay, layout="zigzag", backend="triton")
    o.backward(shard(do, "zigzag", rank, world))
    got = [o.detach()] + [x.grad for x in local]
    errors = {n: rel_err(a, shard(b, "zigzag", rank, world)) for n, a, b in zip(("o", "dq", "dk", "dv"), got, want)}
    return errors, calls


def test_lasp2_triton_backend_matches_oracle():
    q, k, v, log_decay, _, do, _ = _inputs(1, 40, 2, 16, 8, "mixed", False, torch.float32)
    ld = log_decay.float()
    want = _oracle(q, k, v, log_decay, None, do, None)
    assert rel_err(linear_attention_dense(q, k, v, ld), want[0]) < 1e-10  # the two oracles agree
    results = run_ranks(2, _lasp2_triton_rank, q, k, v, ld, do, [want[0], *want[2:5]])
    for rank, (errors, calls) in enumerate(results):
        assert calls == ["fwd", "bwd"], f"rank {rank}: Triton kernel calls {calls}"
        assert max(errors.values()) < FP32_TOL, f"rank {rank}: relative errors {errors}"


# ---------------------------------------------------------------------------------------------------------------
# 4. bad input -> ValueError naming the sizes

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q[0], k, v, None, None), r"q must be \(B, T, H, D\), got shape \(7, 2, 8\)"),
    (lambda q, k, v: (q.long(), k.long(), v.long(), None, None), "floating tensor, got torch.int64"),
    (lambda q, k, v: (q, k[..., :4], v, None, None), r"q \(1, 7, 2, 8\) and k \(1, 7, 2, 4\)"),
    (lambda q, k, v: (q, k, v[:, :5], None, None), r"v \(1, 5, 2, 4\) must share"),
    (lambda q, k, v: (q, k, v, None, torch.zeros(1, 2, 4, 8)), r"\(1, 2, 8, 4\), got \(1, 2, 4, 8\)"),
    (lambda q, k, v: (q, k, v, torch.tensor([0.0, 0.1]), None), r"<= 0"),
    (lambda q, k, v: (q, k, v, torch.zeros(3), None), r"shape \(2,\) for H=2 heads, got \(3,\)"),
])
def test_bad_input_raises(backend, make, match):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 7, 2, 8, generator=g), torch.randn(1, 7, 2, 8, generator=g), torch.randn(1, 7, 2, 4)
    q, k, v, log_decay, state = make(q, k, v)
    with pytest.raises(ValueError, match=match):
        lightning_attn(q, k, v, log_decay=log_decay, initial_state=state, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make, match", [
    (lambda g: g[:, :5], r"log_gate must be \(B, T, H\) = \(1, 7, 2\) for q \(1, 7, 2, 8\), got \(1, 5, 2\)"),
    (lambda g: g[..., None], r"\(B, T, H\) = \(1, 7, 2\) .* got \(1, 7, 2, 1\)"),
    (lambda g: g.long(), r"log_gate must be a floating tensor, got torch.int64"),
    (lambda g: g.to("meta"), r"log_gate is on meta but q is on cpu"),
    (lambda g: g.index_fill(1, torch.tensor([3]), 0.5), r"log_gate \(1, 7, 2\) must be finite and <= 0"),
    (lambda g: g.index_fill(1, torch.tensor([3]), float("nan")), r"finite and <= 0"),
    (lambda g: g.index_fill(1, torch.tensor([3]), float("-inf")), r"finite and <= 0"),
])
def test_bad_log_gate_raises(backend, make, match):
    q, k, v = torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 4)
    with pytest.raises(ValueError, match=match):
        lightning_attn(q, k, v, log_gate=make(-torch.rand(1, 7, 2)), backend=backend)


def test_triton_refuses_what_it_cannot_run(monkeypatch):
    import lasp.kernels.lightning_triton as lt
    x = torch.randn(1, 5, 2, 8)
    with pytest.raises(ValueError, match="float64.*backend='torch'"):
        lightning_attn(x.double(), x.double(), x.double(), backend="triton")
    big = torch.randn(1, 5, 1, 160)
    with pytest.raises(ValueError, match="up to 128, got d_k=160, d_v=160"):
        lt.triton_fwd(big, big, big)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        lt.triton_fwd(x, x, x, block_len=24)
    monkeypatch.setattr(lt, "_INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lt.triton_fwd(x, x, x)


# ---------------------------------------------------------------------------------------------------------------
# 5. the benchmark script's CPU smoke mode

def test_bench_smoke(tmp_path):
    import json

    from lasp.kernels import bench
    out = tmp_path / "bench.json"
    bench.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["torch_ms"] is not None for row in rows)


def test_bench_check_runs_on_cpu_and_reports_skips(tmp_path, capsys):
    """`python -m lasp.kernels.bench --check` on CPU: the accuracy of the torch linear kernel and of the CPU softmax
    kernels (fp32 < 2e-5, bf16 rows present), the launcher's flags through --dry-run, and the GPU parts listed as
    skipped, in the output and the JSON."""
    import json

    from lasp.kernels import bench
    out = tmp_path / "check.json"
    bench.main(["--check", "--out", str(out)])
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result["ok"] and result["device"] == "cpu"
    linear = [r for r in result["accuracy"] if r["case"] in bench.CHECK_CASES]
    assert {r["backend"] for r in linear} == {"torch"}
    assert {(r["case"], r["dtype"]) for r in linear} == {
        (case, dt) for case in bench.CHECK_CASES for dt in ("float32", "bfloat16")}
    assert {(r["backend"], r["dtype"]) for r in result["accuracy"] if r["case"] == "softmax causal"} == {
        (b, dt) for b in ("flash_cpu", "torch") for dt in ("float32", "bfloat16")}
    assert all(r["worst_rel_err"] < 2e-5 for r in result["accuracy"] if r["dtype"] == "float32")
    assert "--dry-run" in result["train"]["command"] and result["train"]["rc"] == 0
    for what in ("backend='triton'", "timing table", "CUDA training step"):
        assert any(what in reason for reason in result["skipped"]), what
        assert "SKIPPED: " in printed and what in printed
