"""Causal linear attention with per-head decay and data-dependent gates, in plain torch (runs anywhere).

Shapes: q, k (B, T, H, d_k); v, o (B, T, H, d_v); log_decay (H,) holding log λ_h ≤ 0; log_gate (B, T, H)
holding g_t ≤ 0; states (B, H, d_k, d_v) in float32 (float64 for float64 inputs). Per head, with
a_t = log λ + g_t (either may be absent) and A the inclusive cumulative sum of a:

    S_t = e^{a_t} S_{t-1} + k_tᵀ v_t,    o_t = q_t S_t,    S_{-1} = initial_state (0 if None)
    ⇔   o_i = Σ_{j≤i} e^{A_i − A_j} (q_i·k_j) v_j + e^{A_i} q_i S_{-1}

`linear_attn_chunked` is the chunkwise (Lightning Attention-2 / simple-GLA) form. Per chunk of c tokens entering
with state P, b the cumulative gate inside the chunk (b_i = Σ_{t≤i} a_t, b_e = b_{c−1}):

    O  = [(Q Kᵀ) ⊙ D] V + (Λ_q Q) P,    D_ij = e^{b_i − b_j} (i ≥ j, else 0),  (Λ_q)_i = e^{b_i}
    P' = e^{b_e} P + (Λ_k K)ᵀ V,        (Λ_k)_i = e^{b_e − b_i}

Only differences of inclusive cumulative sums with a non-positive result are exponentiated (never e^{+A}), so
strong gates underflow to 0 and nothing overflows. `linear_attn_recurrent` is the token-by-token definition,
used only as a test oracle. The `deferred_*` functions are the same forward and backward, each split in two
parts, for a caller (LASP-2) whose entering state P and exit gradient G arrive while the kernel runs.
segment_ids (B, T) (packed documents, every function's last argument): each factor above times a 0/1 mask of id
equalities, built per block (kernels/documents.py); None runs exactly the code without them.
"""
import bisect

import torch

from .documents import block_masks, check_segment_ids, chunk_keep, documents, segmented_gate_grad

