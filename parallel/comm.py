"""The one module that calls torch.distributed collectives, so that every call can be counted.

Tensor-form collectives only, buffers flat in dim 0 (gloo wants all-gather output concatenated on dim 0, not
stacked). Every call is recorded in each active `CommLog` (see `count_collectives`) with the bytes this rank
receives under a bandwidth-optimal algorithm, W = group size, |x| = bytes of the local input:

    all_gather (W-1)·|x|   reduce_scatter (W-1)·|x|/W   all_reduce 2(W-1)·|x|/W   all_to_all (W-1)·|x|/W
    all_to_all_v: the rows received from the other ranks      send/recv: |x| for the receiver, 0 for the sender

A call on a group of one (or with no process group at all) is still recorded, with 0 bytes, so that a test
counting collectives sees the same number on any rank count and a path that stops communicating fails it.
A record also keeps the peer (P2P), the seconds this rank was blocked in the call or its wait() (`wait_s`) and
the network model's time for it (`model_s`).

Network model (a MODEL, not a measurement; off by default). LASP_SIM_NETWORK="latency_us=50,gbps=25" gives a
per-message latency α (µs) and a link bandwidth β (gigabits/s). Every call then finishes no earlier than the
time a real interconnect would take, W = group size, m = bytes of the full buffer (all-gather result,
reduce-scatter input, the all-reduce / all-to-all buffer) or of one message:

    all_gather, reduce_scatter, all_to_all (W-1)·(α + m/(W·β))     all_reduce 2(W-1)·(α + m/(W·β))
    send / recv                             α + m/β

Collectives: at wait() (async) or before returning (blocking), no earlier than issue time + model time, so compute
done between issue and wait hides it, as on a real network. P2P: the delay is put on the SENDER's side, because
a receiver cannot know when its message was issued: one courier thread per process puts messages on a
simulated link in issue order (a message starts when the link is free, holds it m/β, and is handed to gloo α
later), so K messages back to back cost α + K·m/β, and a chain of dependent hops adds one α + m/β per hop.
The delays are sleeps: the CPU stays free for the ranks' compute. A malformed value raises ValueError when this
module is imported (start-up), naming the variable and the accepted keys.
"""
import itertools
import math
import os
import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["CommLog", "count_collectives", "group_size", "group_rank", "global_rank", "all_gather",
           "reduce_scatter", "all_reduce", "all_to_all", "all_to_all_v", "exchange", "ring_shift", "wait_all",
           "send", "recv", "barrier", "NETWORK_VAR", "NetworkModel", "parse_network", "network_model",
           "simulated_network"]

NETWORK_VAR = "LASP_SIM_NETWORK"
_NETWORK_KEYS = "latency_us (per-message latency in microseconds, >= 0), gbps (link bandwidth in gigabits/s, > 0)"


@dataclass(frozen=True)
class NetworkModel:
    """α = latency_s per message, β = bytes_per_s on every link (see the module docstring)."""
    latency_s: float = 0.0
    bytes_per_s: float = math.inf

    def message(self, nbytes):
        """Seconds for one point-to-point message of nbytes: α + m/β."""
        return self.latency_s + nbytes / self.bytes_per_s

    def collective(self, op, world, nbytes):
        """Seconds for a ring collective over `world` ranks whose full buffer is nbytes (0 on one rank)."""
        if world <= 1:
            return 0.0
        step = self.latency_s + nbytes / (world * self.bytes_per_s)
        return (2 if op == "all_reduce" else 1) * (world - 1) * step


def parse_network(spec):
    """"latency_us=50,gbps=25" -> NetworkModel; "" or "off" -> None. ValueError naming the variable and keys."""
    if spec is None or spec.strip().lower() in ("", "off", "none"):
        return None
    values = {}
    for item in spec.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            number = float(value) if sep else math.nan
        except ValueError:
            number = math.nan
        ok = key in ("latency_us", "gbps") and key not in values and math.isfinite(number)
        if not ok or number < 0 or (key == "gbps" and number == 0):
            raise ValueError(f"{NETWORK_VAR}={spec!r}: bad item {item.strip()!r}; accepted keys, each at most once: "
                             f"{_NETWORK_KEYS}, e.g. {NETWORK_VAR}='latency_us=50,gbps=25'")
        values[key] = number
    gbps = values.get("gbps")
    return NetworkModel(values.get("latency_us", 0.0) / 1e6, math.inf if gbps is None else gbps * 1e9 / 8)


_PARSED = {}
_OVERRIDES: list = []


def network_model():
    """The model in force: the innermost `simulated_network` block, else $LASP_SIM_NETWORK, else None (off)."""
    if _OVERRIDES:
        return _OVERRIDES[-1]
    spec = os.environ.get(NETWORK_VAR, "")
    if spec not in _PARSED:
        _PARSED[spec] = parse_network(spec)
    return _PARSED[spec]


