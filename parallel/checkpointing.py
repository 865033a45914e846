"""Activation checkpointing applied from outside: each block of `model.layers` keeps only its input in forward and
recomputes itself in backward (torch.utils.checkpoint, non-reentrant), like the other `apply_*` functions.

Memory per block: its input (B, C, D) instead of every intermediate; cost: one more forward per block in backward.
The instance's forward is wrapped (no module is replaced), so parameter names and state dicts do not change, and
it composes with the sequence-, tensor- and expert-parallel wrappers applied before it: their collectives run
again in the recomputation, in the same order on every rank.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_activation_checkpointing"]


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():          # eval / no_grad: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(model):
    """Recompute each block of `model.layers` in backward. ValueError if the model has no `layers` ModuleList.
    Returns the model."""
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList to checkpoint")
    for block in model.layers:
        block.forward = _checkpointed(block.forward)
    return model
