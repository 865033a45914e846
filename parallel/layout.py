"""Sequence layouts: which global tokens each of W sequence-parallel ranks holds.

contiguous: rank r holds tokens [r·C, (r+1)·C), C = T/W.
zigzag:     the sequence is cut into 2W sub-chunks of c = T/(2W); rank r holds sub-chunk r then 2W−1−r,
            so causal attention costs the same on every rank.
A rank's local tokens are `segments` of equal length in global order: one for contiguous, two for zigzag.
"""
import torch

from . import comm

__all__ = ["LAYOUTS", "segments_per_rank", "segment_indices", "check_local_len", "local_positions", "shard",
           "unshard", "gather_sequence"]

LAYOUTS = ("contiguous", "zigzag")


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def segments_per_rank(layout):
    _check_layout(layout)
    return 1 if layout == "contiguous" else 2


def segment_indices(layout, rank, world):
    """Global sub-chunk indices held by `rank`, in local order (out of W·segments_per_rank sub-chunks)."""
    return [rank] if segments_per_rank(layout) == 1 else [rank, 2 * world - 1 - rank]


def check_local_len(local_len, layout):
    """The local length must split into the layout's segments: ValueError naming the sizes otherwise."""
    n = segments_per_rank(layout)
    if local_len % n:
        raise ValueError(f"layout {layout!r} needs the local length ({local_len}) to split into {n} equal halves")
    return local_len // n


def _check_global_len(seq_len, layout, world):
    n = segments_per_rank(layout) * world
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} does not split into {n} equal chunks "
                         f"(layout {layout!r} on {world} ranks): use a multiple of {n}")
    return seq_len // n


def local_positions(seq_len, layout, rank, world, device=None):
    """Global token positions held by `rank`: LongTensor (T_local,)."""
    c = _check_global_len(seq_len, layout, world)
    return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in segment_indices(layout, rank, world)])


def shard(x, layout, rank, world, dim=1):
    """The local shard of a full-sequence tensor (sequence on `dim`)."""
    return x.index_select(dim, local_positions(x.shape[dim], layout, rank, world, x.device))


def unshard(shards, layout, dim=1):
    """Inverse of `shard`: the full sequence from the list of all W shards, in rank order."""
    world = len(shards)
    full = torch.cat(shards, dim=dim)
    pos = torch.cat([local_positions(full.shape[dim], layout, r, world) for r in range(world)])
    return full.index_select(dim, torch.argsort(pos).to(full.device))


def gather_sequence(x, layout, group=None, dim=1):
    """All-gather local shards (same length on every rank) into the full sequence on every rank."""
    world = comm.group_size(group)
    moved = x.movedim(dim, 0)
    full = comm.all_gather(moved, group)
    return unshard(list(full.movedim(0, dim).chunk(world, dim=dim)), layout, dim=dim)
