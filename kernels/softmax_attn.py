"""Softmax attention of one query block against one key block -> (out, lse), tiled: no Tq × Tk tensor.

Shapes: q (B, Tq, H, D), k (B, Tk, H_kv, D), v (B, Tk, H_kv, d_v), H = G·H_kv (query head h reads KV head
h // G, the `repeat_interleave` convention); q_segment_ids (B, Tq), k_segment_ids (B, Tk) document ids or None.
out (B, Tq, H, d_v) and lse (B, Tq, H) come in the compute dtype (float32, float64 for float64 inputs).
Two shapes of block, which is all the sequence-parallel engines need:
    causal=False  every key is allowed                       (keys before a query block, or no mask at all)
    causal=True   Tq = Tk, the same tokens: key j ≤ query i  (the diagonal block, positions increasing)
and with segment ids, additionally q_seg_i = k_seg_j. Then

    s_ij = scale·q_i·k_j (allowed pairs),  lse_i = log Σ_j e^{s_ij},  out_i = Σ_j e^{s_ij − lse_i} v_j
A row with no allowed key has lse = −∞ and out = 0, never NaN. Results over disjoint key sets merge as
    lse' = logaddexp(lse, lse_b),   out' = e^{lse−lse'} out + e^{lse_b−lse'} out_b           (merge_partial)
Backward, given the FINAL out and lse over all keys (so e^{s−lse} is the true probability in every block) and
δ_i = do_i·out_i:  dv_j = Σ_i p_ij do_i,  ds_ij = p_ij (do_i·v_j − δ_i),  dq_i = scale Σ_j ds_ij k_j,
dk_j = scale Σ_i ds_ij q_i; dk, dv summed over the G query heads of a KV head. Blocks' terms add up.

Documents never become a mask: each batch row is split into runs of equal ids, and every (query run, key run)
pair of one document is one kernel call ("full", or "causal" on the diagonal run), merged by lse; pairs of
different documents, and key runs after the query run under causal, are skipped.

Backends (`resolve_softmax_backend`; None = the device's tiled kernel):
  flash_cpu   aten._scaled_dot_product_flash_attention_for_cpu and its _backward: tiles of ≤ 256 × 512 scores
              per thread, grouped K/V heads natively, float64 supported (tests run it at 1e-10). Inputs are
              computed in float32 (float64 stays float64), so 16-bit inputs accumulate out and lse in float32.
  flash_cuda  aten._scaled_dot_product_flash_attention (+ _backward) on CUDA, fp16/bf16, head dim ≤ 256: the
              flash-attention-2 kernel torch ships (grouped heads native, lse returned, backward takes the final
              out and lse, as torch's own context parallelism calls it). Chosen over FlexAttention (needs
              torch.compile, and its backward cannot take a final lse) and mem-efficient (lse padded to 32 rows).
              Its 16-bit out is widened to float32 before merging; lse is float32. NOT run in this repository's
              tests (no GPU here); None on CUDA with another dtype or head size falls back to the twin.
  torch       the dense math (masks and Tq × Tk float32 scores): the slow twin the tests compare against.
Different head dims d_k ≠ d_v are zero-padded to one (the kernels need it; zeros change no score).
"""
import torch
import torch.nn.functional as F

__all__ = ["SOFTMAX_BACKENDS", "resolve_softmax_backend", "softmax_attn_fwd", "softmax_attn_bwd", "softmax_attn",
           "merge_partial", "output_delta", "compute_dtype"]

