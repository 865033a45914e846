"""Make a plain model sequence-parallel from outside: swap the attention functions of its token mixers.

A model's linear mixers hold `linear_attn` ((q, k, v, *, log_decay, causal) -> o) and its softmax mixers hold
`softmax_attn` ((q, k, v, *, causal, scale, segment_ids) -> o); by default both compute on one process. Here each
is set to functools.partial(engine, layout=..., group=...), so every rank runs the same model on its local shard
(B, T/W, ...) of tokens in `layout` order, with global positions supplied by the caller. Modules are found by
those attribute names, never by importing model classes.
"""
import functools
import inspect

from parallel import allgather_attention, comm, layout as layouts, mesh, ring_attention, ulysses_attention

from .allscan import allscan
from .lasp1 import lasp1
from .lasp2 import lasp2

__all__ = ["LINEAR_ENGINES", "SOFTMAX_ENGINES", "resolve_engines", "apply_sequence_parallel"]

LINEAR_ENGINES = ("lasp2", "lasp1", "allscan")
_LINEAR_FUNCTIONS = {"lasp2": lasp2, "lasp1": lasp1, "allscan": allscan}
SOFTMAX_ENGINES = ("allgather", "ring", "ulysses", "local")
_SOFTMAX_FUNCTIONS = {"allgather": allgather_attention, "ring": ring_attention, "ulysses": ulysses_attention}


def _takes_layout(fn):
    """Whether an engine accepts `layout` (contiguous-only engines do not)."""
    return "layout" in inspect.signature(fn).parameters


def resolve_engines(linear="lasp2", softmax="allgather", layout="contiguous"):
    """-> (linear engine, softmax engine or None for "local"). ValueError naming the choices for unknown names
    or an engine that cannot run `layout` (LASP-1: contiguous only)."""
    if linear not in LINEAR_ENGINES:
        raise ValueError(f"linear engine must be one of {LINEAR_ENGINES}, got {linear!r}")
    if softmax not in SOFTMAX_ENGINES:
        raise ValueError(f"softmax engine must be one of {SOFTMAX_ENGINES}, got {softmax!r}")
    layouts.segments_per_rank(layout)                                   # ValueError for an unknown layout
    if linear == "lasp1" and layout != "contiguous":
        raise ValueError(f"linear engine 'lasp1' runs only the 'contiguous' layout, got {layout!r}: use 'lasp2'")
    softmax_fn = None
    if softmax != "local":
        softmax_fn = _SOFTMAX_FUNCTIONS[softmax]
        if layout != "contiguous" and not _takes_layout(softmax_fn):
            raise ValueError(f"softmax engine {softmax!r} runs only the 'contiguous' layout, got {layout!r}")
    return _LINEAR_FUNCTIONS[linear], softmax_fn


def _bind(engine, layout, group):
    """engine with layout (if it takes one) and group fixed: the mixer calls it like the local default."""
    if _takes_layout(engine):
        return functools.partial(engine, layout=layout, group=group)
    return functools.partial(engine, group=group)                       # contiguous-only engines


def apply_sequence_parallel(model, *, linear="lasp2", softmax="allgather", layout="contiguous", group=None):
    """Set every mixer's attention function to a sequence-parallel engine over `group`; returns the model.

    linear ∈ LINEAR_ENGINES, softmax ∈ SOFTMAX_ENGINES ("local": softmax layers attend within their own shard only,
    which is exact on a group of one; refused on a larger group when the model has softmax layers).
    group=None: the mesh's sequence-parallel group, else the default group. Raises ValueError (see
    `resolve_engines`) before touching the model.
    """
    linear_fn, softmax_fn = resolve_engines(linear, softmax, layout)
    linear_mixers = [m for m in model.modules() if hasattr(m, "linear_attn")]
    softmax_mixers = [m for m in model.modules() if hasattr(m, "softmax_attn")]
    resolved = mesh.sp_group() if group is None else group
    if softmax_fn is None and softmax_mixers and comm.group_size(resolved) > 1:
        raise ValueError(f"softmax engine 'local' is exact only on one rank; the group has "
                         f"{comm.group_size(resolved)}: use one of {SOFTMAX_ENGINES[:-1]}")
    for m in linear_mixers:
        m.linear_attn = _bind(linear_fn, layout, group)
    for m in softmax_mixers:
        if softmax_fn is None:
            m.__dict__.pop("softmax_attn", None)                        # back to the class default (local)
        else:
            m.softmax_attn = _bind(softmax_fn, layout, group)
    return model
