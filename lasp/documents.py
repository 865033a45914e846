"""Packed documents across the ranks: what the linear engines exchange about segment_ids and how they read it.

Shapes: ids (S, c) int per local segment (S = B·n rows, n = 1 contiguous, 2 zigzag); ends (S, 2) each segment's
first and last id; gathered ids (N, B, 2) every sub-chunk's, in global order. Ids are non-decreasing along the
global sequence, so "no document starts between two positions" is the equality of their ids. They travel
inside messages the engines send anyway, int64 bit-cast to the floating dtype of the message (lasp2.py,
lasp1.py, allscan.py say where); the math is in lasp/common.py and docs/lasp.md.
"""
import torch

__all__ = ["segment_ends", "ids_to_payload", "ids_from_payload", "transition_mask", "check_global_ids",
           "previous_ids", "header_with_ids", "ids_from_header", "document_scales"]


def segment_ends(ids):
    """(S, 2) int64: each segment's first and last id, or None without documents."""
    return None if ids is None else torch.stack([ids[:, 0], ids[:, -1]], dim=1).long()


def ids_to_payload(ids, dtype):
    """int64 ids bit-cast to `dtype` elements (flat), to travel inside a floating collective unchanged."""
    return ids.long().contiguous().flatten().view(dtype)


def ids_from_payload(x):
    """The inverse of ids_to_payload: int64 ids from a contiguous floating tensor."""
    return x.contiguous().view(torch.int64)


def check_global_ids(ends, engine, layout):
    """ValueError (the same on every rank: all hold the same gathered ids) unless the first and last ids of the N
    sub-chunks (N, B, 2), in global order, are non-decreasing."""
    flat = ends.transpose(0, 1).flatten(1)                                     # (B, 2N) in global order
    if not bool((flat[:, 1:] >= flat[:, :-1]).all()):
        raise ValueError(f"{engine}: segment_ids decrease across the ranks' shards (first and last id of each "
                         f"sub-chunk in global order, per batch row: {flat.tolist()}); the ranks must hold one "
                         f"non-decreasing (B, T) id tensor, sharded in layout {layout!r}")


def previous_ids(ends, gathered, local_idx):
    """(B·n,) the id before each local segment in global order (its own first id for sub-chunk 0); ends (B·n, 2)
    local, gathered (N, B, 2) every sub-chunk's first and last ids, local_idx the n global sub-chunk indices."""
    per_seg = ends.unflatten(0, (-1, len(local_idx)))                         # (B, n, 2)
    prev = [per_seg[:, s, 0] if g == 0 else gathered[g - 1, :, 1] for s, g in enumerate(local_idx)]
    return torch.stack(prev, dim=1).flatten()


def transition_mask(ids):
    """[ids_{c−1} = ids_0] (S,) per segment: its own state survives through it (no reset after token 0)."""
    return ids[:, -1] == ids[:, 0]


def header_with_ids(header, ends, n):
    """header (k,) floating + every local segment's (first, last) id per row, padded to two segments so that the
    size does not depend on the layout: (k + 2·B·2·(8 / itemsize),)."""
    per_seg = ends.unflatten(0, (-1, n)).transpose(0, 1)                          # (n, B, 2)
    padded = torch.cat([per_seg, per_seg[-1:].expand(2 - n, -1, -1)]) if n < 2 else per_seg
    return torch.cat([header, ids_to_payload(padded, header.dtype)])


def ids_from_header(gathered, k, n, order):
    """The (N, B, 2) ids in global order from the W gathered headers (W, ·) of `header_with_ids`; order: the
    argsort of the ranks' sub-chunk indices."""
    W = gathered.shape[0]
    per_rank = ids_from_payload(gathered[:, k:]).view(W, 2, -1, 2)[:, :n]              # (W, n, B, 2)
    return per_rank.flatten(0, 1)[order]


def document_scales(scales, ends, prev, n, dtype):
    """Each local segment's fold scale (a list of n, entries (B or 1, H, 1, 1) or None) times [last = prev]
    (B, 1, 1, 1): the state entering it survives it only if no document starts in it."""
    through = (ends[:, 1] == prev).to(dtype).unflatten(0, (-1, n))
    return [through[:, s, None, None, None] * (1.0 if scales[s] is None else scales[s]) for s in range(n)]