SOFTMAX_BACKENDS = ("flash_cpu", "flash_cuda", "torch")
_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype):
    """Scores, lse and accumulators: float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_softmax_backend(backend, device, dtype=torch.float32, head_dim=64):
    """None -> flash_cpu on CPU, flash_cuda on CUDA for fp16/bf16 with head dim ≤ 256, else torch.

    ValueError naming the backend, device (and dtype / head dim) for a backend this device cannot run."""
    device = torch.device(device)
    cuda_ok = device.type == "cuda" and dtype in _HALF and head_dim <= 256
    if backend is None:
        return "flash_cpu" if device.type == "cpu" else "flash_cuda" if cuda_ok else "torch"
    if backend not in SOFTMAX_BACKENDS:
        raise ValueError(f"softmax backend must be one of {SOFTMAX_BACKENDS}, got {backend!r} (device {device})")
    if backend == "flash_cpu" and device.type != "cpu":
        raise ValueError(f"softmax backend 'flash_cpu' runs on CPU tensors only, got device {device}")
    if backend == "flash_cuda" and not cuda_ok:
        raise ValueError(f"softmax backend 'flash_cuda' needs CUDA fp16/bf16 tensors with head dim <= 256, got "
                         f"device {device}, {dtype}, head dim {head_dim}")
    return backend


def output_delta(do, out):
    """δ_i = do_i·out_i per head: (B, Tq, H) in the compute dtype (the softmax backward's row term)."""
    cdt = compute_dtype(do.dtype)
    return (do.to(cdt) * out.to(cdt)).sum(-1)


def merge_partial(out, lse, out_b, lse_b):
    """Online-softmax merge of two partial results over disjoint key sets -> (out', lse').

    When both are empty (lse = lse_b = −∞) the shift is taken as 0 so the weights are e^{−∞} = 0, not NaN."""
    new = torch.logaddexp(lse, lse_b)
    shift = torch.where(torch.isinf(new), 0.0, new)
    merged = torch.exp(lse - shift)[..., None] * out + torch.exp(lse_b - shift)[..., None] * out_b
    return merged, new


# ---------------------------------------------------------------------------------------------- dense twin
def _dense_mask(Tq, Tk, q_seg, k_seg, causal, device):
    """(B or 1, 1, 1, Tq, Tk) bool over the scores (B, H_kv, G, Tq, Tk), or None when every pair is allowed."""
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril()[None] if causal else None
    if q_seg is not None:
        same_doc = q_seg[:, :, None] == k_seg[:, None, :]
        mask = same_doc if mask is None else mask & same_doc
    return None if mask is None else mask[:, None, None]


def _dense_probs(q, k, q_seg, k_seg, causal, scale, lse=None):
    """(p (B, H_kv, G, Tq, Tk), lse (B, Tq, H)) in the compute dtype; p = 0 on rows with no allowed key."""
    cdt = compute_dtype(q.dtype)
    qg = q.unflatten(2, (k.shape[2], -1)).to(cdt)                                 # (B, Tq, H_kv, G, D)
    s = torch.einsum("bqjgd,bkjd->bjgqk", qg, k.to(cdt)) * scale
    mask = _dense_mask(q.shape[1], k.shape[1], q_seg, k_seg, causal, q.device)
    s = s if mask is None else s.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1).flatten(1, 2).transpose(1, 2)            # −∞ on empty rows
    shift = lse.transpose(1, 2).unflatten(1, (s.shape[1], s.shape[2]))[..., None]
    return torch.exp(s - torch.where(torch.isinf(shift), 0.0, shift)), lse


def _dense_fwd(q, k, v, q_seg, k_seg, causal, scale):
    p, lse = _dense_probs(q, k, q_seg, k_seg, causal, scale)
    return torch.einsum("bjgqk,bkjd->bqjgd", p, v.to(p.dtype)).flatten(2, 3), lse


def _dense_bwd(q, k, v, out, lse, do, q_seg, k_seg, causal, scale):
    p, _ = _dense_probs(q, k, q_seg, k_seg, causal, scale, lse)
    cdt, G = p.dtype, q.shape[2] // k.shape[2]
    dog = do.unflatten(2, (k.shape[2], G)).to(cdt)                                 # (B, Tq, H_kv, G, d_v)
    dv = torch.einsum("bjgqk,bqjgd->bkjd", p, dog)
    dp = torch.einsum("bqjgd,bkjd->bjgqk", dog, v.to(cdt))
    delta = output_delta(do, out).transpose(1, 2).unflatten(1, (k.shape[2], G))[..., None]
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bjgqk,bkjd->bqjgd", ds, k.to(cdt)).flatten(2, 3)
    dk = torch.einsum("bjgqk,bqjgd->bkjd", ds, q.unflatten(2, (k.shape[2], G)).to(cdt))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------- tiled kernels
def _to_kernel(tensors, dtype, head_dim):
    """(B, T, h, d) -> (B, h, T, head_dim) in `dtype`: views (no copy) unless a cast or zero-padding is needed."""
    return [(x.to(dtype) if x.shape[-1] == head_dim else F.pad(x.to(dtype), (0, head_dim - x.shape[-1])))
            .transpose(1, 2) for x in tensors]


