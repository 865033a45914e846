"""Memory planner core: the estimated peak memory per GPU (or per CPU rank) of a training job.

`plan(cfg, seq_len, ...)` is what `launch/plan_memory.py` prints; it reads each engine's declared memory terms
(`ENGINE.memory`, parallel/engines.py) and probes one block of each kind on the meta device.

Symbols: P parameters (built on the meta device: exact; per rank: routed experts' weights ÷ ep·tp, the rest ÷ tp),
tp tensor-parallel ranks, ep expert-parallel ranks within dp·sp, N = dp·sp ZeRO partitions (N/ep for expert
shards; this project's DDP and DeepSpeed span every data- and sequence-parallel rank), C = T/sp tokens per rank, B
sequences per rank, a = activation bytes (4 fp32, 2 under bf16 autocast), D width, n_layers blocks.

  parameters     4·P per rank            ÷N at ZeRO-3        (fp32 master weights; autocast computes in bf16)
  gradients      4·P per rank            ÷N at ZeRO ≥ 2
  optimizer      8·P per rank (AdamW)    ÷N at ZeRO ≥ 1
  comm buffers   gradient buckets (DDP: a copy of the gradients; ZeRO: DeepSpeed's 5e8-element buckets, capped by
                 the gradients) + the largest sequence-parallel exchange buffer
  activations    with checkpointing: n_layers block inputs (B·C·D·4, the residual stream stays fp32), the head
                 (final norm, d hidden, one loss chunk's logits), token ids, and the worst block's backward:
                     max(everything the block saved,  what it saved BEFORE its attention call + the engine's saved
                         tensors + the engine's backward working set + the attention gradients)
                 without: every block's saved tensors + the worst engine working set.
A block's saved tensors are counted exactly: one block of each kind runs on the meta device with autograd's
saved-tensor hooks, its attention function replaced by a stub; the engine's own terms (saved tensors, backward
working set, exchange buffer) come from its declaration, `ENGINE.memory` next to its code (parallel/engines.py),
listed per engine at the end of --help; the attention gradients (do, dq, dk, dv) are added to every engine's.
The local softmax op is tiled (kernels/softmax_attn.py: scores in per-thread tiles of ≤ 256 × 512, never C × T),
so every term is linear in C and T: softmax layers cost O(T·H_kv·d) (all-gather) or O(C·H·d), not O(C·T).
Not included: the runtime (CUDA context ≈ 0.5-1 GiB per GPU; on CPU the interpreter, torch and gloo ≈ 0.4 GiB
per rank, measured), allocator fragmentation, and temporaries inside the optimizer step.
"""
import functools
import inspect
import textwrap

import torch
import torch.nn.functional as F

from lasp import models
from lasp.apply import ENGINES
from lasp.parallel.engines import CallShape
from lasp.parallel.experts import EXPERT_WEIGHTS, check_expert_parallel

__all__ = ["MiB", "LINEAR_ENGINES", "SOFTMAX_ENGINES", "probe_blocks", "engine_terms", "engine_help", "plan"]

MiB = 2 ** 20
LINEAR_ENGINES = tuple(name for name, spec in ENGINES.items() if spec.kind == "linear")     # + ring_linear baseline
SOFTMAX_ENGINES = tuple(name for name, spec in ENGINES.items() if spec.kind == "softmax")


# ---------------------------------------------------------------------------------------------- meta probe
class _Stub(torch.autograd.Function):
    """Stands in for an attention engine: right output shape, saves nothing, flips the probe to 'after'."""

    @staticmethod
    def forward(ctx, q, k, v, probe, delta=False):
        probe["phase"] = "after"
        probe["shapes"] = dict(heads=q.shape[2], kv_heads=k.shape[2], d_k=q.shape[3], d_v=v.shape[3])
        if delta:           # the delta rule: v (and the state) has the H heads, q and k the H_kv = H_k
            probe["shapes"].update(heads=v.shape[2], delta=True)
        return q.new_empty((*q.shape[:2], v.shape[2] if delta else q.shape[2], v.shape[3]))

    @staticmethod
    def backward(ctx, do):
        return None, None, None, None, None


