"""Triton kernels for causal linear attention with per-head decay (Lightning Attention-2 style).

Shapes: q, k, dq, dk (B, T, H, d_k); v, o, do, dv (B, T, H, d_v); log_decay (H,) holding log λ_h ≤ 0 or None;
log_gate (B, T, H) ≤ 0 or None; states (B, H, d_k, d_v) float32. Semantics (kernels/linear_attn.py):
S_t = e^{a_t} S_{t-1} + k_tᵀ v_t, o_t = q_t S_t with a_t = log λ + g_t.

One program owns one (batch row, head, block of d_v columns) and walks the sequence in blocks of c ≤ BT
tokens, carrying the float32 state P (d_k × BV) in registers. Per block (i, j are positions inside it):

    forward   O  = [(Q Kᵀ) ⊙ D] V + (Λ_q Q) P        D_ij = λ^{i-j} (i ≥ j) else 0,  (Λ_q)_i = λ^{i+1}
              P ← λ^c P + (Λ_k K)ᵀ V                 (Λ_k)_i = λ^{c-1-i}
    dq pass   dQ = [(dO Vᵀ) ⊙ D] K + (Λ_q dO) Pᵀ      same P recurrence, forward in T
    dk/dv     dK = [(dO Vᵀ) ⊙ D]ᵀ Q + (Λ_k V) Rᵀ      R = gradient of the state leaving the block,
    pass      dV = [(Q Kᵀ) ⊙ D]ᵀ dO + (Λ_k K) R       walked backward in T from R = dS_final:
              R ← λ^c R + (Λ_q Q)ᵀ dO                 after the first block, R = d(initial_state)

With log_gate, the block's gates a_t = g_t + log λ (0 on masked rows) replace the powers of λ: D_ij =
e^{Σ_{j<t≤i} a_t} (i ≥ j), λ^{i+1} → e^{b_i} (b = cumsum(a)), λ^{c-1-i} → e^{Σ_{t>i} a_t}, λ^c → e^{b_e}. The
segment sums are summed over their own segment (a 0/1 product, a masked row sum), never taken as differences of
cumulative sums (fp32 would lose 3e-5 of a weight ≈ 1 after strong gates). d log_gate = reverse cumsum over T of
q_t·dq_t − k_t·dk_t plus <S_final, dS_final>, taken without the terms that cancel exactly (gate_grad in
kernels/linear_attn.py): the kernel writes those per-token terms and e^{a_{T−1}} S_{T−2}.
Without gates, decay powers come from exp(n·log λ) with n ≥ 0 only (exponents are clamped, the upper triangle is
selected away), so λ^n underflows to 0 for strong decays and never produces inf·0 = NaN; there is no cumulative
sum of log-decays. The tail block (T not a multiple of BT) is masked: loads give 0 outside [0, T), stores are
masked, and its length c enters λ^c and Λ_k. Head dims are padded to powers of two (≥ 16, the smallest tl.dot tile)
with masks. A d_v block needs all of d_k, so dq and dk are partial sums over the d_v blocks: each program
writes its float32 partial and the launcher adds them.

All arithmetic is float32 after each load; outputs are stored in the input dtype, states in float32. On CUDA,
fp32 inputs use exact ("ieee") dot products, fp16/bf16 inputs use tf32 dot products (error ≈ 2^-11, below the
2^-9 rounding of a bf16 output). float64 inputs are refused: use backend="torch".
Packed documents (segment_ids (B, T) int, non-decreasing): each block loads its ids, the id before it and its
last id, and multiplies D by [ids_i = ids_j], Λ_q by [ids_i = id before], Λ_k by [ids_i = last id] and the block
decay by [last id = id before] (kernels/documents.py): a reset is a 0 in the factors, never a log 0 in a sum. The
gate gradient is then summed per document on the host (documents.segmented_gate_grad).
Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors.
"""
import triton
import triton.language as tl
import torch

from .documents import documents, segmented_gate_grad
from .linear_attn import check_linear_attn_inputs, gate_grad

__all__ = ["triton_fwd", "triton_bwd"]

_INTERPRET = bool(triton.knobs.runtime.interpret)  # read when @triton.jit below runs: fixes how kernels execute
MAX_HEAD_DIM = 128


