"""Packed documents in the chunked linear-attention kernel: state resets as 0/1 masks on the decay factors.

Shapes: segment_ids (B, T) integer document ids, non-decreasing along each row; a chunk grid of N = ⌈T/chunk_len⌉
chunks. A reset at t (ids_t ≠ ids_{t−1}) empties the state before k_tᵀ v_t is added (SPEC §3b). The state
entering the sequence (initial_state, or a LASP engine's prefix) belongs to the document of token 0: a caller
whose token 0 starts a document passes a zero state instead (the engines mask it themselves).

Ids are non-decreasing, so "no reset in (j, i]" is just ids_i = ids_j. Every decay factor of the chunked form is
multiplied by such an equality, never turned into a log-gate of −inf (−inf − (−inf) is NaN in a cumsum):

    D_ij  · [ids_i = ids_j]            Λ_q,i · [ids_i = id before the chunk]      Λ_k,i · [ids_i = chunk's last id]
    W_rj  · [entry id of chunk r = last id of chunk j]        e_r · [entry id of chunk r = entry id of the block]

where W_rj carries chunk j's state to the entry of chunk r and e_r the block's entering state (linear_attn.py
_scan_weights). The deferred (LASP-2 overlap) passes weight each chunk by [id before chunk j = ids_0] (the
entering state) and [chunk j's last id = ids_{T−1}] (the exit gradient). The gate gradient sums its per-token
terms inside each document only (the other documents' terms cancel exactly) and is 0 at a reset.
"""
import functools
from typing import NamedTuple

import torch

__all__ = ["Documents", "check_segment_ids", "documents", "block_masks", "chunk_keep", "segmented_gate_grad"]


class Documents(NamedTuple):
    ids: torch.Tensor       # (B, T) int64
    prev: torch.Tensor      # (B, N) the id before each chunk (chunk 0: `entering`, default ids_0)
    last: torch.Tensor      # (B, N) the id of each chunk's last token


class BlockMasks:
    """The 0/1 masks of a block of n chunks of c tokens, each built when first read, in `dtype`:
    mask_scores(x) applies ids_i = ids_j to (B, H, n, c, c) scores; q (B, 1, n, c, 1) ids_i = the id before the chunk; k (B, 1, n, c, 1)
    ids_i = the chunk's last id; scan (B, 1, n+1, n) entry id of chunk r = last id of chunk j (j < r);
    entry (B, 1, n+1) entry id of chunk r = entry id of the block (r = n: the state leaving it)."""

    def __init__(self, docs, start, n, c, chunk_len, dtype):
        B, j = docs.ids.shape[0], start // chunk_len
        self.ids = docs.ids[:, start:start + n * c].view(B, 1, n, c)
        self.prev, self.last = docs.prev[:, None, j:j + n], docs.last[:, None, j:j + n]      # (B, 1, n)
        self.dtype, self.n = dtype, n

    def uniform(self):
        """True when every id of the block equals the id before it: no reset, all masks 1 (a host sync)."""
        return bool((self.ids == self.prev[..., :1, None]).all())

    @functools.cached_property
    def boundary(self):
        """(b, j): the batch rows and chunks in which a document starts after the chunk's first token."""
        return (self.ids[:, 0, :, 0] != self.ids[:, 0, :, -1]).nonzero(as_tuple=True)

    def mask_scores(self, x):
        """x (B, H, n, c, c) ⊙ [ids_i = ids_j] in place, touching only the chunks of `boundary` (a gather and a
        scatter of those rows, no loop); -> x."""
        b, j = self.boundary
        if b.numel():
            ids = self.ids[b, 0, j]                                                     # (k, c)
            x[b, :, j] = x[b, :, j] * (ids[:, :, None] == ids[:, None, :]).to(x.dtype)[:, None]
        return x

    @functools.cached_property
    def q(self):
        return (self.ids == self.prev[..., None]).to(self.dtype)[..., None]

    @functools.cached_property
    def k(self):
        return (self.ids == self.last[..., None]).to(self.dtype)[..., None]

    @functools.cached_property
    def _entry_ids(self):
        return torch.cat([self.prev, self.last[..., -1:]], dim=-1)                  # (B, 1, n+1)

    @functools.cached_property
    def scan(self):
        keep = torch.ones(self.n + 1, self.n, dtype=torch.bool, device=self.ids.device).tril(-1)
        return ((self._entry_ids[..., :, None] == self.last[..., None, :]) & keep).to(self.dtype)

    @functools.cached_property
    def entry(self):
        return (self._entry_ids == self._entry_ids[..., :1]).to(self.dtype)