def _balanced_moe(module, x):
    """A routed MoE layer's forward on the meta device (no autocast, no bincount there): routing as usual, every
    expert given S·k/E of the S·k routes (dropless and balanced), so the probe counts what a balanced step saves."""
    shape, x = x.shape, x.reshape(-1, x.shape[-1])
    weights, _ = F.linear(x.float(), module.router.weight.float()).softmax(-1).topk(module.top_k, dim=-1)
    routes, E = x.shape[0] * module.top_k, module.gate_proj.shape[0]
    counts = [routes // E] * (E - 1) + [routes - routes // E * (E - 1)]
    y = module.run_experts(x.repeat_interleave(module.top_k, 0), counts).view(x.shape[0], module.top_k, -1)
    return (y.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype).view(shape)


def probe_blocks(cfg, probe_len=256):
    """{kind: dict(before=bytes/token, after=bytes/token, heads, kv_heads, d_k, d_v)} for one block of each kind,
    counted by autograd's saved-tensor hooks on the meta device (parameters excluded)."""
    model = models.build_model(cfg, device="meta")
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    out = {}
    for block in model.layers:
        kind = getattr(block, "kind", "L")
        if kind in out:
            continue
        probe = {"phase": "before", "before": {}, "after": {}}
        for mixer in block.modules():
            for attr in ("linear_attn", "softmax_attn", "delta_attn"):
                if hasattr(mixer, attr):
                    setattr(mixer, attr, lambda q, k, v, _d=attr == "delta_attn", **kw: _Stub.apply(q, k, v, probe,
                                                                                                   _d))
            if hasattr(mixer, "expert_dispatch") and getattr(mixer, "router", None) is not None:
                mixer.forward = functools.partial(_balanced_moe, mixer)

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in params and key not in probe["before"]:
                probe[probe["phase"]][key] = t.untyped_storage().nbytes()
            return t
        x = torch.zeros(1, probe_len, cfg.dim, device="meta", requires_grad=True)
        positions = torch.arange(probe_len, device="meta")[None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, positions)
        out[kind] = dict(before=sum(probe["before"].values()) / probe_len,
                         after=sum(probe["after"].values()) / probe_len, **probe["shapes"])
    return out


# ---------------------------------------------------------------------------------------------- the estimate
def engine_terms(kind, shapes, engine, B, C, T, sp, a, kernel, layout="contiguous"):
    """-> (saved, backward working set incl. the attention gradients, exchange buffer) bytes of one call."""
    H, H_kv, d_k, d_v = shapes["heads"], shapes["kv_heads"], shapes["d_k"], shapes["d_v"]
    spec = ENGINES[engine]
    assert spec.kind == ("linear" if kind == "L" else "softmax"), (kind, engine)
    grads = B * C * (H * (d_k + d_v) + H_kv * (d_k + d_v)) * a            # do, dq and dk, dv
    call = CallShape(B, C, T, sp, H, H_kv, d_k, d_v, a, kernel, layout)
    if shapes.get("delta"):                 # the delta-rule kind: do, dv, dβ, dg per value head, dq, dk per key head
        from lasp.delta import delta_memory
        saved, work, buf = delta_memory(call, engine)
        return saved, work + B * C * (H * (2 * d_v + 2) + 2 * H_kv * d_k) * a, buf
    saved, work, buf = spec.memory(call)
    return saved, work + grads, buf


def engine_help():
    """Each engine's declaration as --help lists it: kind, layouts, what it exchanges, its memory terms."""
    lines = ["engines (their declarations, ENGINE in each engine module):"]
    for name, spec in ENGINES.items():
        memory = textwrap.fill(" ".join(inspect.cleandoc(spec.memory.__doc__).split()), 110,
                               initial_indent="      memory ", subsequent_indent="        ")
        lines.append(f"  {name} ({spec.kind}{', benchmark baseline' if spec.baseline else ''}; "
                     f"{'/'.join(spec.layouts)})\n      exchanges {spec.exchange}\n{memory}")
    return "\n".join(lines)


def _parameters_per_rank(model, tp, ep):
    """-> (all parameters, replicated ones per rank, expert shards per rank): routed experts' stacked weights
    split over ep ranks (parallel/experts.py), everything split over tp (experts on their F channels)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(getattr(m, n).numel() for m in model.modules()
                  if hasattr(m, "expert_dispatch") and getattr(m, "router", None) is not None for n in EXPERT_WEIGHTS)
    return total, (total - experts) / tp, experts / (ep * tp)


def plan(cfg, seq_len, sp=1, dp=1, tp=1, zero=0, checkpointing=True, batch=1, dtype="fp32", linear="lasp2",
         softmax="allgather", kernel="torch", layout="contiguous", ep=1):
    """{term: bytes per rank} (+ 'total' and the inputs echoed). ValueError naming the argument on bad input.

    ep: expert-parallel ranks within dp·sp (routed experts only). ZeRO partitions replicated weights over the N =
    dp·sp ranks and expert shards over their N/ep replicas (the launcher runs ep with DDP only, parallel/experts.py;
    ZeRO with ep is this arithmetic, not a tested run)."""
    for name, value in (("sp", sp), ("dp", dp), ("tp", tp), ("batch", batch), ("ep", ep)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if seq_len % sp:
        raise ValueError(f"seq_len {seq_len} must be divisible by sp {sp}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0 (DDP) or a ZeRO stage 1-3, got {zero}")
    if (dp * sp) % ep:
        raise ValueError(f"ep={ep} must divide dp x sp = {dp * sp}")
    model = models.build_model(cfg, device="meta")
    check_expert_parallel(model, ep)
    total, P_rep, P_exp = _parameters_per_rank(model, tp, ep)
    N, C, a = dp * sp, seq_len // sp, {"fp32": 4, "bf16": 2}[dtype]
    def sharded(stage):     # parameters per rank, ZeRO-partitioned from `stage` on
        return P_rep / (N if zero >= stage else 1) + P_exp / (N // ep if zero >= stage else 1)
    P = P_rep + P_exp
    kinds = cfg.layer_types() if hasattr(cfg, "layer_types") else "L" * cfg.n_layers
    blocks = {}
    for kind, probe in probe_blocks(cfg).items():
        engine = linear if kind == "L" else softmax
        saved, work, buf = engine_terms(kind, probe, engine, batch, C, seq_len, sp, a, kernel, layout)
        before, after = (probe[k] * batch * C * a / 4 / tp for k in ("before", "after"))
        blocks[kind] = dict(all=before + after + saved / tp, peak=max(before + after + saved / tp,
                            before + (saved + work) / tp), work=work / tp, buf=buf)
    head = batch * C * (4 * cfg.dim * 4 + 24) + 3 * cfg.loss_chunk_tokens * cfg.vocab_size * 4
    if checkpointing:
        acts = cfg.n_layers * batch * C * cfg.dim * 4 + max(b["peak"] for b in blocks.values())
    else:
        acts = sum(blocks[k]["all"] for k in kinds) + max(b["work"] for b in blocks.values())
    terms = dict(parameters=4 * sharded(3), gradients=4 * sharded(2), optimizer_states=8 * sharded(1),
                 activations=acts + head,
                 comm_buffers=(4 * P if zero == 0 else min(4 * P, 5e8 * 4)) + max(b["buf"] for b in blocks.values()))
    terms["total"] = sum(terms.values())
    return dict(terms, params=total, params_per_rank=P, tokens_per_rank=C, ranks=dict(sp=sp, dp=dp, tp=tp, ep=ep),
                zero=zero,
                checkpointing=checkpointing, dtype=dtype, engines=dict(linear=linear, softmax=softmax), kernel=kernel,
                layout=layout)