@contextmanager
def simulated_network(spec):
    """`with simulated_network("latency_us=20000,gbps=10"):` (a NetworkModel, or ""/None for off) in this process."""
    _OVERRIDES.append(spec if isinstance(spec, NetworkModel) or spec is None else parse_network(spec))
    try:
        yield _OVERRIDES[-1]
    finally:
        _OVERRIDES.pop()


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes: int  # received by this rank
    peer: int = None       # P2P: the peer's index in the group
    model_s: float = 0.0   # the network model's time for this call (0 when the model is off)
    wait_s: float = 0.0    # seconds this rank was blocked in the call or in its wait()
    issued: int = 0        # this process's event order: when the call was issued,
    waited: int = None     # and when it was first waited for (the received data usable from there)


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


_EVENTS = itertools.count(1)


def _record(op, size, nbytes, peer=None):
    rec = CommRecord(op, size, int(nbytes), peer, issued=next(_EVENTS))
    for log in _ACTIVE_LOGS:
        log.records.append(rec)
    return rec


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

    def is_completed(self):
        return True


def _sleep_until(deadline):
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)


class _Timed:
    """A work whose wait() also lasts until `deadline` (the model's finish time) and notes the blocked seconds."""

    def __init__(self, work, record, deadline=0.0):
        self.work, self.record, self.deadline = work, record, deadline

    def wait(self):
        start = time.perf_counter()
        self.work.wait()
        _sleep_until(self.deadline)
        _waited(self.record, start)

    def is_completed(self):
        """Whether wait() would return at once (the work done and, under the model, its finish time passed)."""
        return self.work.is_completed() and time.perf_counter() >= self.deadline


def _waited(record, start):
    record.wait_s += time.perf_counter() - start
    if record.waited is None:
        record.waited = next(_EVENTS)


def _collective(op, world, nbytes, record):
    """Issue-time deadline of a collective under the model (-inf when off); notes the model time."""
    model = network_model()
    if model is None:
        return -math.inf
    record.model_s = model.collective(op, world, nbytes)
    return time.perf_counter() + record.model_s


class _Posted:
    """A send put on the simulated link: wait() waits for the courier to hand it to gloo, then for gloo."""

    def __init__(self, tensor, dst, group, at):
        self.tensor, self.dst, self.group, self.at = tensor, dst, group, at
        self.ready, self.work, self.error = threading.Event(), None, None

    def wait(self):
        self.ready.wait()
        if self.error is not None:
            raise self.error
        self.work.wait()


class _Courier:
    """One thread per process: sends leave in issue order, each when the simulated link delivers it."""

    def __init__(self):
        self.pid, self.queue, self.link_free = os.getpid(), queue.Queue(), 0.0
        threading.Thread(target=self._run, daemon=True).start()

    def post(self, x, dst, group, model, record):
        """isend x to global rank dst at: link free -> + m/β on the wire -> + α. Returns the work."""
        start = max(time.perf_counter(), self.link_free)
        self.link_free = start + _nbytes(x) / model.bytes_per_s
        record.model_s = model.message(_nbytes(x))
        item = _Posted(x, dst, group, self.link_free + model.latency_s)
        self.queue.put(item)
        return item

    def _run(self):
        while True:
            item = self.queue.get()
            _sleep_until(item.at)
            try:
                item.work = dist.isend(item.tensor, item.dst, group=item.group)
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller's wait()
                item.error = e
            item.ready.set()


_COURIER = None


def _courier():
    global _COURIER
    if _COURIER is None or _COURIER.pid != os.getpid():     # threads do not survive fork (the test ranks fork)
        _COURIER = _Courier()
    return _COURIER


def _isend(x, peer, group, record):
    """Start a send to the group's member `peer`: directly, or through the courier under the network model."""
    model, dst = network_model(), global_rank(group, peer)
    if model is None:
        return dist.isend(x, dst, group=group)
    return _courier().post(x, dst, group, model, record)


def _nbytes(x):
    return x.numel() * x.element_size()


def all_gather(x, group=None, async_op=False):
    """(n, ...) on each of W ranks -> (W·n, ...) in rank order. Returns (out, work) if async_op else out."""
    W = group_size(group)
    rec = _record("all_gather", W, (W - 1) * _nbytes(x))
    deadline = _collective("all_gather", W, W * _nbytes(x), rec)
    x = x.contiguous()
    if not _distributed(group):
        out, work = x.clone(), _Done()
    else:
        out = x.new_empty((W * x.shape[0], *x.shape[1:]))
        work = _ALL_GATHER(out, x, group=group, async_op=True)
    work = _Timed(work, rec, deadline)
    if async_op:
        return out, work
    work.wait()
    return out