__all__ = ["check_linear_attn_inputs", "state_dtype", "repeat_kv", "linear_attn_chunked",
           "linear_attn_recurrent", "chunked_forward", "chunked_backward", "gate_grad", "deferred_states",
           "deferred_outputs", "deferred_state_grads", "deferred_grads"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and decay powers are float32, or float64 when the inputs are float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_log_gate(q, log_gate, check_values):
    B, T, H, _ = q.shape
    if tuple(log_gate.shape) != (B, T, H):
        raise ValueError(f"log_gate must be (B, T, H) = {(B, T, H)} for q {tuple(q.shape)}, "
                         f"got {tuple(log_gate.shape)}")
    if not log_gate.is_floating_point():
        raise ValueError(f"log_gate must be a floating tensor, got {log_gate.dtype}")
    if log_gate.device != q.device:
        raise ValueError(f"log_gate is on {log_gate.device} but q is on {q.device}")
    if check_values and log_gate.numel() and not bool(torch.isfinite(log_gate).all() & (log_gate <= 0).all()):
        raise ValueError(f"log_gate {tuple(log_gate.shape)} must be finite and <= 0 (gates e^g in (0, 1])")


def check_linear_attn_inputs(q, k, v, log_decay=None, initial_state=None, log_gate=None, check_values=True,
                             segment_ids=None):
    """Raise ValueError naming the sizes when q, k, v, log_decay, log_gate, segment_ids (B, T) or a state do not
    fit together.

    check_values=False skips the sign/finiteness checks of log_gate (they need a host sync)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, T, H, D), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must share (B, T, H) with q {tuple(q.shape)}")
    B, _, H, d_k = q.shape
    if log_decay is not None:
        if log_decay.shape != (H,):
            raise ValueError(f"log_decay must have shape ({H},) for H={H} heads, got {tuple(log_decay.shape)}")
        if bool((log_decay > 0).any()) or not bool(torch.isfinite(log_decay).all()):
            raise ValueError(f"log_decay must be finite and <= 0 (λ = exp(log_decay) in (0, 1]), got {log_decay.tolist()}")
    if log_gate is not None:
        _check_log_gate(q, log_gate, check_values)
    if initial_state is not None and initial_state.shape != (B, H, d_k, v.shape[-1]):
        raise ValueError(f"initial_state must be (B, H, d_k, d_v) = {(B, H, d_k, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    if segment_ids is not None:
        check_segment_ids(segment_ids, q.shape[:2], q.device)


def repeat_kv(q, k, v, log_decay=None):
    """Grouped K/V heads (H_kv < H; query head i reads K/V head i // (H/H_kv)) repeated to q's H heads, with their
    decays (log_decay per K/V head, (H_kv,)) -> (k, v, log_decay) for an op that wants equal heads."""
    groups = q.shape[2] // k.shape[2]
    if groups == 1:
        return k, v, log_decay
    k, v = (x.repeat_interleave(groups, dim=2) for x in (k, v))
    return k, v, None if log_decay is None else log_decay.repeat_interleave(groups)


# ------------------------------------------------------------------------------------------- chunkwise core
def _blocks(T, chunk_len, block_chunks):
    """(start, n, c): blocks of n chunks of c tokens covering [0, T); the tail T % chunk_len is a block of its own."""
    main = T - T % chunk_len
    step = chunk_len * block_chunks
    out = [(s, min(block_chunks, (main - s) // chunk_len), chunk_len) for s in range(0, main, step)]
    return out + ([(main, 1, T - main)] if T > main else [])


def _chunks(x, start, n, c, dtype):
    """Tokens [start, start + n·c) of x (B, T, H, D) as (B, H, n, c, D) in `dtype`, contiguous."""
    B, _, H, D = x.shape
    return x[:, start:start + n * c].reshape(B, n, c, H, D).permute(0, 3, 1, 2, 4).to(dtype).contiguous()


def _unchunk(x):
    """(B, H, n, c, D) -> (B, n·c, H, D)."""
    B, H, n, c, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, n * c, H, D)


def _cum_gates(gates, log_decay, start, n, c):
    """b (·, H, ·, c) float64: the inclusive cumulative gate inside each chunk, or None (no gate). Float64 so
    that a difference b_i − b_j near 0 stays exact after b has fallen far (fp32: 1e-4 at b ≈ −1000)."""
    if gates is None and log_decay is None:
        return None
    if gates is None:                                            # constant decay: b_i = (i+1) log λ, every chunk
        i = torch.arange(1, c + 1, dtype=torch.float64, device=log_decay.device)
        return (log_decay.double()[:, None] * i)[None, :, None, :]
    B, _, H = gates.shape
    a = gates[:, start:start + n * c].double().reshape(B, n, c, H).permute(0, 3, 1, 2)
    if log_decay is not None:
        a = a + log_decay.double()[None, :, None, None]
    return a.cumsum(-1)


def _chunk_factors(b, c, dtype, device, masks=None):
    """b float64 -> (D (·,H,·,c,c), Λ_q (·,H,·,c,1), Λ_k (·,H,·,c,1) in dtype, chunk totals b_e (·,H,·) float64);
    no gate: (tril, None, None, None). The differences are taken in float64, the exponentials in dtype.
    masks (documents.BlockMasks, or None): the factors times their document masks (b None: the masks alone)."""
    causal = torch.ones(c, c, dtype=torch.bool, device=device).tril()
    if masks is not None:
        return _document_factors(b, c, dtype, causal, masks)
    if b is None:
        return causal.to(dtype), None, None, None
    mask = (b[..., :, None] - b[..., None, :]).to(dtype)           # b_i − b_j ≤ 0 for i ≥ j
    mask.masked_fill_(~causal, float("-inf")).exp_()              # the upper triangle never reaches exp
    return (mask, b.to(dtype).exp()[..., None], *_state_factors(b, dtype))


def _document_factors(b, c, dtype, causal, masks):
    """_chunk_factors with packed documents: every factor times its 0/1 mask (kernels/documents.py); D as the
    pair (D without documents, masks), which _masked applies."""
    if b is None:
        totals = torch.zeros(1, 1, 1, dtype=torch.float64, device=causal.device)
        return (causal.to(dtype), masks), masks.q, masks.k, totals
    mask = (b[..., :, None] - b[..., None, :]).to(dtype)
    mask.masked_fill_(~causal, float("-inf")).exp_()
    k_pow, totals = _state_factors(b, dtype)
    return (mask, masks), b.to(dtype).exp()[..., None] * masks.q, k_pow * masks.k, totals


def _masked(x, mask):
    """x (B, H, n, c, c) ⊙ D in place; D a tensor, or with documents (D, masks): then also ⊙ [ids_i = ids_j],
    on the few chunks where a document starts after their first token only (elsewhere the mask is 1)."""
    if isinstance(mask, tuple):
        mask, masks = mask
        return masks.mask_scores(x.mul_(mask))
    return x.mul_(mask)


def _state_factors(b, dtype, masks=None):
    """-> (Λ_k (·,H,·,c,1) = e^{b_e − b_i} in dtype, chunk totals b_e (·,H,·) float64), or (None, None).
    masks: Λ_k times [ids_i = the chunk's last id] (b None: the mask alone, totals 0)."""
    if masks is not None and b is None:
        return masks.k, torch.zeros(1, 1, 1, dtype=torch.float64, device=masks.k.device)
    if b is None:
        return None, None
    end = b[..., -1:]
    k_pow = (end - b).to(dtype).exp_()[..., None]
    return (k_pow if masks is None else k_pow * masks.k), end[..., 0]


def _masks(docs, start, n, c, chunk_len, dtype):
    """The block's document masks, or None without documents or when no document starts in the block (its
    first token included): then every mask is 1 and the block runs the plain code."""
    if docs is None:
        return None
    masks = block_masks(docs, start, n, c, chunk_len, dtype)
    return None if masks.uniform() else masks


def _scan_weights(totals, n, dtype, device, masks=None):
    """Block scan as one product: P_r = Σ_{j<r} W_rj M_j + e_r P_0, r = 0..n (row n: the state leaving the block).

    totals (·, H, n) or None; W_rj = e^{Γ_{r−1} − Γ_j}, e_r = e^{Γ_{r−1}}, Γ the inclusive cumsum (float64).
    masks: W and e times their document masks (B, 1, n+1, n), (B, 1, n+1)."""
    if totals is None:
        totals = torch.zeros(1, 1, n, dtype=torch.float64, device=device)
    G = totals.double().expand(*totals.shape[:-1], n).cumsum(-1)
    Gx = torch.nn.functional.pad(G, (1, 0))                      # Γ_{r−1}, Γ_{−1} = 0: (·, H, n+1)
    keep = torch.ones(n + 1, n, dtype=torch.bool, device=device).tril(-1)
    W = (Gx[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")).exp()
    if masks is not None:
        return W.to(dtype) * masks.scan, Gx.exp().to(dtype) * masks.entry
    return W.to(dtype), Gx.exp().to(dtype)


def _flat(x):
    """(B, H, n, c, D) -> (B·H·n, c, D), a view: every chunk one matrix of a batched product."""
    return x.view(-1, *x.shape[-2:])


def _scaled(x, powers):
    return x if powers is None else x * powers


def _entry_states(k_end, v, totals, state, masks=None):
    """P_0..P_n of a block (B, H, n+1, d_k, d_v): the states entering its n chunks, then the one leaving it.
    k_end = Λ_k K (B, H, n, c, d_k); M_j = (Λ_k K)ᵀ V per chunk."""
    B, H, n = k_end.shape[:3]
    chunk_states = torch.bmm(_flat(k_end).transpose(1, 2), _flat(v)).view(B, H, n, -1)
    W, e = _scan_weights(totals, n, k_end.dtype, k_end.device, masks)
    P = torch.matmul(W, chunk_states).add_(e[..., None] * state.flatten(-2)[:, :, None])
    return P.unflatten(-1, state.shape[-2:])


def _block_forward(q, k, v, b, state, masks=None):
    """One block, (B, H, n, c, D), entering with `state` (B, H, d_k, d_v) -> (o (B, H, n, c, d_v), state leaving).
    masks: the block's document masks or None."""
    B, H, n, c, _ = q.shape
    mask, q_pow, k_pow, totals = _chunk_factors(b, c, q.dtype, q.device, masks)
    scores = torch.bmm(_flat(q), _flat(k).transpose(1, 2))
    _masked(scores.view(B, H, n, c, c), mask)                      # [(Q Kᵀ) ⊙ D]
    o = torch.bmm(scores, _flat(v))                              # intra
    P = _entry_states(_scaled(k, k_pow), v, totals, state, masks)   # (B, H, n+1, d_k, d_v)
    o.baddbmm_(_flat(_scaled(q, q_pow)), P[:, :, :n].reshape(-1, *state.shape[-2:]))   # inter: (Λ_q Q) P_j
    return o.view(B, H, n, c, -1), P[:, :, n]


def _block_backward(q, k, v, do, b, state, dstate_out, gated, masks=None):
    """Gradients of one block given the state entering it and dstate_out, the gradient of the state leaving it
    -> (dq, dk, dv (B, H, n, c, D), gate terms, gradient of the state entering it). R_j = dL/d(state leaving
    chunk j). Gate terms (gated only, else None): (q_t·dq_t, k_t·dk_t) (B, H, n, c) without the diagonal
    (q_t·k_t)(do_t·v_t), which appears in both and does not depend on the gates (fp32 cancellation otherwise)."""
    B, H, n, c, _ = q.shape
    mask, q_pow, k_pow, totals = _chunk_factors(b, c, q.dtype, q.device, masks)
    k_end, v_end, do_dec = _scaled(k, k_pow), _scaled(v, k_pow), _scaled(do, q_pow)   # Λ_k K, Λ_k V, Λ_q dO
    P = _entry_states(k_end, v, totals, state, masks)[:, :, :n].reshape(-1, *state.shape[-2:])   # entering chunks
    # dL/dP_r: (Λ_q Q)ᵀ dO for the chunk entries r < n, dstate_out for the exit r = n; R = Wᵀ dP, dP_0 = eᵀ dP
    dP = torch.bmm(_flat(q).transpose(1, 2), _flat(do_dec)).view(B, H, n, -1)
    dP = torch.cat([dP, dstate_out.flatten(-2)[:, :, None]], dim=2)
    W, e = _scan_weights(totals, n, q.dtype, q.device, masks)
    R = torch.matmul(W.transpose(-1, -2), dP).view(-1, *state.shape[-2:])         # (B·H·n, d_k, d_v)
    dstate_in = (e[..., None] * dP).sum(2).view_as(state)
    return (*_block_grads(q, k, v, do, mask, do_dec, P, (v_end, k_end, R), gated), dstate_in)


def _block_grads(q, k, v, do, mask, do_dec, P, exits, gated):
    """dq, dk, dv (B, H, n, c, D) of one block given P (B·H·n, d_k, d_v), the states entering its chunks, and exits
    = (Λ_k V, Λ_k K, R) with R the gradients of the states leaving them. Gate terms as in _block_backward, else
    None."""
    return _exit_grads(q, k, _local_grads(q, k, v, do, mask, do_dec, P, gated), exits)


def _local_grads(q, k, v, do, mask, do_dec, P, gated):
    """The products of one block that need no exit gradient -> (dq (B·H·n, c, d_k), dk, dv without R's terms, the
    diagonal (q_t·k_t)(do_t·v_t) (B·H·n, c) gated, else None); dq lacks the diagonal's term when gated."""
    q3, k3, v3, do3 = _flat(q), _flat(k), _flat(v), _flat(do)
    B, H, n, c, _ = q.shape
    dov = torch.bmm(do3, v3.transpose(1, 2))
    _masked(dov.view(B, H, n, c, c), mask)                         # [(dO Vᵀ) ⊙ D]_ij
    diag = None
    if gated:
        diag = dov.diagonal(dim1=1, dim2=2).clone()
        dov.diagonal(dim1=1, dim2=2).zero_()
    dq = torch.bmm(dov, k3).baddbmm_(_flat(do_dec), P.transpose(1, 2))
    dk = torch.bmm(dov.transpose(1, 2), q3)
    del dov
    qk = torch.bmm(q3, k3.transpose(1, 2))
    _masked(qk.view(B, H, n, c, c), mask)                          # [(Q Kᵀ) ⊙ D]_ij
    return dq, dk, torch.bmm(qk.transpose(1, 2), do3), diag


def _exit_grads(q, k, local, exits):
    """_local_grads' products completed by exits = (Λ_k V, Λ_k K, R): dk += Λ_k V Rᵀ, dv += Λ_k K R, then the gate
    terms (q_t·dq_t, k_t·dk_t) (B, H, n, c) before the diagonal joins dq, dk -> (dq, dk, dv (B, H, n, c, D), terms
    or None)."""
    dq, dk, dv, diag = local
    B, H, n, c, _ = q.shape
    dk.baddbmm_(_flat(exits[0]), exits[2].transpose(1, 2))
    dv.baddbmm_(_flat(exits[1]), exits[2])
    terms = None
    if diag is not None:
        q3, k3 = _flat(q), _flat(k)
        terms = tuple(x.view(B, H, n, c) for x in ((q3 * dq).sum(-1), (k3 * dk).sum(-1)))
        dq.addcmul_(diag[..., None], k3)
        dk.addcmul_(diag[..., None], q3)
    shape = (B, H, n, c, -1)
    return dq.view(shape), dk.view(shape), dv.view(shape), terms


@torch.no_grad()
def chunked_forward(q, k, v, log_decay, log_gate, initial_state, chunk_len=64, block_chunks=16, segment_ids=None):
    """No-autograd forward -> (o, final state, checkpoints: the state entering every block, (n_blocks, B, H, d_k,
    d_v)). log_decay (H,), log_gate (B, T, H) and segment_ids (B, T) unchecked here; any may be None."""
    B, T, H, d_k = q.shape
    sdt, docs = state_dtype(q.dtype), documents(segment_ids, chunk_len)
    ld = None if log_decay is None else log_decay.to(device=q.device, dtype=sdt)
    state = q.new_zeros(B, H, d_k, v.shape[-1], dtype=sdt) if initial_state is None else initial_state.to(sdt)
    o = v.new_empty(B, T, H, v.shape[-1])
    checkpoints = []
    for start, n, c in _blocks(T, chunk_len, block_chunks):
        checkpoints.append(state)
        qb, kb, vb = (_chunks(x, start, n, c, sdt) for x in (q, k, v))
        ob, state = _block_forward(qb, kb, vb, _cum_gates(log_gate, ld, start, n, c), state,
                                   _masks(docs, start, n, c, chunk_len, sdt))
        o[:, start:start + n * c] = _unchunk(ob)
    return o, state, (torch.stack(checkpoints) if checkpoints else None)


def _state_pass(k, v, ld, log_gate, state, chunk_len, block_chunks, docs=None):
    """The states entering every block and the final state, without outputs (the backward's recompute)."""
    checkpoints = []
    for start, n, c in _blocks(k.shape[1], chunk_len, block_chunks):
        checkpoints.append(state)
        kb, vb = (_chunks(x, start, n, c, state.dtype) for x in (k, v))
        masks = _masks(docs, start, n, c, chunk_len, state.dtype)
        k_pow, totals = _state_factors(_cum_gates(log_gate, ld, start, n, c), state.dtype, masks)
        state = _entry_states(_scaled(kb, k_pow), vb, totals, state, masks)[:, :, n]
    return (torch.stack(checkpoints) if checkpoints else None), state


@torch.no_grad()
def chunked_backward(q, k, v, log_decay, log_gate, initial_state, do, dfinal_state=None, checkpoints=None,
                     chunk_len=64, block_chunks=16, segment_ids=None):
    """Hand-written chunkwise backward -> (dq, dk, dv, dinitial_state or None, dlog_gate or None).

    Walks the blocks from the last to the first carrying R, the gradient of the state leaving the block (from
    dS_final). checkpoints from chunked_forward, or None: recomputed by one state pass. The gate gradient:
    kernels/linear_attn.py gate_grad.
    """
    B, T, H, d_k = q.shape
    d_v, sdt, docs = v.shape[-1], state_dtype(q.dtype), documents(segment_ids, chunk_len)
    ld = None if log_decay is None else log_decay.to(device=q.device, dtype=sdt)
    state0 = q.new_zeros(B, H, d_k, d_v, dtype=sdt) if initial_state is None else initial_state.to(sdt)
    if checkpoints is None:
        checkpoints, _ = _state_pass(k, v, ld, log_gate, state0, chunk_len, block_chunks, docs)
    grad = q.new_zeros(B, H, d_k, d_v, dtype=sdt) if dfinal_state is None else dfinal_state.to(sdt)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    terms = None if log_gate is None else q.new_empty(2, B, T, H, dtype=sdt)   # q_t·dq_t, k_t·dk_t
    blocks = _blocks(T, chunk_len, block_chunks)
    for index in reversed(range(len(blocks))):
        start, n, c = blocks[index]
        qb, kb, vb, dob = (_chunks(x, start, n, c, sdt) for x in (q, k, v, do))
        b = _cum_gates(log_gate, ld, start, n, c)
        *block, grad = _block_backward(qb, kb, vb, dob, b, checkpoints[index], grad, log_gate is not None,
                                       _masks(docs, start, n, c, chunk_len, sdt))
        _store((dq, dk, dv), terms, start, block)
    dgate = _terms_gate_grad(terms, k, v, ld, log_gate, checkpoints, dfinal_state, chunk_len, block_chunks, docs)
    return dq, dk, dv, (None if initial_state is None else grad), dgate


def _store(grads, terms, start, block):
    """One block's (dq, dk, dv (B, H, n, c, D), gate terms (B, H, n, c) or None) into grads = (dq, dk, dv)
    (B, T, H, ·) and terms (2, B, T, H) or None, from token `start`."""
    stop = start + block[0].shape[2] * block[0].shape[3]
    for out, x in zip(grads, block[:3]):
        out[:, start:stop] = _unchunk(x)
    if terms is not None:
        for i, x in enumerate(block[3]):
            terms[i, :, start:stop] = x.permute(0, 2, 3, 1).flatten(1, 2)


def _terms_gate_grad(terms, k, v, ld, log_gate, checkpoints, dfinal_state, chunk_len, block_chunks, docs=None):
    """d log_gate from a backward's per-token terms (q_t·dq_t, k_t·dk_t) and dS_final (None: no final term), or
    None without a gate. docs: summed inside each document (kernels/documents.py)."""
    if terms is None:
        return None
    T, final_term = k.shape[1], None
    if dfinal_state is not None and T:
        last = _blocks(T, chunk_len, block_chunks)[-1][0], checkpoints[-1]
        final_term = _before_last_term(k, v, ld, log_gate, last, dfinal_state, chunk_len, block_chunks, docs)
    token_terms = terms[0] - terms[1]
    token_terms[:, T - 1:] = terms[0, :, T - 1:]     # the last k·dk is its final-state term only: left out
    if docs is not None:
        return segmented_gate_grad(token_terms, final_term, docs).to(log_gate.dtype)
    return gate_grad(token_terms, final_term, log_gate.dtype)


def _before_last_term(k, v, ld, log_gate, last_block, dfinal_state, chunk_len, block_chunks, docs=None):
    """e^{a_{T−1}} <S_{T−2}, dS_final> (B, H): one state pass over the last block, up to its last token (0 when
    token T−1 starts a document)."""
    start, state = last_block
    T = k.shape[1]
    part = None
    if docs is not None:        # the block's ids, entered from the id before it
        part = documents(docs.ids[:, start:T - 1], chunk_len, docs.ids[:, max(start - 1, 0)])
    before_last = _state_pass(k[:, start:T - 1], v[:, start:T - 1], ld, log_gate[:, start:T - 1], state,
                              chunk_len, block_chunks, part)[1]
    a_last = log_gate[:, T - 1].to(state.dtype) + (0 if ld is None else ld)
    term = (before_last * dfinal_state.to(state.dtype)).sum((-1, -2)) * a_last.exp()
    if docs is not None and T > 1:
        term = term * (docs.ids[:, T - 1] == docs.ids[:, T - 2]).to(term.dtype)[:, None]
    return term


def gate_grad(token_terms, final_term, dtype):
    """d a_s = Σ_{t≥s} (q_t·dq_t − k_t·dk_t) + <S_final, dS_final>: a_s scales every product spanning s, and the
    sums cancel the pairs that do not. Given without the terms that cancel exactly (so that the fp32 rounding of
    a large cancelled term cannot swamp a small gradient): token_terms (B, T, H) without the diagonal
    (q_t·k_t)(do_t·v_t) and without the last token's <k_{T−1}ᵀ v_{T−1}, dS_final>, which also leaves
    final_term (B, H) = e^{a_{T−1}} <S_{T−2}, dS_final> (None without dS_final). Sums in float64."""
    grad = token_terms.double().flip(1).cumsum(1).flip(1)
    if final_term is not None:
        grad += final_term.double()[:, None, :]
    return grad.to(dtype)


# ----------------------------------------------------- the entering state arrives during the call (LASP-2 overlap)
# LASP-2 gathers each segment's state M while its kernel runs, and only then knows P, the state entering the
# segment (and in the backward G, the gradient of the state leaving it). The kernel is linear in both: every
# chunk's entering state is P_j = P⁰_j + e^{Γ_{j−1}} P (P⁰ from a zero state, Γ the inclusive cumulative log
# decay from the sequence start, Γ_{j−1} up to the chunk's start) and every chunk's exit gradient is
# R_j = R⁰_j + e^{Γ_{T−1} − Γ_j} G. So each pass is split: (1) what the collective needs (M = the state leaving
# from zero, or dM = the gradient of the state entering from dO alone), then block by block the kernel's own
# products: a block met while the collective still flies does only those that need neither P nor G and keeps
# them, finishing once P or G is there; every later block runs whole, in cache. The products are chunked_forward's
# / chunked_backward's entering from P and leaving with G, none twice, and each block's are the same operations
# in the same order whenever P or G arrives, so the results do not depend on the collective's timing.
def _offsets(ld, log_gate, T, chunk_len):
    """(Γ before, Γ through) each of the N chunks, (1 or B, H, N) float64; None without decay and gate."""
    if ld is None and log_gate is None:
        return None
    device = (ld if log_gate is None else log_gate).device
    ends = torch.arange(1, -(-T // chunk_len) + 1, device=device).mul_(chunk_len).clamp_(max=T)   # one past
    if log_gate is None:
        through = (ends.double()[None, :] * ld.double()[:, None])[None]
    else:
        a = log_gate.double() if ld is None else log_gate.double() + ld.double()
        through = a.cumsum(1)[:, ends - 1].transpose(1, 2)
    return torch.nn.functional.pad(through[..., :-1], (1, 0)), through


def _chunk_weights(offsets, j, n, dtype, docs=None, to_end=False):
    """e^{offsets} of chunks j..j+n−1 as (·, H, n, 1, 1) in dtype, or None; docs: times the chunks' keep masks
    (kernels/documents.py chunk_keep: the entering state reaches chunk j, or with to_end chunk j's exit state
    reaches the end)."""
    weights = None if offsets is None else offsets[..., j:j + n].exp().to(dtype)[..., None, None]
    if docs is None:
        return weights
    keep = chunk_keep(docs, j, n, dtype, to_end)[..., None]
    return keep if weights is None else weights * keep


def _chunks_scaled(x, start, n, c, dtype, powers):
    """_chunks(x) · powers (·, H, n, c, 1) in one pass (the unscaled copy is not needed)."""
    if powers is None:
        return _chunks(x, start, n, c, dtype)
    B, _, H, D = x.shape
    view = x[:, start:start + n * c].reshape(B, n, c, H, D).permute(0, 3, 1, 2, 4)
    return torch.mul(view, powers, out=x.new_empty(B, H, n, c, D, dtype=dtype))


def _heads(x, start, n, c):
    """Tokens [start, start + n·c) of x (B, T, H, D) as B·H strided views (n, c, D), in the order of the chunk
    layout's (B·H·n) rows: matrices with a row stride of H·D, which the batched products take without a copy."""
    view = x[:, start:start + n * c].unflatten(1, (n, c))
    return [view[b, :, :, h] for b in range(x.shape[0]) for h in range(x.shape[2])]


def _groups(x, count):
    """(count·n, ·, ·) chunk-layout rows -> count views (n, ·, ·), one per (batch row, head)."""
    return x.view(count, -1, *x.shape[-2:]).unbind(0)


def _prepare(x, log_decay):
    return state_dtype(x.dtype), None if log_decay is None else log_decay.to(x.device, state_dtype(x.dtype))


def _spans(x, v, chunk_len, block_chunks):
    """Spans of whole blocks (as _blocks) and a locator chunk index -> (span, offset in it). A span holds about
    2^19 floats of one (B, H, ·, d) tensor (2 MiB fp32): with few heads or small d a block of 16 chunks is too
    little work per call, while larger spans leave the caches. Per-chunk tensors live per span, each a heap-sized
    allocation reused from call to call (one (B, H, N, ·, ·) tensor of 32 MiB or more would be a fresh mmap,
    its pages faulting in at every call)."""
    B, T, H, _ = x.shape
    per_chunk = B * H * max(x.shape[-1], v.shape[-1]) * chunk_len
    span_chunks = block_chunks * min(16, max(1, 2 ** 19 // (per_chunk * block_chunks)))
    spans = _blocks(T, chunk_len, span_chunks)
    firsts = [start // chunk_len for start, _, _ in spans]
    return spans, lambda j: (bisect.bisect_right(firsts, j) - 1, j - firsts[bisect.bisect_right(firsts, j) - 1])


def _entry_powers(log_gate, ld, start, n, c, dtype, masks=None):
    """Λ_q = e^{b_i} (·, H, n, c, 1) of chunks [start, start + n·c), or None (no decay, no gate); masks: times
    the document mask (alone without decay and gate)."""
    b = _cum_gates(log_gate, ld, start, n, c)
    if masks is not None:
        return masks.q if b is None else b.to(dtype).exp()[..., None] * masks.q
    return None if b is None else b.to(dtype).exp()[..., None]


@torch.no_grad()
def deferred_states(k, v, log_decay, log_gate, chunk_len=64, block_chunks=16, segment_ids=None):
    """Forward part 1 -> (M (B, H, d_k, d_v), [P⁰ (B, H, n, d_k·d_v) per block of _blocks]): the state leaving and
    the states entering the chunks, from a zero state."""
    B, T, H, d_k = k.shape
    sdt, ld = _prepare(k, log_decay)
    docs = documents(segment_ids, chunk_len)
    state, v = k.new_zeros(B, H, d_k * v.shape[-1], dtype=sdt), v.to(sdt)
    entries = []
    for start, n, c in _spans(k, v, chunk_len, block_chunks)[0]:
        k_pow, totals = _state_factors(_cum_gates(log_gate, ld, start, n, c), sdt,
                                       _masks(docs, start, n, c, chunk_len, sdt))
        k_end = _groups(_flat(_chunks_scaled(k, start, n, c, sdt, k_pow)), B * H)
        chunk_states = k.new_empty(B * H, n, d_k, v.shape[-1], dtype=sdt)
        for a, vb, out in zip(k_end, _heads(v, start, n, c), chunk_states):
            torch.bmm(a.transpose(1, 2), vb, out=out)
        chunk_states = chunk_states.view(B, H, n, -1)
        for j in range(0, n, block_chunks):                      # the scan, block by block
            m = min(block_chunks, n - j)
            block_totals = None if totals is None or totals.shape[-1] == 1 else totals[..., j:j + m]
            W, e = _scan_weights(totals if block_totals is None else block_totals, m, sdt, k.device,
                                 _masks(docs, start + j * c, m, c, chunk_len, sdt))
            entries.append(torch.matmul(W[..., :m, :], chunk_states[:, :, j:j + m]).add_(e[..., :m, None] *
                                                                                         state[:, :, None]))
            state = torch.matmul(W[..., m:, :], chunk_states[:, :, j:j + m])[:, :, 0].add_(e[..., m, None] * state)
    return state.view(B, H, d_k, -1), entries


@torch.no_grad()
def deferred_outputs(q, k, v, log_decay, log_gate, entries, entering, chunk_len=64, block_chunks=16,
                     segment_ids=None):
    """Forward part 2 -> (o (B, T, H, d_v), the states entering the blocks as chunked_forward's checkpoints
    (n_blocks, B, H, d_k, d_v) or None): block by block o = [(Q Kᵀ) ⊙ D] V + (Λ_q Q) P_j. entering(wait) gives the
    state P entering the sequence (B, H, d_k, d_v), or None while it is not there and wait is False; blocks met
    before it keep their intra-chunk products. When it comes, P_j = P⁰_j + e^{Γ_{j−1}} P (entries, in place)."""
    B, T, H, d_k = q.shape
    sdt, ld = _prepare(q, log_decay)
    offsets, docs = _offsets(ld, log_gate, T, chunk_len), documents(segment_ids, chunk_len)
    o = v.new_empty(B, T, H, v.shape[-1])
    blocks, waiting, state = _blocks(T, chunk_len, block_chunks), [], None

    def finish(index, qb, scores, q_pow):        # the block's inter products (Λ_q Q) P_j, then o's rows
        start, n, c = blocks[index]
        qb = _chunks_scaled(q, start, n, c, sdt, q_pow) if qb is None else _scaled(qb, q_pow)
        scores.baddbmm_(_flat(qb), entries[index].view(-1, d_k, v.shape[-1]))
        o[:, start:start + n * c] = _unchunk(scores.view(B, H, n, c, -1))

    def arrive(P):                               # every P_j, then the blocks that waited for it
        _enter(entries, blocks, offsets, P, chunk_len, sdt, docs)
        for args in waiting:
            finish(*args)
        waiting.clear()

    for index, (start, n, c) in enumerate(blocks):
        if state is None and (state := entering(False)) is not None:
            arrive(state)
        qb, kb, vb = (_chunks(x, start, n, c, sdt) for x in (q, k, v))
        mask, q_pow = _chunk_factors(_cum_gates(log_gate, ld, start, n, c), c, sdt, q.device,
                                     _masks(docs, start, n, c, chunk_len, sdt))[:2]
        scores = torch.bmm(_flat(qb), _flat(kb).transpose(1, 2))
        _masked(scores.view(B, H, n, c, c), mask)
        intra = torch.bmm(scores, _flat(vb))
        if state is None:
            waiting.append((index, None, intra, q_pow))     # q read again at the finish: less to keep
        else:
            finish(index, qb, intra, q_pow)
    if state is None:
        arrive(entering(True))
    return o, (torch.stack([P[:, :, 0].view(B, H, d_k, -1) for P in entries]) if entries else None)


def _enter(entries, blocks, offsets, state, chunk_len, dtype, docs=None):
    """P_j = P⁰_j + e^{Γ_{j−1}} P for every chunk, in place (entries (B, H, n, d_k·d_v) per block)."""
    state = state.to(dtype).flatten(-2)[:, :, None]
    for (start, n, _), P in zip(blocks, entries):
        weights = _chunk_weights(None if offsets is None else offsets[0], start // chunk_len, n, dtype, docs)
        P.add_(state if weights is None else weights[..., 0] * state)


@torch.no_grad()
def deferred_state_grads(q, do, log_decay, log_gate, chunk_len=64, block_chunks=16, segment_ids=None):
    """Backward part 1 -> (dM (B, H, d_k, d_v), [dP (B, H, n, d_k, d_v) per span]): dP_j = (Λ_q Q_j)ᵀ dO_j and
    dM = Σ_j e^{Γ_{j−1}} dP_j, the gradient of the state entering the sequence from dO alone."""
    B, T, H, d_k = q.shape
    sdt, ld = _prepare(q, log_decay)
    offsets, docs = _offsets(ld, log_gate, T, chunk_len), documents(segment_ids, chunk_len)
    dstate, dP, q_state = q.new_zeros(B, H, d_k, do.shape[-1], dtype=sdt), [], q.to(sdt)
    for start, n, c in _spans(q, do, chunk_len, block_chunks)[0]:
        masks = _masks(docs, start, n, c, chunk_len, sdt)
        do_dec = _chunks_scaled(do, start, n, c, sdt, _entry_powers(log_gate, ld, start, n, c, sdt, masks))
        dP.append(q.new_empty(B, H, n, d_k, do.shape[-1], dtype=sdt))
        heads = zip(_groups(_flat(dP[-1]), B * H), _heads(q_state, start, n, c), _groups(_flat(do_dec), B * H))
        for out, a, do_head in heads:
            torch.bmm(a.transpose(1, 2), do_head, out=out)
        weights = _chunk_weights(None if offsets is None else offsets[0], start // chunk_len, n, sdt, docs)
        dstate += (dP[-1] if weights is None else dP[-1] * weights).sum(2)
    return dstate, dP


@torch.no_grad()
def deferred_grads(q, k, v, do, log_decay, log_gate, checkpoints, dP, leaving, chunk_len=64, block_chunks=16,
                   segment_ids=None):
    """Backward part 2, from the states entering the blocks (deferred_outputs' checkpoints) and part 1's dP ->
    (dq, dk, dv, d log_gate or None) as chunked_backward gives them. Blocks from the last to the first: R⁰_j
    from dP's reverse scan, R_j = R⁰_j + e^{Γ_{T−1} − Γ_j} G. leaving(wait) gives G, the gradient of the state
    leaving the sequence (B, H, d_k, d_v), or None while it is not there and wait is False; blocks met before it
    keep the products that need no R (_local_grads) and take R's once it comes."""
    B, T, H, d_k = q.shape
    d_v = v.shape[-1]
    sdt, ld = _prepare(q, log_decay)
    offsets, docs = _offsets(ld, log_gate, T, chunk_len), documents(segment_ids, chunk_len)
    to_end = None if offsets is None else offsets[1][..., -1:] - offsets[1]              # Γ_{T−1} − Γ_j ≤ 0
    grad = q.new_zeros(B, H, d_k * d_v, dtype=sdt)         # gradient of the state leaving the block, from dO alone
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    terms = None if log_gate is None else q.new_empty(2, B, T, H, dtype=sdt)   # q_t·dq_t, k_t·dk_t
    blocks, locate = _blocks(T, chunk_len, block_chunks), _spans(q, v, chunk_len, block_chunks)[1]
    waiting, G = [], None

    def finish(index, chunks, k_pow, R0, local):     # R's products, then the block's rows of dq, dk, dv
        start, n, c = blocks[index]
        qb, kb, vb = chunks or (_chunks(x, start, n, c, sdt) for x in (q, k, v))
        weights = _chunk_weights(to_end, start // chunk_len, n, sdt, docs, to_end=True)
        R = R0.add_(G if weights is None else weights[..., 0] * G).view(-1, d_k, d_v)
        _store((dq, dk, dv), terms, start, _exit_grads(qb, kb, local, (_scaled(vb, k_pow), _scaled(kb, k_pow), R)))

    def arrive(value):                           # G is there: the blocks that waited for it
        nonlocal G
        G = value.to(sdt).flatten(-2)[:, :, None]
        for args in waiting:
            finish(*args)
        waiting.clear()

    for index in reversed(range(len(blocks))):
        if G is None and (value := leaving(False)) is not None:
            arrive(value)
        start, n, c = blocks[index]
        i, j = locate(start // chunk_len)
        qb, kb, vb, dob = (_chunks(x, start, n, c, sdt) for x in (q, k, v, do))
        masks = _masks(docs, start, n, c, chunk_len, sdt)
        mask, q_pow, k_pow, totals = _chunk_factors(_cum_gates(log_gate, ld, start, n, c), c, sdt, q.device, masks)
        P = _entry_states(_scaled(kb, k_pow), vb, totals, checkpoints[index], masks)[:, :, :n].reshape(-1, d_k, d_v)
        W, e = _scan_weights(totals, n, sdt, q.device, masks)
        dPx = torch.cat([dP[i][:, :, j:j + n].flatten(-2), grad[:, :, None]], dim=2)
        grad = (e[..., None] * dPx).sum(2)
        R0 = torch.matmul(W.transpose(-1, -2), dPx)                                         # (B, H, n, d_k·d_v)
        local = _local_grads(qb, kb, vb, dob, mask, _scaled(dob, q_pow), P, terms is not None)
        if G is None:
            waiting.append((index, None, k_pow, R0, local))   # q, k, v read again at the finish: less to keep
        else:
            finish(index, (qb, kb, vb), k_pow, R0, local)
    if G is None:
        arrive(leaving(True))
    dgate = _terms_gate_grad(terms, k, v, ld, log_gate, checkpoints, G[:, :, 0].view(B, H, d_k, d_v), chunk_len,
                             block_chunks, docs)
    return dq, dk, dv, dgate


class _ChunkedLinearAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, log_gate, initial_state, chunk_len, block_chunks, segment_ids):
        o, final, checkpoints = chunked_forward(q, k, v, log_decay, log_gate, initial_state, chunk_len, block_chunks,
                                                segment_ids)
        ctx.save_for_backward(q, k, v, log_decay, log_gate, initial_state, checkpoints, segment_ids)
        ctx.sizes = chunk_len, block_chunks
        ctx.set_materialize_grads(False)                          # an unused final state costs nothing
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, log_decay, log_gate, initial_state, checkpoints, segment_ids = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        grads = chunked_backward(q, k, v, log_decay, log_gate, initial_state, do, dfinal, checkpoints, *ctx.sizes,
                                 segment_ids=segment_ids)
        dq, dk, dv, dstate, dgate = grads
        return dq, dk, dv, None, dgate, dstate, None, None, None


def linear_attn_chunked(q, k, v, log_decay=None, initial_state=None, chunk_len=64, *, log_gate=None,
                        block_chunks=16, segment_ids=None):
    """Chunked causal linear attention -> (o (B, T, H, d_v) in q's dtype, final state (B, H, d_k, d_v)).

    Any T: the last partial chunk is a block of its own. Arithmetic in the state dtype. The chunk scan runs in
    blocks of `block_chunks` chunks, each block's states from one batched product. Differentiable (q, k, v,
    log_gate, initial_state; log_decay is a constant) through the hand-written chunkwise backward.
    segment_ids (B, T): packed documents, the state emptied at each one's first token (kernels/documents.py).
    """
    check_linear_attn_inputs(q, k, v, log_decay, initial_state, log_gate, segment_ids=segment_ids)
    if log_decay is not None:
        log_decay = log_decay.detach()
    return _ChunkedLinearAttn.apply(q, k, v, log_decay, log_gate, initial_state, chunk_len, block_chunks,
                                    segment_ids)


def linear_attn_recurrent(q, k, v, log_decay=None, initial_state=None, log_gate=None, segment_ids=None):
    """Token-by-token recurrence S_t = e^{a_t} S_{t-1} + k_tᵀ v_t, o_t = q_t S_t (S_{t−1} = 0 when token t starts
    a document of segment_ids). Slow; a test oracle only."""
    check_linear_attn_inputs(q, k, v, log_decay, initial_state, log_gate, segment_ids=segment_ids)
    B, T, H, d_k = q.shape
    sdt = state_dtype(q.dtype)
    ld = torch.zeros(H, dtype=sdt) if log_decay is None else log_decay.to(sdt).cpu()
    ld = ld.to(q.device).view(1, H)
    S = q.new_zeros(B, H, d_k, v.shape[-1], dtype=sdt) if initial_state is None else initial_state.to(sdt)
    outs = []
    for t in range(T):
        a = ld if log_gate is None else ld + log_gate[:, t].to(sdt)
        if segment_ids is not None and t > 0:
            S = S * (segment_ids[:, t] == segment_ids[:, t - 1]).to(sdt)[:, None, None, None]
        S = torch.exp(a)[:, :, None, None] * S + k[:, t, :, :, None].to(sdt) * v[:, t, :, None, :].to(sdt)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(sdt), S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=sdt)
    return o.to(q.dtype), S
