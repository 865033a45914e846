"""The one module that calls torch.distributed collectives, so that every call can be counted.

Tensor-form collectives only, buffers flat in dim 0 (gloo wants all-gather output concatenated on dim 0, not
stacked). Every call is recorded in each active `CommLog` (see `count_collectives`) with the bytes this rank
receives under a bandwidth-optimal algorithm, W = group size, |x| = bytes of the local input:

    all_gather (W-1)·|x|   reduce_scatter (W-1)·|x|/W   all_reduce 2(W-1)·|x|/W   all_to_all (W-1)·|x|/W
    all_to_all_v: the rows received from the other ranks      send/recv: |x| for the receiver, 0 for the sender

A call on a group of one (or with no process group at all) is still recorded, with 0 bytes, so that a test
counting collectives sees the same number on any rank count and a path that stops communicating fails it.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommLog", "count_collectives", "group_size", "group_rank", "global_rank", "all_gather",
           "reduce_scatter", "all_reduce", "all_to_all", "all_to_all_v", "exchange", "ring_shift", "wait_all",
           "send", "recv", "barrier"]


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes: int  # received by this rank


@dataclass
class CommLog:
    records: list = field(default_factory=list)

    def count(self, op=None):
        return sum(1 for r in self.records if op is None or r.op == op)

    def bytes(self, op=None):
        return sum(r.bytes for r in self.records if op is None or r.op == op)

    def ops(self):
        return [r.op for r in self.records]

    def summary(self):
        """{op: (calls, bytes received)}"""
        out = {}
        for r in self.records:
            n, b = out.get(r.op, (0, 0))
            out[r.op] = (n + 1, b + r.bytes)
        return out


_ACTIVE_LOGS: list = []
# torch 2.13 renamed the tensor-form collectives; older releases only have the *_into_tensor / *_tensor names
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@contextmanager
def count_collectives():
    """`with count_collectives() as log:` records every collective this process issues inside the block."""
    log = CommLog()
    _ACTIVE_LOGS.append(log)
    try:
        yield log
    finally:
        _ACTIVE_LOGS.remove(log)


def _record(op, size, nbytes):
    for log in _ACTIVE_LOGS:
        log.records.append(CommRecord(op, size, int(nbytes)))


def _distributed(group):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def group_size(group=None):
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group=None):
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def global_rank(group, i):
    """Global rank of the i-th member of `group` (peers come from the group, never from rank arithmetic)."""
    return dist.get_global_rank(group, i) if group is not None else i


class _Done:
    def wait(self):
        return None


def _nbytes(x):
    return x.numel() * x.element_size()


def all_gather(x, group=None, async_op=False):
    """(n, ...) on each of W ranks -> (W·n, ...) in rank order. Returns (out, work) if async_op else out."""
    W = group_size(group)
    _record("all_gather", W, (W - 1) * _nbytes(x))
    x = x.contiguous()
    if not _distributed(group):
        out, work = x.clone(), _Done()
    else:
        out = x.new_empty((W * x.shape[0], *x.shape[1:]))
        work = _ALL_GATHER(out, x, group=group, async_op=True)
    if async_op:
        return out, work
    work.wait()
    return out


def reduce_scatter(x, group=None, async_op=False):
    """(W·n, ...) on each rank -> (n, ...): the sum over ranks of this rank's block."""
    W = group_size(group)
    if x.shape[0] % W:
        raise ValueError(f"reduce_scatter needs dim 0 ({x.shape[0]}) divisible by the group size {W}")
    _record("reduce_scatter", W, (W - 1) * _nbytes(x) // W)
    x = x.contiguous()
    if not _distributed(group):
        out, work = x.clone(), _Done()
    else:
        out = x.new_empty((x.shape[0] // W, *x.shape[1:]))
        work = _REDUCE_SCATTER(out, x, group=group, async_op=True)
    if async_op:
        return out, work
    work.wait()
    return out


def all_reduce(x, group=None, async_op=False):
    """Sum over ranks, in place on a contiguous tensor. Returns (x, work) if async_op else x."""
    W = group_size(group)
    _record("all_reduce", W, 2 * (W - 1) * _nbytes(x) // W)
    assert x.is_contiguous()
    work = dist.all_reduce(x, group=group, async_op=True) if _distributed(group) else _Done()
    if async_op:
        return x, work
    work.wait()
    return x


def all_to_all(x, group=None):
    """(W·n, ...) -> (W·n, ...): block j of the input goes to rank j; block i of the output came from rank i."""
    W = group_size(group)
    if x.shape[0] % W:
        raise ValueError(f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size {W}")
    _record("all_to_all", W, (W - 1) * _nbytes(x) // W)
    x = x.contiguous()
    if not _distributed(group):
        return x.clone()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_to_all_v(x, output_splits, input_splits, group=None):
    """Uneven all-to-all along dim 0: rows [Σ input_splits[:j], +input_splits[j]) go to rank j; the output holds
    output_splits[i] rows from rank i, in rank order. Splits are lists of W ints. ValueError if they do not fit."""
    W = group_size(group)
    if len(input_splits) != W or len(output_splits) != W or sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all_v needs {W} input/output splits with the input ones summing to dim 0 "
                         f"({x.shape[0]}), got {list(input_splits)} and {list(output_splits)}")
    row_bytes = x.shape[1:].numel() * x.element_size()
    _record("all_to_all_v", W, row_bytes * (sum(output_splits) - output_splits[group_rank(group)]))
    x = x.contiguous()
    if not _distributed(group):
        return x.clone()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group)
    return out


def exchange(send_to, recv_from, group=None):
    """Post a batch of point-to-point ops at once: send_to / recv_from are lists of (tensor, peer index in group).

    Returns the list of works; receive buffers are filled when they complete. Used by the rings.
    """
    W = group_size(group)
    ops = []
    for x, peer in send_to:
        _record("send", W, 0)
        ops.append(dist.P2POp(dist.isend, x.contiguous(), global_rank(group, peer), group))
    for x, peer in recv_from:
        _record("recv", W, _nbytes(x))
        ops.append(dist.P2POp(dist.irecv, x, global_rank(group, peer), group))
    return dist.batch_isend_irecv(ops) if ops else []


def ring_shift(tensors, group=None):
    """Post sends of `tensors` to the next ring member and receives of the previous one's. -> (works, buffers).

    Indices are within the group (mapped to global ranks by `exchange`); the rings of ring attention use it.
    """
    W, rank = group_size(group), group_rank(group)
    incoming = [torch.empty_like(x) for x in tensors]
    works = exchange([(x, (rank + 1) % W) for x in tensors], [(x, (rank - 1) % W) for x in incoming], group)
    return works, incoming


def wait_all(works):
    for w in works:
        w.wait()


def send(x, peer, group=None):
    _record("send", group_size(group), 0)
    dist.send(x.contiguous(), global_rank(group, peer), group=group)


def recv(x, peer, group=None):
    _record("recv", group_size(group), _nbytes(x))
    dist.recv(x, global_rank(group, peer), group=group)
    return x


def barrier(group=None):
    if _distributed(group):
        dist.barrier(group=group)