def reduce_scatter(x, group=None, async_op=False):
    """(W·n, ...) on each rank -> (n, ...): the sum over ranks of this rank's block."""
    W = group_size(group)
    if x.shape[0] % W:
        raise ValueError(f"reduce_scatter needs dim 0 ({x.shape[0]}) divisible by the group size {W}")
    rec = _record("reduce_scatter", W, (W - 1) * _nbytes(x) // W)
    deadline = _collective("reduce_scatter", W, _nbytes(x), rec)
    x = x.contiguous()
    if not _distributed(group):
        out, work = x.clone(), _Done()
    else:
        out = x.new_empty((x.shape[0] // W, *x.shape[1:]))
        work = _REDUCE_SCATTER(out, x, group=group, async_op=True)
    work = _Timed(work, rec, deadline)
    if async_op:
        return out, work
    work.wait()
    return out


def all_reduce(x, group=None, async_op=False):
    """Sum over ranks, in place on a contiguous tensor. Returns (x, work) if async_op else x."""
    W = group_size(group)
    rec = _record("all_reduce", W, 2 * (W - 1) * _nbytes(x) // W)
    deadline = _collective("all_reduce", W, _nbytes(x), rec)
    assert x.is_contiguous()
    work = dist.all_reduce(x, group=group, async_op=True) if _distributed(group) else _Done()
    work = _Timed(work, rec, deadline)
    if async_op:
        return x, work
    work.wait()
    return x


def all_to_all(x, group=None):
    """(W·n, ...) -> (W·n, ...): block j of the input goes to rank j; block i of the output came from rank i."""
    W = group_size(group)
    if x.shape[0] % W:
        raise ValueError(f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size {W}")
    rec = _record("all_to_all", W, (W - 1) * _nbytes(x) // W)
    deadline = _collective("all_to_all", W, _nbytes(x), rec)
    x = x.contiguous()
    if not _distributed(group):
        return x.clone()
    out = torch.empty_like(x)
    _blocking(lambda: dist.all_to_all_single(out, x, group=group), rec, deadline)
    return out


def all_to_all_v(x, output_splits, input_splits, group=None):
    """Uneven all-to-all along dim 0: rows [Σ input_splits[:j], +input_splits[j]) go to rank j; the output holds
    output_splits[i] rows from rank i, in rank order. Splits are lists of W ints. ValueError if they do not fit."""
    W = group_size(group)
    if len(input_splits) != W or len(output_splits) != W or sum(input_splits) != x.shape[0]:
        raise ValueError(f"all_to_all_v needs {W} input/output splits with the input ones summing to dim 0 "
                         f"({x.shape[0]}), got {list(input_splits)} and {list(output_splits)}")
    row_bytes = x.shape[1:].numel() * x.element_size()
    rec = _record("all_to_all_v", W, row_bytes * (sum(output_splits) - output_splits[group_rank(group)]))
    deadline = _collective("all_to_all", W, row_bytes * max(sum(output_splits), x.shape[0]), rec)
    x = x.contiguous()
    if not _distributed(group):
        return x.clone()
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    _blocking(lambda: dist.all_to_all_single(out, x, list(output_splits), list(input_splits), group=group), rec,
              deadline)
    return out


def _blocking(call, record, deadline):
    """Run a blocking collective, then hold until the model's deadline; notes the blocked seconds."""
    start = time.perf_counter()
    call()
    _sleep_until(deadline)
    _waited(record, start)


def exchange(send_to, recv_from, group=None):
    """Post a batch of point-to-point ops at once: send_to / recv_from are lists of (tensor, peer index in group).

    Returns the list of works; receive buffers are filled when they complete. Used by the rings and All-Scan.
    Under the network model the sends go through the courier (module docstring), the receives are posted now.
    """
    W = group_size(group)
    sends = [(x.contiguous(), peer, _record("send", W, 0, peer)) for x, peer in send_to]
    recvs = [(x, peer, _record("recv", W, _nbytes(x), peer)) for x, peer in recv_from]
    if network_model() is None:
        ops = [dist.P2POp(dist.isend, x, global_rank(group, peer), group) for x, peer, _ in sends]
        ops += [dist.P2POp(dist.irecv, x, global_rank(group, peer), group) for x, peer, _ in recvs]
        works = dist.batch_isend_irecv(ops) if ops else []
    else:
        works = [_isend(x, peer, group, rec) for x, peer, rec in sends]
        works += [dist.irecv(x, global_rank(group, peer), group=group) for x, peer, _ in recvs]
    return [_Timed(w, rec) for w, (_, _, rec) in zip(works, sends + recvs)]


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
    """Blocking send to the group's member `peer` (under the model: returns once the link has delivered it)."""
    rec = _record("send", group_size(group), 0, peer)
    _Timed(_isend(x.contiguous(), peer, group, rec), rec).wait()


def recv(x, peer, group=None):
    rec = _record("recv", group_size(group), _nbytes(x), peer)
    _blocking(lambda: dist.recv(x, global_rank(group, peer), group=group), rec, -math.inf)
    return x


def barrier(group=None):
    if _distributed(group):
        dist.barrier(group=group)


network_model()  # a malformed LASP_SIM_NETWORK fails at start-up (import), not at the first collective
