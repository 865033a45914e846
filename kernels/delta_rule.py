"""`gated_delta_attn`: the (gated) delta rule of DeltaNet / Gated DeltaNet, chunked (WY/UT form) in torch.

Shapes: q, k (B, T, H_k, d_k); v, o (B, T, H, d_v); beta, log_gate (B, T, H); states (B, H, d_k, d_v) float32
(float64 for float64 inputs); H % H_k == 0 and value head h reads key/query head h // (H / H_k) (Qwen3-Next: the
value heads outnumber the key heads). segment_ids (B, T) integer document ids. Per value head, row vectors:

    S_t = e^{g_t} (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,     o_t = q_t S_t,     S_{−1} = initial_state (0 if None)

k is used as given (the model L2-normalises it), q's scale is the caller's; β ∈ [0, 2], g ≤ 0 (None: DeltaNet).
A document start t (segment_ids[t] ≠ segment_ids[t−1]) empties the state first: S_t = β_t k_tᵀ v_t. The initial
state continues the first document of each row.

Chunk form: a chunk of c tokens with b the inclusive cumsum of g inside it, Γ_ij = e^{b_i − b_j} (j ≤ i, same
document, else 0), γ_q = e^{b_i}, γ_k = e^{b_e − b_j} (0 where a later reset cuts them off), γ_e = e^{b_e} (0 if
the chunk holds a reset). With u_t = β_t (v_t − e^{g_t} k_t S_{t−1}) the state is gated linear attention on u, and
u solves one unit-lower-triangular system (I + L) U = βV − (βγ_q K) S, L_ij = β_i (k_i·k_j) Γ_ij (j < i). With
T = (I + L)^{−1}, W_v = T βV, W_k = T (βγ_q K), Kg = γ_k K, P̃ = (Q Kᵀ) ⊙ Γ, every chunk is an affine map:

    S' = A_n S + M_n,    A_n = γ_e I − Kgᵀ W_k,   M_n = Kgᵀ W_v          (d_k × d_k and d_k × d_v)
    O  = O⁰ + Q̂ S,       Q̂ = γ_q Q − P̃ W_k,       O⁰ = P̃ W_v

so a sequence is matmuls per chunk plus one d_k-square fold per chunk (no per-token loop). Backward, per chunk
with D the gradient of its leaving state: dS = Q̂ᵀ dO + A_nᵀ D (a reverse fold), then the local products below
(`_block_grads`). The engines (lasp/) use the same pieces: a segment's transition (A_r, M_r) is the fold of the
chunks' maps from [0 | I], the gradient its outputs ask of the entering state is the reverse fold from D = 0.
Only differences of float64 cumulative sums that are ≤ 0 are exponentiated; resets are masks, never log 0.
"""
import os
from dataclasses import dataclass

import torch

from .linear_attn import _blocks, _chunks, _unchunk, state_dtype

__all__ = ["gated_delta_attn", "gated_delta_attn_recurrent", "check_delta_inputs", "document_resets",
           "delta_pieces", "iter_pieces", "DeltaInputs", "delta_transition", "delta_outputs", "delta_entry_queries",
           "delta_entry_grad",
           "delta_backward", "resolve_delta_backend", "DELTA_BACKENDS"]

DELTA_BACKENDS = ("torch", "triton")
CHUNK_LEN, BLOCK_CHUNKS = 32, 32         # c = 32: 0.6x the flops of c = 64 at d = 64 (c²d vs c·d² terms)