@triton.jit
def _block_decays(ld, rt, c, BT: tl.constexpr):
    """For a block of c valid rows: D (BT, BT), λ^{i+1} (BT,), λ^{c-1-i} (BT,), λ^c (scalar). All float32."""
    gap = rt[:, None] - rt[None, :]
    decay_mask = tl.where(gap >= 0, tl.exp(ld * tl.maximum(gap, 0).to(tl.float32)), 0.0)
    q_pow = tl.exp(ld * (rt + 1).to(tl.float32))
    k_pow = tl.exp(ld * tl.maximum(c - 1 - rt, 0).to(tl.float32))  # rows ≥ c are zero-loaded anyway
    return decay_mask, q_pow, k_pow, tl.exp(ld * c.to(tl.float32))


@triton.jit
def _gated_block_decays(a, rt):
    """a (BT,) log gates of a block, 0 on rows past its end -> D, e^{b_i}, e^{b_e − b_i}, e^{b_e}; b = cumsum(a).

    b_i − b_j and b_e − b_i are summed over their own segment (j, i], (i, e] — one 0/1 product for D — never
    subtracted: after strong gates b ≈ −300 and fp32 b_i − b_j would be off by 3e-5 where the weight is ≈ 1."""
    gap = rt[:, None] - rt[None, :]
    upto = (gap >= 0).to(tl.float32)                                      # [i, t]: t ≤ i
    after = (gap < 0).to(tl.float32)                                      # [j, t]: t > j
    segment = tl.dot(upto, tl.trans(after * a[None, :]), input_precision="ieee")   # [i, j]: Σ_{j<t≤i} a_t
    decay_mask = tl.where(gap >= 0, tl.exp(tl.where(gap >= 0, segment, 0.0)), 0.0)
    to_end = tl.sum(after * a[None, :], 1)                                # Σ_{t>i} a_t = b_e − b_i
    b_end = tl.sum(a, 0)
    return decay_mask, tl.exp(tl.cumsum(a, 0)), tl.exp(to_end), tl.exp(b_end)


@triton.jit
def _decays(LOG_GATE, g_base, ld, rows, mt, rt, c, H, HAS_GATE: tl.constexpr, BT: tl.constexpr):
    """The block's (D, Λ_q, Λ_k, block decay): from the gates when HAS_GATE, else from the constant log λ."""
    if HAS_GATE:
        a = tl.load(LOG_GATE + g_base + rows * H, mask=mt, other=0.0).to(tl.float32)
        return _gated_block_decays(tl.where(mt, a + ld, 0.0), rt)
    else:
        return _block_decays(ld, rt, c, BT)


@triton.jit
def _document_masks(SEG, seg_base, rows, mt, start, c, decay_mask, q_pow, k_pow, block_pow):
    """The block's factors times their document masks: a reset at t zeroes every factor spanning it."""
    ids = tl.load(SEG + seg_base + rows, mask=mt, other=0)
    prev = tl.load(SEG + seg_base + tl.maximum(start - 1, 0))           # block 0: its own first id
    last = tl.load(SEG + seg_base + start + c - 1)
    decay_mask = tl.where(ids[:, None] == ids[None, :], decay_mask, 0.0)
    return (decay_mask, tl.where(ids == prev, q_pow, 0.0), tl.where(ids == last, k_pow, 0.0),
            tl.where(last == prev, block_pow, 0.0))