def _kernel_dims(q, v, backend):
    """(kernel dtype, common head dim): flash_cuda keeps 16-bit and needs a multiple of 8."""
    dtype = q.dtype if backend == "flash_cuda" else compute_dtype(q.dtype)
    head_dim = max(q.shape[-1], v.shape[-1])
    return dtype, (-(-head_dim // 8) * 8 if backend == "flash_cuda" else head_dim)


def _tiled_fwd(q, k, v, causal, scale, backend):
    """One kernel call on a whole block -> (out (B, Tq, H, d_v), lse (B, Tq, H)) in the compute dtype."""
    dtype, head_dim = _kernel_dims(q, v, backend)
    qt, kt, vt = _to_kernel((q, k, v), dtype, head_dim)
    if backend == "flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, causal, scale=scale)
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False,
                                                                      scale=scale)[:2]
    cdt = compute_dtype(q.dtype)
    return out.transpose(1, 2)[..., :v.shape[-1]].to(cdt), lse.transpose(1, 2).to(cdt)


def _tiled_bwd(q, k, v, out, lse, do, causal, scale, backend):
    """One kernel call's gradients (dq, dk, dv) in the compute dtype, given the final out and lse rows."""
    dtype, head_dim = _kernel_dims(q, v, backend)
    dot, qt, kt, vt, ot = _to_kernel((do, q, k, v, out), dtype, head_dim)
    if backend == "flash_cpu":
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dot, qt, kt, vt, ot, lse.transpose(1, 2), 0.0, causal, scale=scale)
    else:                                  # dropout 0: the rng state is never read
        seed, offset = (torch.empty(s, dtype=torch.uint64, device=q.device) for s in ((2,), ()))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse.transpose(1, 2).float().contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, causal, seed, offset, scale=scale)
    cdt = compute_dtype(q.dtype)
    dq, dk, dv = (g.transpose(1, 2).to(cdt) for g in grads)
    return dq[..., :q.shape[-1]], dk[..., :k.shape[-1]], dv[..., :v.shape[-1]]


# ---------------------------------------------------------------------------------------------- documents
def _runs(ids):
    """Runs of equal ids in a 1-D tensor -> [(start, end, id)]."""
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    ends = counts.cumsum(0).tolist()
    return [(end - n, end, doc) for doc, n, end in zip(values.tolist(), counts.tolist(), ends)]


def _document_pairs(q_seg, k_seg, causal):
    """[(b, query slice, key slice, causal)]: every (query run, key run) of one document in batch row b that
    holds allowed pairs. Under causal the runs are the same tokens: a key run before the query run is full, the
    run itself is causal, a later one is skipped."""
    pairs = []                                                         # no ids here: an empty key block
    for b in range(0 if q_seg is None else q_seg.shape[0]):
        key_runs = {}
        for start, end, doc in _runs(k_seg[b]):
            key_runs.setdefault(doc, []).append((start, end))
        for qa, qb, doc in _runs(q_seg[b]):
            for ka, kb in key_runs.get(doc, ()):
                if not causal or kb <= qa or ka == qa:
                    pairs.append((b, slice(qa, qb), slice(ka, kb), causal and ka == qa))
    return pairs


