"""Activation checkpointing applied from outside: each block of `model.layers` keeps only its input in forward and
recomputes itself in backward (torch.utils.checkpoint, non-reentrant), like the other `apply_*` functions.

Memory per block: its input (B, C, D) instead of every intermediate; cost: one more forward per block in backward.
The instance's forward is wrapped (no module is replaced), so parameter names and state dicts do not change, and
it composes with the sequence-, tensor- and expert-parallel wrappers applied before it: their collectives run
again in the recomputation, in the same order on every rank — except an exchange made `replayable`, whose result
the forward keeps (in the checkpoint's own store, freed with it) and the recomputation reuses without
communicating. LASP-2's state gather is one: a (B, H_kv, d_k, d_v) prefix per segment, so a checkpointed LASP-2
layer keeps ONE all-gather forward (and one backward) instead of two forwards' worth.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_activation_checkpointing", "replayable"]

_STORE = [None]      # while a checkpointed block runs: ("record", its results list) or ("replay", an iterator)


class _Mode:
    """Re-enterable context (every recomputation replays from the first result) setting _STORE."""
    def __init__(self, mode, results):
        self.mode, self.results = mode, results

    def __enter__(self):
        self.outer = _STORE[0]
        _STORE[0] = (self.mode, self.results if self.mode == "record" else iter(self.results))

    def __exit__(self, *exc):
        _STORE[0] = self.outer


def replayable(start):
    """start(*args) -> finish (starts a collective; finish(wait=True) -> its result, or None while in flight with
    wait=False) wrapped so that inside a checkpointed block the forward records each result and the recomputation
    gets them back in the same order, with no collective; elsewhere it is `start` itself. Only for small results:
    they stay alive until the block's backward."""
    def run(*args):
        if _STORE[0] is None:
            return start(*args)
        mode, results = _STORE[0]
        if mode == "replay":
            value = next(results)
            return lambda wait=True: value
        finish, index = start(*args), len(results)
        results.append(None)                        # its place in the order, filled when the result comes

        def record(wait=True):
            if results[index] is None:
                results[index] = finish(wait)
            return results[index]
        return record
    return run


def _contexts():
    results = []         # one store per checkpoint call: what its forward exchanged, in order
    return _Mode("record", results), _Mode("replay", results)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():          # eval / no_grad: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)
    return run


def apply_activation_checkpointing(model):
    """Recompute each block of `model.layers` in backward. ValueError if the model has no `layers` ModuleList.
    Returns the model."""
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList to checkpoint")
    for block in model.layers:
        block.forward = _checkpointed(block.forward)
    return model