@triton.jit
def _fwd_kernel(Q, K, V, LOG_DECAY, LOG_GATE, S0, O, SF, SEG, T, H, DK, DV,
                HAS_DECAY: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INIT: tl.constexpr, PRECISION: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_SEG: tl.constexpr = False):
    """Grid (d_v blocks, B·H). Q, K (B, T, H, DK); V, O (B, T, H, DV); LOG_GATE (B, T, H); S0, SF (B, H, DK, DV);
    SEG (B, T) int64 document ids (HAS_SEG)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)            # int64: B·T·H·D offsets exceed 2^31 at long T
    h = bh % H
    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    ld = 0.0
    if HAS_DECAY:
        ld = tl.load(LOG_DECAY + h).to(tl.float32)
    # row t of head h in batch row b sits at ((b·T + t)·H + h)·D: base (b·T·H + h)·D, row stride H·D
    q_base = Q + ((bh // H) * T * H + h) * DK
    k_base = K + ((bh // H) * T * H + h) * DK
    v_base = V + ((bh // H) * T * H + h) * DV
    o_base = O + ((bh // H) * T * H + h) * DV
    g_base = (bh // H) * T * H + h                 # gate of row t at g_base + t·H
    s_off = bh * DK * DV + rk[:, None] * DV + rv[None, :]
    s_mask = mk[:, None] & mv[None, :]
    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(S0 + s_off, mask=s_mask, other=0.0).to(tl.float32)
    for start in range(0, T, BT):
        rows = start + rt
        mt = rows < T
        c = tl.minimum(T - start, BT)
        decay_mask, q_pow, k_pow, block_pow = _decays(LOG_GATE, g_base, ld, rows, mt, rt, c, H, HAS_GATE, BT)
        if HAS_SEG:
            decay_mask, q_pow, k_pow, block_pow = _document_masks(SEG, (bh // H) * T, rows, mt, start, c, decay_mask,
                                                                  q_pow, k_pow, block_pow)
        qk_mask = mt[:, None] & mk[None, :]
        v_mask = mt[:, None] & mv[None, :]
        q = tl.load(q_base + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_base + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * (H * DV) + rv[None, :], mask=v_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay_mask                 # (BT, BT)
        o = tl.dot(scores, v, input_precision=PRECISION)                                         # intra
        o += tl.dot(q, state, input_precision=PRECISION) * q_pow[:, None]                        # inter
        tl.store(o_base + rows[:, None] * (H * DV) + rv[None, :], o.to(O.dtype.element_ty), mask=v_mask)
        # P ← λ^c P + (Λ_k K)ᵀ V = λ^c P + Kᵀ (Λ_k V): the diagonal scaling goes on the narrower operand
        state = state * block_pow + tl.dot(tl.trans(k), v * k_pow[:, None], input_precision=PRECISION)
    tl.store(SF + s_off, state, mask=s_mask)


@triton.jit
def _bwd_kernel(Q, K, V, DO, LOG_DECAY, LOG_GATE, S0, DSF, DQP, DKP, DV_OUT, DS0, SF, TERMS, SEG, T, H, DK, DV,
                HAS_DECAY: tl.constexpr, HAS_GATE: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr,
                PRECISION: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_SEG: tl.constexpr = False):
    """Grid (d_v blocks, B·H). DQP, DKP (NV, B, T, H, DK) float32 partials; DV_OUT (B, T, H, DV); DS0 like S0;
    Gated: TERMS (NV, B, T, H) float32 receives q_t·dq_t − k_t·dk_t without the gate-free terms (the diagonal
    (q_t·k_t)(do_t·v_t); the last token's <k_tᵀ v_t, dS_final>), SF (with dS_final) e^{a_{T−1}} S_{T−2}: the
    inputs of gate_grad (kernels/linear_attn.py)."""
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    h = bh % H
    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    ld = 0.0
    if HAS_DECAY:
        ld = tl.load(LOG_DECAY + h).to(tl.float32)
    qk_off = ((bh // H) * T * H + h) * DK
    v_off = ((bh // H) * T * H + h) * DV
    g_base = (bh // H) * T * H + h
    part_off = iv.to(tl.int64) * (tl.num_programs(1) // H) * T * H * DK   # this d_v block's partial slab
    terms_off = iv.to(tl.int64) * (tl.num_programs(1) // H) * T * H + g_base
    s_off = bh * DK * DV + rk[:, None] * DV + rv[None, :]
    s_mask = mk[:, None] & mv[None, :]

    # dq pass, forward in T: dQ = [(dO Vᵀ) ⊙ D] K + (Λ_q dO) Pᵀ, P the state entering the block
    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_INIT:
        state = tl.load(S0 + s_off, mask=s_mask, other=0.0).to(tl.float32)
    before_last = tl.zeros((BK, BV), dtype=tl.float32)
    for start in range(0, T, BT):
        rows = start + rt
        mt = rows < T
        c = tl.minimum(T - start, BT)
        decay_mask, q_pow, k_pow, block_pow = _decays(LOG_GATE, g_base, ld, rows, mt, rt, c, H, HAS_GATE, BT)
        if HAS_SEG:
            decay_mask, q_pow, k_pow, block_pow = _document_masks(SEG, (bh // H) * T, rows, mt, start, c, decay_mask,
                                                                  q_pow, k_pow, block_pow)
        qk_mask = mt[:, None] & mk[None, :]
        v_mask = mt[:, None] & mv[None, :]
        k = tl.load(K + qk_off + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(V + v_off + rows[:, None] * (H * DV) + rv[None, :], mask=v_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + v_off + rows[:, None] * (H * DV) + rv[None, :], mask=v_mask, other=0.0).to(tl.float32)
        dov = tl.dot(do, tl.trans(v), input_precision=PRECISION) * decay_mask                   # [i, j]
        if HAS_GATE:                                     # the diagonal joins dq after q_t·dq_t is taken
            dov = tl.where(rt[:, None] > rt[None, :], dov, 0.0)
        dq = tl.dot(dov, k, input_precision=PRECISION)
        dq += tl.dot(do * q_pow[:, None], tl.trans(state), input_precision=PRECISION)
        if HAS_GATE:
            q = tl.load(Q + qk_off + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
            tl.store(TERMS + terms_off + rows * H, tl.sum(q * dq, 1), mask=mt)
            dq += tl.sum(do * v, 1)[:, None] * k
            if HAS_DFINAL:
                if start + BT >= T:                      # e^{a_{T−1}} S_{T−2}: the last block without its last row
                    last_pow = tl.where(rt < c - 1, k_pow, 0.0)
                    before_last = state * block_pow + tl.dot(tl.trans(k), v * last_pow[:, None],
                                                             input_precision=PRECISION)
        tl.store(DQP + part_off + qk_off + rows[:, None] * (H * DK) + rk[None, :], dq, mask=qk_mask)
        state = state * block_pow + tl.dot(tl.trans(k), v * k_pow[:, None], input_precision=PRECISION)
    if HAS_GATE and HAS_DFINAL:
        tl.store(SF + s_off, before_last, mask=s_mask)

    # dk/dv pass, backward in T; R = gradient of the state leaving the current block
    grad_state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_DFINAL:
        grad_state = tl.load(DSF + s_off, mask=s_mask, other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(T, BT)
    for back in range(0, n_blocks):
        start = (n_blocks - 1 - back) * BT
        rows = start + rt
        mt = rows < T
        c = tl.minimum(T - start, BT)
        decay_mask, q_pow, k_pow, block_pow = _decays(LOG_GATE, g_base, ld, rows, mt, rt, c, H, HAS_GATE, BT)
        if HAS_SEG:
            decay_mask, q_pow, k_pow, block_pow = _document_masks(SEG, (bh // H) * T, rows, mt, start, c, decay_mask,
                                                                  q_pow, k_pow, block_pow)
        qk_mask = mt[:, None] & mk[None, :]
        v_mask = mt[:, None] & mv[None, :]
        q = tl.load(Q + qk_off + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(K + qk_off + rows[:, None] * (H * DK) + rk[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(V + v_off + rows[:, None] * (H * DV) + rv[None, :], mask=v_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + v_off + rows[:, None] * (H * DV) + rv[None, :], mask=v_mask, other=0.0).to(tl.float32)
        # dv first: k is not needed after it, which shortens its live range (registers are the limit here)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay_mask                     # [i, j]
        dv = tl.dot(tl.trans(qk), do, input_precision=PRECISION)
        dv += tl.dot(k, grad_state, input_precision=PRECISION) * k_pow[:, None]
        dov = tl.dot(do, tl.trans(v), input_precision=PRECISION) * decay_mask                   # [i, j]
        if HAS_GATE:
            dov = tl.where(rt[:, None] > rt[None, :], dov, 0.0)
        dk = tl.dot(tl.trans(dov), q, input_precision=PRECISION)
        dk_state = tl.dot(v * k_pow[:, None], tl.trans(grad_state), input_precision=PRECISION)
        if HAS_GATE:                # k_t·dk_t; the last token's is its final-state term only: left out
            k_dk = tl.sum(k * dk, 1) + tl.where(rows == T - 1, 0.0, tl.sum(k * dk_state, 1))
            q_dq = tl.load(TERMS + terms_off + rows * H, mask=mt, other=0.0)
            tl.store(TERMS + terms_off + rows * H, q_dq - k_dk, mask=mt)
            dk += tl.sum(do * v, 1)[:, None] * q
        dk += dk_state
        tl.store(DKP + part_off + qk_off + rows[:, None] * (H * DK) + rk[None, :], dk, mask=qk_mask)
        tl.store(DV_OUT + v_off + rows[:, None] * (H * DV) + rv[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=v_mask)
        # R ← λ^c R + (Λ_q Q)ᵀ dO = λ^c R + Qᵀ (Λ_q dO): moves the gradient to the state entering this block
        grad_state = grad_state * block_pow + tl.dot(tl.trans(q), do * q_pow[:, None], input_precision=PRECISION)
    if HAS_INIT:
        tl.store(DS0 + s_off, grad_state, mask=s_mask)


def _head_block(dim):
    """Power-of-two tile covering a head dim, at least 16 (the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(dim))


def _config(q, v, block_len, block_v, backward):
    """(BT, BK, BV, num_warps, dot precision) of a launch. Fixed, not autotuned: the interpreter cannot autotune
    and no GPU has timed these. The rule, read off Triton's own sm_90 and sm_80 builds at the worst flag set
    (`python -m lasp.kernels.compile_check`; the table and the shapes tried are in docs/kernels.md):
      BK     d_k padded to a power of two >= 16: a d_v block needs all of d_k.
      BT     fp16/bf16: forward 32 tokens, backward 16 (it holds Q, K, V, dO, dK, dV and two d_k x BV states);
             64-token forward blocks spilled 0.3-20 KB per thread at every BV and warp count tried.
      BV     fp16/bf16 forward: the widest d_v block with BK·BV <= 2048 (the float32 state: 8 registers per
             thread at 8 warps), so 16 at d_k = 128 and 32 at 64 (BV = 32 at d_k = 128 spilled 20 B gated on
             sm_90). Backward: 32; narrower blocks spill less there but each adds a float32 (B, T, H, d_k)
             partial of dq and of dk: 8 KB per token and head at d = 128, BV = 16, against 4 KB at 32.
      fp32   exact ("ieee") dots run on FMA units, not tensor cores, and need far more registers per tile: 16 x 16
             blocks both ways (32-token or 32-wide blocks spilled 0.1-25 KB per thread, ieee or tf32x3 dots).
      warps  8 once BK·BV >= 2048 (fp32: 1024), else 4; 4 or 16 warps spilled more at d = 128, not less.
      dots   tf32 for fp16/bf16 inputs (error 2^-11, below the output's rounding); exact "ieee" for fp32.
    What still spills (the gated backward at every shape tried) is named in kernels/compile_check.py KNOWN_SPILLS.
    Under TRITON_INTERPRET every block is 16 tokens (CPU speed). block_len / block_v override BT / BV."""
    BK = _head_block(q.shape[-1])
    exact = q.dtype == torch.float32
    BT = block_len or (16 if _INTERPRET or backward or exact else 32)
    widest = 16 if exact else 32 if backward else max(16, 2048 // BK)
    BV = block_v or min(_head_block(v.shape[-1]), widest)
    if BT < 16 or BV < 16 or BT & (BT - 1) or BV & (BV - 1):
        raise ValueError(f"block_len {BT} and block_v {BV} must be powers of two >= 16")
    num_warps = 8 if BK * BV >= (1024 if exact else 2048) else 4
    return BT, BK, BV, num_warps, ("ieee" if exact else "tf32")


def _check(q, k, v, log_decay, initial_state, log_gate=None):
    """ValueError for what the kernels cannot run; shapes via check_linear_attn_inputs (no host sync here)."""
    check_linear_attn_inputs(q, k, v, None, initial_state, log_gate, check_values=False)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"backend='triton' supports float32/float16/bfloat16 inputs, got {q.dtype}; "
                         f"use backend='torch' for float64")
    d_k, d_v = q.shape[-1], v.shape[-1]
    if max(d_k, d_v) > MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got d_k={d_k}, d_v={d_v}")
    if log_decay is not None and tuple(log_decay.shape) != (q.shape[2],):
        raise ValueError(f"log_decay must have shape ({q.shape[2]},), got {tuple(log_decay.shape)}")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError(f"backend='triton' needs CUDA tensors (got {q.device}) or TRITON_INTERPRET=1 set "
                         f"before kernels.lightning_triton is imported")


def _float32(x, device):
    return None if x is None else x.to(device=device, dtype=torch.float32).contiguous()


def _ids(segment_ids, device):
    return None if segment_ids is None else segment_ids.to(device=device, dtype=torch.int64).contiguous()


def triton_fwd(q, k, v, log_decay=None, initial_state=None, *, log_gate=None, block_len=None, block_v=None,
               segment_ids=None):
    """No-autograd forward -> (o (B, T, H, d_v) in q's dtype, final_state (B, H, d_k, d_v) float32).

    log_decay (H,) and log_gate (B, T, H) ≤ 0 and segment_ids' order are not re-checked here (lightning_attn
    does that, once, with a host sync). Raises ValueError on float64, head dims > 128, wrong shapes, or CPU tensors without the
    interpreter.
    """
    _check(q, k, v, log_decay, initial_state, log_gate)
    q, k, v = (x.contiguous() for x in (q, k, v))
    B, T, H, d_k = q.shape
    d_v = v.shape[-1]
    BT, BK, BV, num_warps, precision = _config(q, v, block_len, block_v, backward=False)
    o = torch.empty_like(v)
    final = torch.empty(B, H, d_k, d_v, device=q.device, dtype=torch.float32)
    log_decay, initial_state = _float32(log_decay, q.device), _float32(initial_state, q.device)
    log_gate = _float32(log_gate, q.device)
    if B * H * d_v == 0 or d_k == 0:
        final.zero_() if initial_state is None else final.copy_(initial_state)
        return o.zero_(), final
    grid = (triton.cdiv(d_v, BV), B * H)
    seg = _ids(segment_ids, q.device)
    _fwd_kernel[grid](q, k, v, log_decay, log_gate, initial_state, o, final, seg, T, H, d_k, d_v,
                      HAS_DECAY=log_decay is not None, HAS_GATE=log_gate is not None,
                      HAS_INIT=initial_state is not None, PRECISION=precision,
                      BT=BT, BK=BK, BV=BV, HAS_SEG=seg is not None,
                      num_warps=num_warps, num_stages=1)  # no prefetch buffers: no room
    return o, final


def triton_bwd(q, k, v, log_decay, initial_state, do, dfinal_state=None, *, log_gate=None, block_len=None,
               block_v=None, segment_ids=None):
    """Gradients (dq, dk, dv in the input dtype, dinitial_state float32 or None when initial_state is None,
    dlog_gate in log_gate's dtype or None when log_gate is None).

    do (B, T, H, d_v); dfinal_state (B, H, d_k, d_v) or None (no gradient flows from the final state).
    """
    _check(q, k, v, log_decay, initial_state, log_gate)
    if do.shape != v.shape:
        raise ValueError(f"do {tuple(do.shape)} must have the shape of v {tuple(v.shape)}")
    B, T, H, d_k = q.shape
    d_v = v.shape[-1]
    if dfinal_state is not None and dfinal_state.shape != (B, H, d_k, d_v):
        raise ValueError(f"dfinal_state must be (B, H, d_k, d_v) = {(B, H, d_k, d_v)}, got {tuple(dfinal_state.shape)}")
    q, k, v = (x.contiguous() for x in (q, k, v))
    do = do.to(v.dtype).contiguous()
    BT, BK, BV, num_warps, precision = _config(q, v, block_len, block_v, backward=True)
    n_v = triton.cdiv(d_v, BV)
    log_decay, initial_state = _float32(log_decay, q.device), _float32(initial_state, q.device)
    dfinal_state, gate = _float32(dfinal_state, q.device), _float32(log_gate, q.device)
    launch = B * H * d_v > 0 and d_k > 0
    alloc = torch.empty_like if launch else torch.zeros_like        # the kernel writes every element it owns
    dq_part = alloc(q.new_empty(n_v, B, T, H, d_k, dtype=torch.float32))
    dk_part = alloc(dq_part)
    dv = alloc(v)
    dinit = None if initial_state is None else alloc(initial_state)
    before_last = None if gate is None or dfinal_state is None else torch.zeros_like(dfinal_state)
    terms = None if gate is None else torch.zeros(n_v, B, T, H, device=q.device, dtype=torch.float32)
    seg = _ids(segment_ids, q.device)
    if launch:
        _bwd_kernel[(n_v, B * H)](q, k, v, do, log_decay, gate, initial_state, dfinal_state, dq_part, dk_part, dv,
                                  dinit, before_last, terms, seg, T, H, d_k, d_v, HAS_DECAY=log_decay is not None,
                                  HAS_GATE=gate is not None, HAS_INIT=initial_state is not None,
                                  HAS_DFINAL=dfinal_state is not None, PRECISION=precision, BT=BT, BK=BK, BV=BV,
                                  HAS_SEG=seg is not None, num_warps=num_warps, num_stages=1)
    dq, dk = dq_part.sum(0), dk_part.sum(0)
    dgate = None
    if gate is not None:
        final_term = None if before_last is None else (before_last * dfinal_state).sum((-1, -2))
        docs = documents(seg, max(T, 1))
        dgate = gate_grad(terms.sum(0), final_term, log_gate.dtype) if docs is None else \
            segmented_gate_grad(terms.sum(0), final_term, docs).to(log_gate.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv, dinit, dgate
