"""kernels/softmax_attn.py: the tiled local softmax op and its dense twin against the float64 oracles.

Shapes: q (B, Tq, H, D), k (B, Tk, H_kv, D), v (B, Tk, H_kv, d_v); d_k ≠ d_v, H = 2·H_kv, lengths 37 and 300 (no
multiple of any kernel tile). Documents: one-token documents, documents cut by the block edge, and query
documents with no key at all (rows → out 0, lse −∞, zero gradients, never NaN). A dispatch mode records every
tensor the op creates: none has Tq·Tk elements at 2,048 × 8,192 (the twin does, which shows the probe works).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lasp.kernels import SOFTMAX_BACKENDS, resolve_softmax_backend, softmax_attn, softmax_attn_bwd, softmax_attn_fwd
from lasp.kernels.softmax_attn import merge_partial
from tests.dist import rel_err
from tests.oracles import softmax_attention_dense, softmax_block_dense

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
BACKENDS = ("flash_cpu", "torch")
H, H_KV, D_K, D_V = 4, 2, 8, 6


def _tensors(B, Tq, Tk, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Tq, H, D_K), (B, Tk, H_KV, D_K), (B, Tk, H_KV, D_V), (B, Tq, H, D_V))
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _documents(B, T, seed):
    """(B, T) ids: documents of 1..T/3 tokens, at least one of one token per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = [1]
        while sum(lengths) < T:
            lengths.append(int(torch.randint(1, max(2, T // 3), (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T])
    return torch.stack(rows)


def _allowed(q_seg, k_seg, Tq, Tk, causal):
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril()[None] if causal else torch.ones(1, Tq, Tk, dtype=torch.bool)
    return allowed if q_seg is None else allowed & (q_seg[:, :, None] == k_seg[:, None, :])


def _cases():
    """(name, Tq, Tk, causal, q ids, k ids): full blocks (Tq ≠ Tk) and diagonal blocks, with and without ids."""
    seg_q, seg_k = _documents(2, 37, 1), _documents(2, 300, 2) + 3       # + 3: some query documents have no key
    seg_diag = _documents(2, 300, 3)
    return [("full", 37, 300, False, None, None), ("full-docs", 37, 300, False, seg_q, seg_k),
            ("causal", 300, 300, True, None, None), ("causal-docs", 300, 300, True, seg_diag, seg_diag),
            ("causal-37-docs", 37, 37, True, seg_q, seg_q)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_forward_and_backward_match_the_oracle(backend):
    failures = []
    for i, (name, Tq, Tk, causal, q_seg, k_seg) in enumerate(_cases()):
        q, k, v, do = _tensors(2, Tq, Tk, seed=i)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = softmax_block_dense(*leaves, _allowed(q_seg, k_seg, Tq, Tk, causal), 0.3)
        ref_grads = torch.autograd.grad(ref_out, leaves, do)
        for dtype in TOL:
            args = [x.to(dtype) for x in (q, k, v)]
            kw = dict(causal=causal, scale=0.3, q_segment_ids=q_seg, k_segment_ids=k_seg, backend=backend)
            out, lse = softmax_attn_fwd(*args, **kw)
            grads = softmax_attn_bwd(*args, out, lse, do.to(dtype), **kw)
            assert out.dtype == lse.dtype == dtype and all(g.dtype == dtype for g in grads)
            empty = torch.isneginf(ref_lse)
            if not (torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
                    and all(torch.isfinite(g).all() for g in grads)):
                failures.append(f"{name} {dtype}: empty rows must give out 0, lse −∞, finite gradients")
            errs = dict(o=rel_err(out, ref_out), lse=rel_err(lse[~empty], ref_lse[~empty]),
                        **{n: rel_err(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
            bad = {n: e for n, e in errs.items() if not e < TOL[dtype]}
            if bad:
                failures.append(f"{name} {dtype}: {bad}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_merge_by_lse_and_backward_takes_the_final_lse(backend):
    """The last 37 tokens of a 100-token causal sequence: a full call on the 63 keys before them + the causal
    diagonal, merged; each call's backward with the merged out and lse; the sum is the oracle's gradient."""
    q, k, v, do = _tensors(2, 100, 100, seed=7)
    seg = _documents(2, 100, 8)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = softmax_attention_dense(*leaves, causal=True, segment_ids=seg)
    ref_grads = torch.autograd.grad(ref[:, 63:], leaves, do[:, 63:])
    rows, before = slice(63, None), slice(0, 63)
    calls = [(before, False), (rows, True)]
    kw = dict(scale=D_K ** -0.5, backend=backend)
    out, lse = torch.zeros(2, 37, H, D_V, dtype=torch.float64), torch.full((2, 37, H), -torch.inf, dtype=torch.float64)
    for keys, causal in calls:
        out_b, lse_b = softmax_attn_fwd(q[:, rows], k[:, keys], v[:, keys], causal=causal,
                                        q_segment_ids=seg[:, rows], k_segment_ids=seg[:, keys], **kw)
        out, lse = merge_partial(out, lse, out_b, lse_b)
    dq, dk, dv = torch.zeros_like(q[:, rows]), torch.zeros_like(k), torch.zeros_like(v)
    for keys, causal in calls:
        g = softmax_attn_bwd(q[:, rows], k[:, keys], v[:, keys], out, lse, do[:, rows], causal=causal,
                             q_segment_ids=seg[:, rows], k_segment_ids=seg[:, keys], **kw)
        dq += g[0]
        dk[:, keys] += g[1]
        dv[:, keys] += g[2]
    assert rel_err(out, ref[:, 63:]) < 1e-10
    for got, want in zip((dq, dk, dv), (ref_grads[0][:, rows], *ref_grads[1:])):
        assert rel_err(got, want) < 1e-10


def test_autograd_op_and_16_bit_inputs():
    """softmax_attn (one process, autograd) matches the oracle; bf16 inputs give float32 out and lse whose error
    is within twice the dense twin's (both see the same bf16-rounded inputs)."""
    q, k, v, do = _tensors(2, 300, 300, seed=9)
    seg = _documents(2, 300, 10)
    ref = softmax_attention_dense(q, k, v, causal=True, segment_ids=seg)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = softmax_attn(*leaves, segment_ids=seg)
    out.backward(do)
    oracle = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(softmax_attention_dense(*oracle, causal=True, segment_ids=seg), oracle, do)
    assert rel_err(out, ref) < 1e-10
    assert all(rel_err(x.grad, r) < 1e-10 for x, r in zip(leaves, ref_grads))
    half = [x.to(torch.bfloat16) for x in (q, k, v)]
    ref_half = softmax_attention_dense(*half, causal=True, segment_ids=seg)
    errs = {}
    for backend in BACKENDS:
        out_h, lse_h = softmax_attn_fwd(*half, causal=True, q_segment_ids=seg, backend=backend)
        assert out_h.dtype == lse_h.dtype == torch.float32
        errs[backend] = rel_err(out_h, ref_half)
    assert errs["flash_cpu"] <= 2 * errs["torch"] + 1e-6, errs


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for x in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return result


def _largest_tensor(Tq, Tk, causal, segmented, backend):
    B, heads = 1, 2
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(B, Tq, heads, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Tk, 1, 16, generator=g) for _ in range(2))
    q_seg = k_seg = None
    if segmented:                                   # documents of 1,000 tokens, cut by the block edges
        q_seg, k_seg = (torch.arange(Tk - Tq, Tk)[None] // 1000, torch.arange(Tk)[None] // 1000)
        k_seg = q_seg if causal else k_seg
    kw = dict(causal=causal, q_segment_ids=q_seg, k_segment_ids=k_seg, backend=backend)
    with _LargestTensor() as probe:
        out, lse = softmax_attn_fwd(q, k, v, **kw)
        softmax_attn_bwd(q, k, v, out, lse, do, **kw)
    return probe.largest


def test_no_tensor_of_tq_tk_elements_at_2048_by_8192():
    for causal, Tk in ((False, 8192), (True, 2048)):
        for segmented in (False, True):
            largest = _largest_tensor(2048, Tk, causal, segmented, "flash_cpu")
            assert largest < 2048 * Tk // 16, (causal, segmented, largest)
    assert _largest_tensor(256, 1024, False, False, "torch") >= 256 * 1024      # the probe sees the twin's scores


def test_backend_choice_and_bad_input():
    assert resolve_softmax_backend(None, torch.device("cpu"), torch.float32, 64) == "flash_cpu"
    assert resolve_softmax_backend(None, torch.device("cuda"), torch.bfloat16, 128) == "flash_cuda"
    assert resolve_softmax_backend(None, torch.device("cuda"), torch.float32, 128) == "torch"   # the twin, said
    assert resolve_softmax_backend(None, torch.device("cuda"), torch.bfloat16, 512) == "torch"
    assert set(BACKENDS) < set(SOFTMAX_BACKENDS)
    for backend, device, words in (("flash", "cpu", ["'flash'", "cpu"]), ("flash_cuda", "cpu", ["flash_cuda", "cpu"]),
                                   ("flash_cpu", "cuda", ["flash_cpu", "cuda"])):
        with pytest.raises(ValueError, match=".*".join(words)):
            resolve_softmax_backend(backend, torch.device(device), torch.float32, 64)
    q, k, v, _ = _tensors(1, 5, 7, seed=0)
    with pytest.raises(ValueError, match="flash_cuda.*cpu"):
        softmax_attn_fwd(q, k, v, backend="flash_cuda")
    with pytest.raises(ValueError, match="Tq = Tk.*5 vs 7"):
        softmax_attn_fwd(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"\(1, 5\).*\(1, 7\)"):
        softmax_attn_fwd(q, k, v, q_segment_ids=torch.zeros(1, 5, dtype=torch.long),
                         k_segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="equal"):
        softmax_attn_fwd(q, k[:, :5], v[:, :5], causal=True, q_segment_ids=torch.zeros(1, 5, dtype=torch.long),
                         k_segment_ids=torch.ones(1, 5, dtype=torch.long))
