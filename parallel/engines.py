"""Engine declarations: each sequence-parallel engine module states, once, what it is.

Every engine module (lasp/lasp2.py, lasp/lasp1.py, lasp/allscan.py, lasp/ring_linear.py, parallel/allgather_attn.py,
parallel/ring_attn.py, parallel/ulysses.py) defines `ENGINE = EngineSpec(...)` under its public function's name.
lasp.apply builds LINEAR_ENGINES / SOFTMAX_ENGINES from them, launch/bench.py takes functions and layouts from
them, launch/plan_memory.py calls their `memory`. A new engine is one module with one declaration.

Memory terms (bytes per rank of ONE attention call) are a function of a CallShape, whose fields are the
planner's symbols: B sequences per rank, C = T/sp local tokens, T global tokens, sp ranks, H query heads, H_kv
key/value heads, d_k, d_v head dims, a activation bytes (4 fp32, 2 under bf16 autocast), kernel "torch" |
"triton" (the local linear kernel), layout. `memory(shape)` -> (saved tensors, backward working set WITHOUT the
attention gradients dq, dk, dv, do — the planner adds those, the same for every engine — exchange buffer).
"""
from dataclasses import dataclass
from typing import Callable

__all__ = ["EngineSpec", "CallShape", "LINEAR_KERNEL_BWD_FLOATS", "linear_saved", "linear_kernel_work",
           "attention_out_lse"]

# working set per token per H·(d_k + d_v)/2 of the local linear kernel's backward (measured: kernels/linear_attn.py
# recomputes the chunked forward under autograd with the torch kernels; 4 with Triton)
LINEAR_KERNEL_BWD_FLOATS = {"torch": 16.6, "triton": 4.0}


@dataclass(frozen=True)
class CallShape:
    """The sizes one attention call's memory depends on (symbols of the module docstring)."""
    B: int
    C: int
    T: int
    sp: int
    H: int
    H_kv: int
    d_k: int
    d_v: int
    a: int
    kernel: str = "torch"
    layout: str = "contiguous"


@dataclass(frozen=True)
class EngineSpec:
    """One engine: name, kind ("linear" | "softmax"), its public function, the layouts it runs, what it
    exchanges (words, for docs and reports) and its memory terms (CallShape -> (saved, work, buffer) bytes)."""
    name: str
    kind: str
    fn: Callable
    layouts: tuple
    exchange: str
    memory: Callable
    baseline: bool = False          # a benchmark baseline only (not offered to training)
    splits_heads: bool = False      # exchanges heads for tokens (all-to-all): the sp ranks must divide H
    overlaps_exchange: bool = False  # its all-gather runs behind local compute (bench: the share hidden)

    def __post_init__(self):
        assert self.kind in ("linear", "softmax"), self.kind
        assert "contiguous" in self.layouts, self.layouts


def linear_saved(s):
    """A linear engine's saved tensors: q, k, v (H heads) and the two fp32 states (prefix, suffix)."""
    return s.B * s.C * s.H * (2 * s.d_k + s.d_v) * s.a + 2 * s.B * s.H * s.d_k * s.d_v * 4


def linear_kernel_work(s):
    """The local chunked linear kernel's backward working set."""
    return LINEAR_KERNEL_BWD_FLOATS[s.kernel] * s.B * s.C * s.H * (s.d_k + s.d_v) / 2 * 4


def attention_out_lse(s):
    """A softmax engine's saved output (a bytes) and fp32 log-sum-exp, local tokens, H heads."""
    return s.B * s.C * s.H * (s.d_v * s.a + 4)