def check_segment_ids(segment_ids, shape, device, name="segment_ids"):
    """ValueError naming the shapes unless segment_ids is an integer (B, T) = shape tensor on `device`,
    non-decreasing along each row (a host sync)."""
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"{name} must be (B, T) = {tuple(shape)}, got {tuple(segment_ids.shape)}")
    if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
        raise ValueError(f"{name} {tuple(segment_ids.shape)} must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.device != device:
        raise ValueError(f"{name} {tuple(segment_ids.shape)} is on {segment_ids.device}, q on {device}")
    if segment_ids.shape[1] > 1 and bool((segment_ids[:, 1:] < segment_ids[:, :-1]).any()):
        raise ValueError(f"{name} {tuple(segment_ids.shape)} must be non-decreasing along each row (documents "
                         f"packed in order)")


def documents(segment_ids, chunk_len, entering=None):
    """Documents of a (B, T) id tensor on the chunk grid, or None (no ids, or T = 0). entering (B,): the id of the
    state entering the sequence (default ids_0)."""
    if segment_ids is None or segment_ids.shape[1] == 0:
        return None
    ids = segment_ids.long().contiguous()
    T = ids.shape[1]
    starts = torch.arange(0, T, chunk_len, device=ids.device)
    prev = ids[:, (starts - 1).clamp_(min=0)]
    prev[:, 0] = ids[:, 0] if entering is None else entering
    return Documents(ids, prev, ids[:, (starts + chunk_len).clamp_(max=T) - 1])


def block_masks(docs, start, n, c, chunk_len, dtype):
    """The masks of the n chunks of c tokens from token `start` (a chunk start), in `dtype`."""
    return BlockMasks(docs, start, n, c, chunk_len, dtype)


def chunk_keep(docs, j, n, dtype, to_end):
    """(B, 1, n, 1): [the id before chunk j.. = ids_0] (the entering state reaches the chunk), or with to_end
    [the chunk's last id = ids_{T−1}] (the chunk's exit state reaches the sequence end)."""
    if to_end:
        return (docs.last[:, None, j:j + n] == docs.ids[:, None, -1:]).to(dtype)[..., None]
    return (docs.prev[:, None, j:j + n] == docs.prev[:, None, :1]).to(dtype)[..., None]


def segmented_gate_grad(token_terms, final_term, docs):
    """d a_s = Σ_{t ≥ s, same document} token_terms_t (+ final_term (B, H) in the last document), 0 at a reset:
    token_terms (B, T, H), float64 result."""
    B, T, H = token_terms.shape
    suffix = torch.nn.functional.pad(token_terms.double().flip(1).cumsum(1).flip(1), (0, 0, 0, 1))   # (B, T+1, H)
    nxt = torch.searchsorted(docs.ids, docs.ids, right=True)                       # next document's first token
    grad = suffix[:, :T] - suffix.gather(1, nxt[..., None].expand(B, T, H))
    if final_term is not None:
        grad += final_term.double()[:, None, :] * (nxt == T)[..., None]
    reset = torch.nn.functional.pad(docs.ids[:, 1:] != docs.ids[:, :-1], (1, 0))
    return grad.masked_fill_(reset[..., None], 0.0)