# ------------------------------------------------------------------------------------------------ input checks
def check_delta_inputs(q, k, v, beta, log_gate=None, initial_state=None, segment_ids=None, check_values=True):
    """ValueError naming the sizes when the inputs do not fit together (see the module docstring for shapes)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, T, H, D) tensor, got {x.dtype} {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape (H_k key heads)")
    B, T, H_k, d_k = k.shape
    H = v.shape[2]
    if v.shape[:2] != (B, T) or H_k == 0 or H % H_k:
        raise ValueError(f"v {tuple(v.shape)} must share (B, T) with k {tuple(k.shape)} and have a multiple of its "
                         f"H_k = {H_k} heads (each key head serves H / H_k value heads)")
    for name, x in (("beta", beta), ("log_gate", log_gate)):
        if x is None:
            continue
        if tuple(x.shape) != (B, T, H) or not x.is_floating_point() or x.device != q.device:
            raise ValueError(f"{name} must be a floating (B, T, H) = {(B, T, H)} tensor on {q.device}, got "
                             f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if check_values and beta.numel() and not bool(((beta >= 0) & (beta <= 2)).all()):
        raise ValueError(f"beta {tuple(beta.shape)} must lie in [0, 2] (sigmoid: (0, 1); 2 allows negative "
                         f"eigenvalues), got min {beta.min().item():.3g}, max {beta.max().item():.3g}")
    if check_values and log_gate is not None and log_gate.numel() and not bool(
            (torch.isfinite(log_gate) & (log_gate <= 0)).all()):
        raise ValueError(f"log_gate {tuple(log_gate.shape)} must be finite and <= 0 (gates e^g in (0, 1])")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, d_k, v.shape[-1]):
        raise ValueError(f"initial_state must be (B, H, d_k, d_v) = {(B, H, d_k, v.shape[-1])}, "
                         f"got {tuple(initial_state.shape)}")
    if segment_ids is not None and (tuple(segment_ids.shape) != (B, T) or segment_ids.is_floating_point()
                                    or segment_ids.is_complex() or segment_ids.device != q.device):
        raise ValueError(f"segment_ids must be an integer (B, T) = {(B, T)} tensor on {q.device}, got "
                         f"{segment_ids.dtype} {tuple(segment_ids.shape)} on {segment_ids.device}")


def document_resets(segment_ids, first=None):
    """(B, T) bool: True where a document starts (the state is emptied before the token), or None.
    first (B,) bool or None: whether token 0 starts a new document (None: it continues the entering state's)."""
    if segment_ids is None:
        return None
    resets = torch.zeros(segment_ids.shape, dtype=torch.bool, device=segment_ids.device)
    resets[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if first is not None:
        resets[:, 0] = first
    return resets


# --------------------------------------------------------------------------------------------- chunk pieces
@dataclass
class DeltaInputs:
    """The op's inputs as the chunk code reads them: q, k (B, T, H_k, d_k), v (B, T, H, d_v), beta, log_gate
    (B, T, H), resets (B, T) bool or None; groups = H / H_k; sdt the compute (state) dtype."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    log_gate: torch.Tensor
    resets: torch.Tensor
    chunk_len: int = CHUNK_LEN
    block_chunks: int = BLOCK_CHUNKS

    @property
    def sdt(self):
        return state_dtype(self.k.dtype)

    @property
    def groups(self):
        return self.v.shape[2] // self.k.shape[2]

    def blocks(self):
        return _blocks(self.k.shape[1], self.chunk_len, self.block_chunks)

    def head_major(self, x, start, n, c, per_key_head=False):
        """(B, T, ·, D) or (B, T, H) -> (B, H, n, c, D) or (B, H, n, c) in sdt, key heads repeated to H."""
        vec = x.dim() == 3
        out = _chunks(x[..., None] if vec else x, start, n, c, self.sdt)
        if per_key_head and self.groups > 1:
            out = out.repeat_interleave(self.groups, dim=1)
        return out[..., 0] if vec else out


def _factors(inp, start, n, c):
    """Γ (·, n, c, c), γ_q, γ_k (·, n, c, 1), γ_e (·, n, 1, 1) in sdt and b (B, H, n, c) float64 or None."""
    dev, sdt = inp.k.device, inp.sdt
    tril = torch.ones(c, c, dtype=torch.bool, device=dev).tril()
    b = None if inp.log_gate is None else inp.head_major(inp.log_gate, start, n, c).double().cumsum(-1)
    if b is None:
        gamma, gq, gk, ge = tril.to(sdt), *(torch.ones(1, 1, 1, c, 1, dtype=sdt, device=dev),) * 2, 1.0
    else:
        gamma = (b[..., :, None] - b[..., None, :]).masked_fill(~tril, float("-inf")).exp().to(sdt)
        gq, gk = b.exp().to(sdt)[..., None], (b[..., -1:] - b).exp().to(sdt)[..., None]
        ge = b[..., -1:].exp().to(sdt)[..., None]
    if inp.resets is not None:          # a reset cuts every product that spans it: masks, never log 0
        doc = inp.resets[:, start:start + n * c].reshape(-1, 1, n, c).cumsum(-1)
        gamma = gamma * (doc[..., :, None] == doc[..., None, :]).to(sdt)
        gq = gq * (doc == 0).to(sdt)[..., None]
        gk = gk * (doc == doc[..., -1:]).to(sdt)[..., None]
        ge = ge * (doc[..., -1:] == 0).to(sdt)[..., None]
    return gamma, gq, gk, ge, b


@dataclass
class _Chunk:
    """One block of n chunks, head-major (B, H, n, ·): the WY products and the chunk maps (module docstring)."""
    K: torch.Tensor
    KK: torch.Tensor
    beta: torch.Tensor
    factors: tuple
    Tinv: torch.Tensor
    Wk: torch.Tensor
    A: torch.Tensor
    Q: torch.Tensor = None
    Wv: torch.Tensor = None
    M: torch.Tensor = None
    P: torch.Tensor = None
    Qh: torch.Tensor = None
    O0: torch.Tensor = None


def _prepare(inp, start, n, c, with_o=True):
    """The WY form of one block: T = (I + L)^{-1} by one triangular solve, W_k, W_v, the chunk maps A_n, M_n, P̃, Q̂
    and (with_o) O⁰."""
    K, beta = inp.head_major(inp.k, start, n, c, True), inp.head_major(inp.beta, start, n, c)
    factors = _factors(inp, start, n, c)
    gamma, gq, gk, ge, _ = factors
    KK = K @ K.transpose(-1, -2)
    L = (KK * gamma).mul_(beta[..., None]).tril_(-1)
    eye = torch.eye(c, dtype=inp.sdt, device=K.device)
    Tinv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False, unitriangular=True)
    Wk = Tinv @ (K * (beta[..., None] * gq))
    Kg = K * gk
    A = torch.eye(K.shape[-1], dtype=inp.sdt, device=K.device) * ge - Kg.transpose(-1, -2) @ Wk
    ch = _Chunk(K, KK, beta, factors, Tinv, Wk, A)
    ch.Wv = Tinv @ (inp.head_major(inp.v, start, n, c) * beta[..., None])
    ch.M = Kg.transpose(-1, -2) @ ch.Wv
    ch.Q = inp.head_major(inp.q, start, n, c, True)
    ch.P = (ch.Q @ K.transpose(-1, -2)).mul_(gamma)
    ch.Qh = ch.Q * gq - ch.P @ Wk
    ch.O0 = ch.P @ ch.Wv if with_o else None
    return ch


def iter_pieces(inp):
    """Block by block, the chunk maps (start, n, c, A, M, Q̂, O⁰), (B, H, n, ·) in sdt (made when asked for)."""
    for start, n, c in inp.blocks():
        ch = _prepare(inp, start, n, c)
        yield start, n, c, ch.A, ch.M, ch.Qh, ch.O0


def delta_pieces(inp):
    """Every block's chunk maps, kept: what the forward, the segment transition and the entry gradient read
    (about 4·d numbers per token and head; the engines keep them for one segment)."""
    return list(iter_pieces(inp))


# --------------------------------------------------------------------------------------------------- folds
def _fold(A, M, X):
    """X entering each chunk (B, H, n, d_k, ·) and the X leaving the last: X ← A_n X + M_n (M None: 0)."""
    entering = []
    for j in range(A.shape[2]):
        entering.append(X)
        X = A[:, :, j] @ X if M is None else torch.baddbmm(M[:, :, j].flatten(0, 1), A[:, :, j].flatten(0, 1),
                                                            X.flatten(0, 1)).view_as(X)
    return torch.stack(entering, 2), X


def _fold_back(A, R, D):
    """Reverse fold: D_n = the gradient of chunk n's leaving state (B, H, n, d_k, d_v), and the gradient of the
    block's entering state; dS_n = R_n + A_nᵀ D_n."""
    leaving = [None] * A.shape[2]
    for j in reversed(range(A.shape[2])):
        leaving[j] = D
        D = R[:, :, j] + A[:, :, j].transpose(-1, -2) @ D
    return torch.stack(leaving, 2), D


def delta_transition(pieces, keep_entering=False):
    """A segment's affine map S_out = A_r S_in + M_r from its pieces -> (A_r (B, H, d_k, d_k), M_r (B, H, d_k,
    d_v)): the chunk maps folded from [0 | I] (A_r = 0 when the segment holds a reset). keep_entering: also, per
    block, X = [M_{<n} | A_{<n}] entering each chunk (B, H, n, d_k, d_v + d_k), the map from the segment's entering
    state to each chunk's (`delta_outputs`, `delta_entry_queries`)."""
    A0 = pieces[0][3]
    B, H, _, d_k, _ = A0.shape
    d_v = pieces[0][4].shape[-1]
    X = torch.cat([A0.new_zeros(B, H, d_k, d_v), torch.eye(d_k, dtype=A0.dtype, device=A0.device).expand(
        B, H, d_k, d_k)], -1)
    entering = []
    for _, n, c, A, M, _, _ in pieces:
        E, X = _fold(A, torch.nn.functional.pad(M, (0, d_k)), X)
        entering.append(E if keep_entering else None)
    return (X[..., d_v:], X[..., :d_v]) + ((entering,) if keep_entering else ())


def delta_outputs(pieces, state, out_dtype, entering=None):
    """Outputs entering with `state` (B, H, d_k, d_v) -> (o (B, T, H, d_v) in out_dtype, final state, the state
    entering every block: a list of (B, H, d_k, d_v), all the backward keeps). With the transition's `entering`
    maps the chunk states are S_n = M_{<n} + A_{<n} S, one batched product instead of a fold (final state None)."""
    outs, saved = [], []
    for i, (_, n, c, A, M, Qh, O0) in enumerate(pieces):
        if entering is None:
            saved.append(state)
            S, state = _fold(A, M, state)
        else:
            X, d_v = entering[i], state.shape[-1]
            S = torch.matmul(X[..., d_v:], state[:, :, None]).add_(X[..., :d_v])
            saved.append(S[:, :, 0])
        outs.append(_unchunk(O0 + Qh @ S).to(out_dtype))
    return torch.cat(outs, 1), (None if entering is not None else state), saved


def delta_entry_queries(pieces, entering):
    """Q̃ = Q̂ A_{<n} per block [(start, n, c, Q̃ (B, H, n, c, d_k))]: the rows through which each output reads the
    segment's entering state (o_t = o_t⁰ + Q̃_t S_in), about d_k numbers per token and head."""
    return [(s, n, c, Qh @ X[..., -Qh.shape[-1]:]) for (s, n, c, _, _, Qh, _), X in zip(pieces, entering)]


def delta_entry_grad(queries, do):
    """dP = Σ_t A_{≤t}ᵀ q_tᵀ dO_t = Σ_t Q̃_tᵀ dO_t (B, H, d_k, d_v): what the outputs ask of the entering state."""
    dP = None
    for start, n, c, Qt in queries:
        dO = _chunks(do, start, n, c, Qt.dtype)
        part = Qt.flatten(2, 3).transpose(-1, -2) @ dO.flatten(2, 3)
        dP = part if dP is None else dP.add_(part)
    return dP


# ------------------------------------------------------------------------------------------------ backward
def _block_grads(inp, start, n, c, S_block, D_exit, do):
    """Gradients of one block given S_block (B, H, d_k, d_v), the state entering it, and D_exit, the gradient
    of the state leaving it -> ((dq, dk per key head, dv, dbeta, dlog_gate or None) in (B, n·c, ·) order, the
    gradient of the state entering it). Per chunk (U = W_v − W_k S, D the gradient of its leaving state):
      dU = P̃ᵀ dO + Kg D;  d(γ_q Q) = dO Sᵀ;  dP̃ = dO Uᵀ;  dKg = U Dᵀ;  dγ_e = <S, D>
      dX_v = Tᵀ dU, dX_k = −Tᵀ dU Sᵀ (X_v = βV, X_k = βγ_q K);  dL = −(dX_v W_vᵀ + dX_k W_kᵀ), strictly lower
    and the gate's log-derivatives collected per factor, dg = reverse cumsum of db inside the chunk."""
    ch = _prepare(inp, start, n, c, with_o=False)
    gamma, gq, gk, ge, b = ch.factors
    S = _fold(ch.A, ch.M, S_block)[0]                                             # the states entering its chunks
    dO = _chunks(do, start, n, c, inp.sdt)
    D, dS_in = _fold_back(ch.A, ch.Qh.transpose(-1, -2) @ dO, D_exit)
    K, Q, beta, Tt = ch.K, ch.Q, ch.beta[..., None], ch.Tinv.transpose(-1, -2)
    U = ch.Wv - ch.Wk @ S
    dU = ch.P.transpose(-1, -2) @ dO + (K * gk) @ D
    dQg, dKg = dO @ S.transpose(-1, -2), U @ D.transpose(-1, -2)
    dP = dO @ U.transpose(-1, -2)
    dPG = dP * gamma                                                              # dP̃ ⊙ Γ
    dXv, dXk = Tt @ dU, -(Tt @ (dU @ S.transpose(-1, -2)))
    KK = ch.KK
    dLG = (dXv @ ch.Wv.transpose(-1, -2) + dXk @ ch.Wk.transpose(-1, -2)).tril_(-1).mul_(gamma).neg_()  # dL ⊙ Γ
    dKK = dLG * beta
    dq = gq * dQg + dPG @ K
    dk = dPG.transpose(-1, -2) @ Q + gk * dKg + (beta * gq) * dXk + (dKK + dKK.transpose(-1, -2)) @ K
    V = inp.head_major(inp.v, start, n, c)
    sXk = (dXk * K).sum(-1)
    dbeta = (dLG * KK).sum(-1) + (dXv * V).sum(-1) + gq[..., 0] * sXk
    dg = None
    if b is not None:
        dGG = dP * ch.P + dKK * KK                                                # d(Γ_ij) Γ_ij
        dGG.diagonal(dim1=-2, dim2=-1).zero_()                                    # Γ_ii = 1: no gate term
        tq = ((dQg * Q).sum(-1) + ch.beta * sXk) * gq[..., 0]                     # dγ_q γ_q
        tk = (dKg * K).sum(-1) * gk[..., 0]                                       # dγ_k γ_k
        db = dGG.sum(-1).double() - dGG.sum(-2).double() + tq.double() - tk.double()
        db[..., -1] += tk.double().sum(-1) + ((S * D).sum((-1, -2)) * ge[..., 0, 0]).double()
        dg = db.flip(-1).cumsum(-1).flip(-1)
    per_key = [_per_key_head(x, inp.groups) for x in (dq, dk)]
    grads = [_unchunk(x) for x in (*per_key, beta * dXv)] + [_unchunk(x[..., None])[..., 0] for x in (dbeta, dg)
                                                              if x is not None]
    return grads, dS_in


def _per_key_head(x, groups):
    """(B, H, n, c, D) per value head -> (B, H_k, n, c, D) summed over each key head's group."""
    return x if groups == 1 else x.unflatten(1, (-1, groups)).sum(2)


def delta_backward(inp, block_states, do, dfinal=None):
    """Gradients entering with the states `block_states` (from `delta_outputs`) and leaving with dfinal (None = 0)
    -> (dq, dk, dv, dbeta, dlog_gate or None, dstate entering (B, H, d_k, d_v)), in the inputs' dtypes (the
    gate's in log_gate's). Blocks run from the last; each is prepared once (memory flat in T)."""
    B, H, d_v = inp.v.shape[0], inp.v.shape[2], inp.v.shape[-1]
    D = inp.k.new_zeros(B, H, inp.k.shape[-1], d_v, dtype=inp.sdt) if dfinal is None else dfinal.to(inp.sdt)
    out = [torch.zeros_like(x) for x in (inp.q, inp.k, inp.v, inp.beta, inp.log_gate) if x is not None]
    for (start, n, c), S in reversed(list(zip(inp.blocks(), block_states))):
        grads, D = _block_grads(inp, start, n, c, S, D, do)
        for x, g in zip(out, grads):                 # written in place: no second copy of the gradients
            x[:, start:start + n * c] = g
    return (*out[:4], out[4] if inp.log_gate is not None else None, D)


# ------------------------------------------------------------------------------------------- the op itself
class _GatedDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_gate, initial_state, resets):
        inp = DeltaInputs(q, k, v, beta, log_gate, resets)
        state = initial_state.to(inp.sdt) if initial_state is not None else q.new_zeros(
            v.shape[0], v.shape[2], k.shape[-1], v.shape[-1], dtype=inp.sdt)
        o, final, saved = delta_outputs(iter_pieces(inp), state, v.dtype)
        ctx.save_for_backward(q, k, v, beta, log_gate, resets, *saved)
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, beta, log_gate, resets, *saved = ctx.saved_tensors
        inp = DeltaInputs(q, k, v, beta, log_gate, resets)
        dq, dk, dv, dbeta, dg, ds = delta_backward(inp, saved, do, dfinal)
        ds = None if ctx.state_dtype is None else ds.to(ctx.state_dtype)
        return dq, dk, dv, dbeta, dg, ds, None


def resolve_delta_backend(backend, device):
    """None -> $LASP_KERNEL_BACKEND, else triton (fla-core) on CUDA and torch elsewhere; ValueError otherwise."""
    backend = backend or os.environ.get("LASP_KERNEL_BACKEND") or ("triton" if device.type == "cuda" else "torch")
    if backend not in DELTA_BACKENDS:
        raise ValueError(f"backend must be one of {DELTA_BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type != "cuda":
        raise ValueError(f"gated_delta_attn: backend 'triton' (fla-core's chunk_gated_delta_rule) runs on CUDA "
                         f"tensors only, got {device.type}: use backend='torch'")
    return backend


def gated_delta_attn(q, k, v, beta, *, log_gate=None, initial_state=None, output_final_state=False,
                     segment_ids=None, backend=None):
    """The (gated) delta rule -> (o (B, T, H, d_v), final state (B, H, d_k, d_v) or None).

    q, k (B, T, H_k, d_k), v (B, T, H, d_v), beta (B, T, H) in [0, 2], log_gate (B, T, H) ≤ 0 or None (DeltaNet),
    initial_state (B, H, d_k, d_v) or None, segment_ids (B, T) integer document ids or None (the state is emptied
    at each document's first token; initial_state continues the first document). Differentiable in q, k, v,
    beta, log_gate and initial_state. Raises ValueError naming the shapes on misfit inputs, beta outside [0, 2],
    a positive or non-finite log_gate, mismatched head counts, or a backend the device cannot run.
    """
    check_delta_inputs(q, k, v, beta, log_gate, initial_state, segment_ids)
    backend = resolve_delta_backend(backend, q.device)
    if backend == "triton":
        from .delta_rule_fla import fla_gated_delta_attn
        o, final = fla_gated_delta_attn(q, k, v, beta, log_gate, initial_state, segment_ids)
    else:
        o, final = _GatedDelta.apply(q, k, v, beta, log_gate, initial_state, document_resets(segment_ids))
    return o, (final if output_final_state else None)


def gated_delta_attn_recurrent(q, k, v, beta, *, log_gate=None, initial_state=None, output_final_state=False,
                               segment_ids=None):
    """Token-by-token twin of `gated_delta_attn` (same arguments, no backend), differentiable by autograd: the
    definition the tests compare the chunk form against. Slow."""
    check_delta_inputs(q, k, v, beta, log_gate, initial_state, segment_ids)
    B, T, H_k, d_k = k.shape
    H, sdt = v.shape[2], state_dtype(q.dtype)
    q, k = (x.repeat_interleave(H // H_k, dim=2).to(sdt) for x in (q, k))
    S = q.new_zeros(B, H, d_k, v.shape[-1]) if initial_state is None else initial_state.to(sdt)
    resets = document_resets(segment_ids)
    outs = []
    for t in range(T):
        if resets is not None:
            S = S * (~resets[:, t]).to(sdt)[:, None, None, None]
        if log_gate is not None:
            S = S * log_gate[:, t].to(sdt).exp()[..., None, None]
        kt, bt = k[:, t, :, :, None], beta[:, t].to(sdt)[..., None, None]                  # (B, H, d_k, 1)
        S = S - bt * kt * (kt.transpose(-1, -2) @ S) + bt * kt * v[:, t, :, None, :].to(sdt)
        outs.append((q[:, t, :, None, :] @ S)[:, :, 0])
    o = torch.stack(outs, 1) if outs else v.new_zeros(B, 0, H, v.shape[-1], dtype=sdt)
    return o.to(v.dtype), (S if output_final_state else None)
