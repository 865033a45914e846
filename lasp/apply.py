"""Make a plain model sequence-parallel from outside: swap the attention functions of its token mixers.

A model's linear mixers hold `linear_attn` ((q, k, v, *, log_decay, causal[, log_gate][, segment_ids]) -> o), its
delta-rule mixers `delta_attn` ((q, k, v, *, beta, log_gate, segment_ids) -> o: the same linear engines, with
beta=), and its softmax mixers `softmax_attn` ((q, k, v, *, causal, scale, segment_ids) -> o); by default all
compute on one process. Here each is set to functools.partial(engine, layout=..., group=...), so every rank runs
the same model on its local shard (B, T/W, ...) of tokens in `layout` order, with global positions supplied by the
caller. Modules are found by those attribute names, never by importing model classes. Short convolutions (modules
holding `short_conv`) get parallel.short_conv's halo-exchanging version in the same layout and group.
"""
import functools

from lasp.parallel import comm, layout as layouts, mesh
from lasp.parallel.allgather_attn import ENGINE as _ALLGATHER
from lasp.parallel.ring_attn import ENGINE as _RING
from lasp.parallel.short_conv import sequence_parallel_short_conv
from lasp.parallel.ulysses import ENGINE as _ULYSSES

from .allscan import ENGINE as _ALLSCAN
from .lasp1 import ENGINE as _LASP1
from .lasp2 import ENGINE as _LASP2
from .ring_linear import ENGINE as _RING_LINEAR

__all__ = ["ENGINES", "LINEAR_ENGINES", "SOFTMAX_ENGINES", "BASELINE_ENGINES", "resolve_engines", "bind_engine",
           "apply_sequence_parallel"]

# every engine's declaration (parallel/engines.py EngineSpec), by name; the tuples below are read from it
ENGINES = {spec.name: spec for spec in (_LASP2, _LASP1, _RING_LINEAR, _ALLSCAN, _ALLGATHER, _RING, _ULYSSES)}
LINEAR_ENGINES = tuple(n for n, spec in ENGINES.items() if spec.kind == "linear" and not spec.baseline)
SOFTMAX_ENGINES = tuple(n for n, spec in ENGINES.items() if spec.kind == "softmax" and not spec.baseline) + ("local",)
BASELINE_ENGINES = tuple(n for n, spec in ENGINES.items() if spec.baseline)    # benchmarks only (ring_linear)


def _resolve_specs(linear, softmax, layout, baselines):
    """-> (linear EngineSpec, softmax EngineSpec or None for "local"); ValueError as `resolve_engines`."""
    linear_choices = LINEAR_ENGINES + (BASELINE_ENGINES if baselines else ())
    if linear not in linear_choices:
        raise ValueError(f"linear engine must be one of {LINEAR_ENGINES}, got {linear!r}")
    if softmax not in SOFTMAX_ENGINES:
        raise ValueError(f"softmax engine must be one of {SOFTMAX_ENGINES}, got {softmax!r}")
    layouts.segments_per_rank(layout)                                   # ValueError for an unknown layout
    if layout not in ENGINES[linear].layouts:
        raise ValueError(f"linear engine {linear!r} runs only the 'contiguous' layout, got {layout!r}: use 'lasp2'")
    softmax_spec = None if softmax == "local" else ENGINES[softmax]
    if softmax_spec is not None and layout not in softmax_spec.layouts:
        raise ValueError(f"softmax engine {softmax!r} runs only the 'contiguous' layout, got {layout!r}")
    return ENGINES[linear], softmax_spec


def resolve_engines(linear="lasp2", softmax="allgather", layout="contiguous", baselines=False):
    """-> (linear engine, softmax engine or None for "local"). ValueError naming the choices for unknown names
    or an engine that cannot run `layout` (LASP-1: contiguous only). baselines=True also accepts the linear
    benchmark baselines (BASELINE_ENGINES)."""
    linear_spec, softmax_spec = _resolve_specs(linear, softmax, layout, baselines)
    return linear_spec.fn, None if softmax_spec is None else softmax_spec.fn


def bind_engine(spec, layout, group):
    """spec.fn with layout (if it runs more than one) and group fixed: the mixer calls it like the local default."""
    if len(spec.layouts) > 1:
        return functools.partial(spec.fn, layout=layout, group=group)
    return functools.partial(spec.fn, group=group)                      # contiguous-only engines


def apply_sequence_parallel(model, *, linear="lasp2", softmax="allgather", layout="contiguous", group=None,
                            baselines=False):
    """Set every mixer's attention function to a sequence-parallel engine over `group`; returns the model.

    linear ∈ LINEAR_ENGINES, softmax ∈ SOFTMAX_ENGINES ("local": softmax layers attend within their own shard only,
    which is exact on a group of one; refused on a larger group when the model has softmax layers).
    group=None: the mesh's sequence-parallel group, else the default group. baselines=True also accepts the
    benchmark baselines (ring_linear). Raises ValueError (see `resolve_engines`) before touching the model.
    """
    linear_spec, softmax_spec = _resolve_specs(linear, softmax, layout, baselines)
    linear_mixers = [m for m in model.modules() if hasattr(m, "linear_attn")]
    softmax_mixers = [m for m in model.modules() if hasattr(m, "softmax_attn")]
    resolved = mesh.sp_group() if group is None else group
    if softmax_spec is None and softmax_mixers and comm.group_size(resolved) > 1:
        raise ValueError(f"softmax engine 'local' is exact only on one rank; the group has "
                         f"{comm.group_size(resolved)}: use one of {SOFTMAX_ENGINES[:-1]}")
    for m in linear_mixers:
        m.linear_attn = bind_engine(linear_spec, layout, group)
    for m in (m for m in model.modules() if hasattr(m, "delta_attn")):      # the delta rule: beta= on the engine
        m.delta_attn = bind_engine(linear_spec, layout, group)
    for m in model.modules():                # short convolutions (common.ShortConvolution): halo from the rank before
        if hasattr(m, "short_conv"):
            m.short_conv = functools.partial(sequence_parallel_short_conv, layout=layout, group=group)
    for m in softmax_mixers:
        if softmax_spec is None:
            m.__dict__.pop("softmax_attn", None)                        # back to the class default (local)
        else:
            m.softmax_attn = bind_engine(softmax_spec, layout, group)
    return model