def _check_block(q, k, v, q_seg, k_seg, causal):
    """ValueError naming the sizes; -> the key segment ids to use (the queries' under causal when None)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] \
            or q.shape[2] % k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"softmax_attn needs q (B, Tq, H, D), k (B, Tk, H_kv, D), v (B, Tk, H_kv, d_v) with "
                         f"H_kv | H: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal softmax_attn is the diagonal block: Tq = Tk needed, got {q.shape[1]} vs {k.shape[1]}")
    k_seg = q_seg if causal and k_seg is None else k_seg
    if (q_seg is None) != (k_seg is None):
        raise ValueError("softmax_attn: give segment ids for both queries and keys, or for neither")
    if q_seg is not None and (tuple(q_seg.shape) != tuple(q.shape[:2]) or tuple(k_seg.shape) != tuple(k.shape[:2])):
        raise ValueError(f"segment ids must be (B, Tq) = {tuple(q.shape[:2])} and (B, Tk) = {tuple(k.shape[:2])}, "
                         f"got {tuple(q_seg.shape)} and {tuple(k_seg.shape)}")
    if causal and q_seg is not None and not torch.equal(q_seg, k_seg):
        raise ValueError("causal softmax_attn is the diagonal block: queries and keys are the same tokens, so their "
                         "segment ids must be equal")
    return k_seg


def _backend_for(q, v, backend):
    return resolve_softmax_backend(backend, q.device, q.dtype, max(q.shape[-1], v.shape[-1]))


# ---------------------------------------------------------------------------------------------- public op
def _prepare_block(q, k, v, q_segment_ids, k_segment_ids, causal, scale, backend):
    """Checks shared by the forward and backward -> (k_segment_ids, backend, scale, compute dtype)."""
    k_seg = _check_block(q, k, v, q_segment_ids, k_segment_ids, causal)
    return (k_seg, _backend_for(q, v, backend), q.shape[-1] ** -0.5 if scale is None else float(scale),
            compute_dtype(q.dtype))


def softmax_attn_fwd(q, k, v, *, causal=False, scale=None, q_segment_ids=None, k_segment_ids=None, backend=None):
    """No-grad forward of one block -> (out (B, Tq, H, d_v), lse (B, Tq, H)) in the compute dtype.

    causal=True is the diagonal block (Tq = Tk, key j ≤ query i); k_segment_ids default to q's under causal.
    ValueError on mismatched sizes, or a backend the device / dtype / head dim cannot run."""
    k_seg, backend, scale, cdt = _prepare_block(q, k, v, q_segment_ids, k_segment_ids, causal, scale, backend)
    with torch.no_grad():
        if backend == "torch":
            return _dense_fwd(q, k, v, q_segment_ids, k_seg, causal, scale)
        if q_segment_ids is None and k.shape[1]:
            return _tiled_fwd(q, k, v, causal, scale, backend)
        out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=cdt)                 # rows with no key: 0, −∞
        lse = torch.full(q.shape[:3], float("-inf"), dtype=cdt, device=q.device)
        for b, qs, ks, diag in _document_pairs(q_segment_ids, k_seg, causal):
            rows = (slice(b, b + 1), qs)
            out_b, lse_b = _tiled_fwd(q[rows], k[b:b + 1, ks], v[b:b + 1, ks], diag, scale, backend)
            out[rows], lse[rows] = merge_partial(out[rows], lse[rows], out_b, lse_b)
        return out, lse


def softmax_attn_bwd(q, k, v, out, lse, do, *, causal=False, scale=None, q_segment_ids=None, k_segment_ids=None,
                     backend=None):
    """This block's gradients (dq, dk, dv) in the compute dtype, given the FINAL out and lse of the queries'
    rows (over every key block they attend to) and do. Same arguments and errors as `softmax_attn_fwd`."""
    k_seg, backend, scale, cdt = _prepare_block(q, k, v, q_segment_ids, k_segment_ids, causal, scale, backend)
    with torch.no_grad():
        if backend == "torch":
            return _dense_bwd(q, k, v, out, lse, do, q_segment_ids, k_seg, causal, scale)
        if q_segment_ids is None and k.shape[1]:
            return _tiled_bwd(q, k, v, out, lse, do, causal, scale, backend)
        dq, dk, dv = (x.new_zeros(x.shape, dtype=cdt) for x in (q, k, v))
        for b, qs, ks, diag in _document_pairs(q_segment_ids, k_seg, causal):
            rows, keys = (slice(b, b + 1), qs), (slice(b, b + 1), ks)
            dq_b, dk_b, dv_b = _tiled_bwd(q[rows], k[keys], v[keys], out[rows], lse[rows], do[rows], diag, scale,
                                          backend)
            dq[rows] += dq_b
            dk[keys] += dk_b
            dv[keys] += dv_b
        return dq, dk, dv


class _SoftmaxAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segment_ids, causal, scale, backend):
        out, lse = softmax_attn_fwd(q, k, v, causal=causal, scale=scale, q_segment_ids=segment_ids,
                                    k_segment_ids=segment_ids, backend=backend)
        ctx.save_for_backward(q, k, v, segment_ids, out, lse)
        ctx.config = dict(causal=causal, scale=scale, backend=backend)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, segment_ids, out, lse = ctx.saved_tensors
        grads = softmax_attn_bwd(q, k, v, out, lse, do.contiguous(), q_segment_ids=segment_ids, k_segment_ids=segment_ids,
                                 **ctx.config)
        return (*(g.to(q.dtype) for g in grads), None, None, None, None)


def softmax_attn(q, k, v, *, causal=True, scale=None, segment_ids=None, backend=None):
    """Softmax attention on one process, tokens in order: q (B, T, H, D), k, v (B, T, H_kv, ·) -> (B, T, H, d_v).

    Causal j ≤ i; segment_ids (B, T): also the same document; scale None = D^-1/2. Differentiable; memory O(T)."""
    return _SoftmaxAttn.apply(q, k, v, segment_ids, causal, scale, backend)
