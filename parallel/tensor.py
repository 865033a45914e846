"""Tensor parallelism (Megatron's scheme) applied from outside to a plain model: attention heads, MLP channels and
the vocabulary are split over the tensor-parallel group; the residual stream stays replicated.

Shapes: n tp ranks, x (B, T, D) replicated on every rank of the group; a rank holds H/n heads, F/n MLP channels
and V_pad/n vocabulary rows (V padded up to a multiple of n). Per token mixer or MLP ("unit"):

    x  -> f(x)                        f: identity forward, all-reduce of dx backward (one per unit)
    y_r = x W_rᵀ                       column-parallel: W_r = this rank's rows of q/k/v/gate/up (dim 0)
    o_r = per-head work on H/n heads   LASP-2 states, gathered K/V and ring messages carry only local heads
    out = g(o_r W_out,rᵀ)              row-parallel: W_out,r = this rank's columns (dim 1); g: all-reduce forward

so a block costs two all-reduces of (B, T, D) forward and two backward, plus: TNL's SRMSNorm over the full width
of the attention output all-reduces Σ o² (B, T, 1) each way; Linear-Llama3's per-head output-norm weight sees only
local heads, so its gradient (d,) is all-reduced. The embedding and the output head are split over the vocabulary;
the loss is a vocabulary-parallel cross-entropy run chunk by chunk (`vocab_parallel_chunk_loss`).

BAM mixtures (a mixer with `n_experts` N > 1, models/common.py): the wide attention's N·H heads are split per
expert head group, rank r holding heads [r·H/n, (r+1)·H/n) of every expert (q/k/v/gate rows and output columns
split as N blocks, k/v as N_kv), so a rank's heads stay expert-major and KV sharing's GQA groups stay local. The
soft-gate router is replicated; it sees only local heads, so its gradient is all-reduced like the head norms'.
Routed FFN experts (a module with `expert_dispatch`, models/moe.py): every expert's SwiGLU is split like the dense
MLP (gate_proj, up_proj (E, F, D) on F; down_proj (E, D, F) on F), f and g wrapped around `run_experts`, whose
rows are the routed copies (S·k, D); the router and the routing run replicated outside them, identically on every
rank, so its gradient (language-model and router losses) is already whole and is not reduced.

From megatron-core (0.16): the vocabulary partition (`VocabUtility`), the cross-entropy arithmetic
(`VocabParallelCrossEntropy`'s steps) and the tensor-parallel parameter attributes. Written by hand, each marked
below: the communication. megatron's ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding /
vocab_parallel_cross_entropy run on CPU gloo, but they call torch.distributed directly, outside parallel/comm.py
(whose `count_collectives` the tests and benchmarks read), and the cross-entropy takes its group from
parallel_state's module global; here every collective goes through comm.py with the group passed explicitly, and
megatron's parallel_state is never initialised.

Sharding slices the full model every rank built from one seed; `full_state_dict` / `load_full_state_dict` gather
and slice again, so checkpoints hold plain full weights and a run moves between tensor-parallel sizes.
"""
import functools
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import comm
from .mesh import Mesh, current_mesh

__all__ = ["Shard", "TensorParallelPlan", "VocabParallelEmbedding", "TensorParallelRMSNorm", "check_tensor_parallel",
           "apply_tensor_parallel", "vocab_parallel_chunk_loss", "full_state_dict", "load_full_state_dict",
           "full_optimizer_state", "load_full_optimizer_state", "clip_grad_norm_", "replica_group"]

RESIDUAL_WRITERS = ("out_proj", "down_proj")   # a unit's row-parallel projection (names as in init_linear_weights)
REPLICATED = ("router",)                       # Linear children of a unit that are not split (BAM's soft gates)
EXPERT_SHARDS = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}    # stacked FFN experts: the dim of F


def _megatron():
    """megatron.core.tensor_parallel, imported on first use (seconds, and Apex/TE warnings we do not need)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import tensor_parallel
    return tensor_parallel


# ----------------------------------------------------------------------------------- f, g and their twin
# By hand: megatron.core.tensor_parallel.mappings has these, but calls torch.distributed directly (uncounted).
class _CopyToTensorParallel(torch.autograd.Function):
    """f: x -> x; backward sums the partial dx that each rank's shard of the projections produced."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        return comm.all_reduce(dx.clone(memory_format=torch.contiguous_format), ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """g: partial sums -> their sum over the group; backward passes the (replicated) gradient through."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, dx):
        return dx, None


class _AllReduceSum(torch.autograd.Function):
    """A sum over the group whose result every rank uses on its own shard: all-reduce both ways."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_reduce(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, dx):
        return comm.all_reduce(dx.clone(memory_format=torch.contiguous_format), ctx.group), None


def _copy_input_hook(group, module, args):
    return (_CopyToTensorParallel.apply(args[0], group), *args[1:])


def _reduce_output_hook(group, module, args, out):
    return _ReduceFromTensorParallel.apply(out, group)


def _reduce_grad_hook(group, grad):
    return comm.all_reduce(grad.clone(memory_format=torch.contiguous_format), group)


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _local_heads(log_decay, start, stop, device=None):
    """The (H,) per-head decay of the full model restricted to this rank's heads [start, stop)."""
    full = log_decay(device)
    return None if full is None else full[start:stop]


# ----------------------------------------------------------------------------------- modules
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V_pad/n) of the padded table: tokens outside look up zeros, and g (the sum over ranks)
    completes every row. tokens (B, T) -> (B, T, D). By hand: megatron's twin all-reduces outside comm.py."""

    def __init__(self, weight, start, group):
        super().__init__()
        self.weight, self.start, self.group = weight, start, group

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return _ReduceFromTensorParallel.apply(rows, self.group)


class TensorParallelRMSNorm(nn.Module):
    """RMSNorm over `dim` features of which each rank holds dim/n: y = x·rsqrt(Σ_ranks Σ x² / dim + eps)·w_r.

    Exact, not a per-shard approximation: the sum of squares (B, T, 1) is all-reduced each way. Not in megatron.
    """

    def __init__(self, norm, group):
        super().__init__()
        self.dim, self.eps, self.group = norm.dim, norm.eps, group
        self.weight = norm.weight                          # None for TNL's SRMSNorm; else already sliced

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        sum_sq = _AllReduceSum.apply(xf.pow(2).sum(-1, keepdim=True), self.group)
        y = (xf * torch.rsqrt(sum_sq / self.dim + self.eps)).to(x.dtype)
        return y if self.weight is None else y * self.weight


# ----------------------------------------------------------------------------------- cross-entropy
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from this rank's logits (N, V_r) over vocabulary ids [start, start + V_r) -> (N,).

    megatron-core's arithmetic (VocabParallelCrossEntropy's static steps) with our communication, by hand:
    megatron's vocab_parallel_cross_entropy reads its group from parallel_state's global, and its group-taking
    fused twin casts the gradient to bf16. logits are modified in place (as in megatron): pass a fresh tensor.
    """

    @staticmethod
    def forward(ctx, logits, target, start, group):
        steps = _megatron().cross_entropy.VocabParallelCrossEntropy
        # the max over the whole vocabulary: a MAX all-reduce, done as a gather (comm.all_reduce only sums)
        logits_max = comm.all_gather(logits.max(-1)[0][None], group).amax(0)
        mask, target_1d, predicted, sum_exp, exp_logits = steps.calculate_predicted_logits(
            logits, target, logits_max, start, start + logits.shape[-1])
        predicted, sum_exp = comm.all_reduce(torch.cat([predicted, sum_exp]), group).chunk(2)  # one call
        softmax, loss = steps.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)
        ctx.save_for_backward(softmax, mask, target_1d)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        steps = _megatron().cross_entropy.VocabParallelCrossEntropy
        softmax, mask, target_1d = ctx.saved_tensors
        grad_2d, rows, update, grad = steps.prepare_gradient_calculation_operands(softmax, mask)
        return steps.calculate_gradients(grad_2d, rows, target_1d, update, grad, dloss), None, None, None


def vocab_parallel_chunk_loss(hidden, weight, labels, valid, *, vocab_size, group):
    """The `chunk_loss` of models.common.chunked_cross_entropy with the output embedding split over the vocabulary.

    hidden (N, D) replicated; weight (V_pad/n, D) this rank's rows; labels (N,); valid (N,) 0/1 -> Σ valid losses,
    the same on every rank. Padded rows (ids ≥ vocab_size) get logit −inf: the loss equals the unpadded one.
    """
    start = comm.group_rank(group) * weight.shape[0]
    logits = (_CopyToTensorParallel.apply(hidden, group) @ weight.t()).to(torch.promote_types(hidden.dtype,
                                                                                               torch.float32))
    if start + weight.shape[0] > vocab_size:
        padded = torch.arange(start, start + weight.shape[0], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    losses = _VocabParallelCrossEntropy.apply(logits, labels.clamp(min=0), start, group)
    return (losses * valid).sum()


# ----------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Shard:
    """How a parameter is split: along `dim`; `parts` fused blocks (TNL's q|k|v|u) each split on its own, as
    megatron's `partition_stride`; `vocab` > 0: the full vocabulary, the split dim being padded to a multiple of n."""
    dim: int
    parts: int = 1
    vocab: int = 0

    def split(self, full, rank, n):
        """Full tensor -> this rank's shard."""
        x = full.movedim(self.dim, 0)
        if self.vocab and x.shape[0] % n:
            x = torch.cat([x, x.new_zeros(-x.shape[0] % n, *x.shape[1:])])
        x = x.reshape(self.parts, n, -1, *x.shape[1:])[:, rank].reshape(-1, *x.shape[1:])
        return x.movedim(0, self.dim).contiguous()

    def gather(self, local, group, n):
        """This rank's shard -> the full tensor (an all-gather over the tp group; every rank gets it)."""
        x = local.movedim(self.dim, 0).contiguous()
        full = comm.all_gather(x, group).reshape(n, self.parts, -1, *x.shape[1:])
        full = full.transpose(0, 1).reshape(-1, *x.shape[1:])
        return (full[:self.vocab] if self.vocab else full).movedim(0, self.dim).contiguous()


@dataclass
class TensorParallelPlan:
    """What apply_tensor_parallel did: the group, and the Shard of every split parameter by state-dict name."""
    group: object
    size: int
    rank: int
    vocab_size: int
    padded_vocab_size: int
    shards: dict = field(default_factory=dict)

    def shard(self, name, full):
        spec = self.shards.get(name)
        return full if spec is None else spec.split(full, self.rank, self.size)

    def unshard(self, name, local):
        spec = self.shards.get(name)
        return local if spec is None else spec.gather(local, self.group, self.size)


# ----------------------------------------------------------------------------------- finding the layers
def _column_parts(module, name, features, width):
    """Blocks of a column Linear split each on its own: an attention mixture's N expert blocks (N_kv for k, v), or
    k fused blocks when its width is k times the writer's input (TNL's q|k|v|u: 4), else 1."""
    experts = getattr(module, "n_experts", 1)
    if experts > 1:
        return module.n_kv if name in ("k_proj", "v_proj") else experts
    return max(1, features // width) if features % width == 0 else 1


def _units(model):
    """[(name, module, {column Linear: parts}, row Linear, row parts)] for every module with a residual writer
    child (`out_proj` / `down_proj` Linear): the token mixers and dense MLPs. Found by names and attributes, never
    by importing model classes. Every other Linear child but a router reads the unit's input and is
    column-parallel, split block by block (`_column_parts`); an attention mixture's writer in N column blocks."""
    units = []
    for name, module in model.named_modules():
        row = next((n for n in RESIDUAL_WRITERS if isinstance(getattr(module, n, None), nn.Linear)), None)
        if row is None:
            continue
        width = getattr(module, row).in_features
        columns = {n: _column_parts(module, n, c.out_features, width) for n, c in module.named_children()
                   if isinstance(c, nn.Linear) and n != row and n not in REPLICATED}
        units.append((name, module, columns, row, getattr(module, "n_experts", 1)))
    return units


def _expert_layers(model):
    """[(name, module)] of the routed FFN layers (stacked expert weights, `expert_dispatch`; models/moe.py)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "expert_dispatch")]


def check_tensor_parallel(model, tp):
    """ValueError naming the sizes when `model` cannot be split over `tp` ranks: heads or KV heads, projection
    widths (the MLP width), a row-parallel bias. Touches nothing, issues no collective.
    -> the vocabulary size padded up to a multiple of tp (0 for a model without an `embed` table)."""
    if tp < 1:
        raise ValueError(f"tensor parallelism: tp must be >= 1, got {tp}")
    for name, module in model.named_modules():      # layers whose channels tp does not split (yet): refuse, not crash
        for attr, what in (("delta_attn", "a delta-rule (Gated DeltaNet) layer: its convolution, A_log and dt_bias "
                                          "are per channel or head"), ("short_conv", "a short convolution")):
            if tp > 1 and hasattr(module, attr):
                raise ValueError(f"tensor parallelism: {name} is {what}, which tp does not split; run this model "
                                 f"with tp=1 (sequence and data parallelism, ZeRO)")
    for name, module in _expert_layers(model):
        channels = module.gate_proj.shape[1]
        if channels % tp:
            raise ValueError(f"tensor parallelism: {name} experts have {channels} channels (ffn_dim), not "
                             f"divisible by tp={tp}")
    for name, module, columns, row, _ in _units(model):
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(module, attr, None)
            if heads is not None and heads % tp:
                raise ValueError(f"tensor parallelism: {name}.{attr}={heads} is not divisible by tp={tp} "
                                 f"(each rank holds whole heads)")
        for col, parts in columns.items():
            features = getattr(module, col).out_features
            if features % (parts * tp):
                fused = f" in {parts} fused blocks" if parts > 1 else ""
                raise ValueError(f"tensor parallelism: {name}.{col} has {features} output features{fused}, "
                                 f"not divisible by tp={tp}")
        if getattr(module, row).bias is not None:
            raise ValueError(f"tensor parallelism: {name}.{row} has a bias (it would be summed tp times)")
        if getattr(module, row).in_features % tp:
            raise ValueError(f"tensor parallelism: {name}.{row} has {getattr(module, row).in_features} input "
                             f"features, not divisible by tp={tp}")
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        return 0
    if not hasattr(model, "cross_entropy"):
        raise ValueError(f"tensor parallelism: {type(model).__name__} has no `cross_entropy` hook for the "
                         f"vocabulary-parallel loss")
    return -(-embed.num_embeddings // tp) * tp


def _split_unit(prefix, module, columns, row, row_parts, plan):
    """Record the shards of one mixer / MLP and set its hooks (f on the input, g on the writer's output)."""
    n, group = plan.size, plan.group
    for col, parts in columns.items():
        plan.shards[_join(prefix, f"{col}.weight")] = Shard(0, parts)
        if getattr(module, col).bias is not None:
            plan.shards[_join(prefix, f"{col}.bias")] = Shard(0, parts)
        getattr(module, col).out_features //= n
    plan.shards[_join(prefix, f"{row}.weight")] = Shard(1, row_parts)
    getattr(module, row).in_features //= n
    module.register_forward_pre_hook(functools.partial(_copy_input_hook, group))
    getattr(module, row).register_forward_hook(functools.partial(_reduce_output_hook, group))
    heads = getattr(module, "n_heads", None)
    if heads and callable(getattr(module, "log_decay", None)):             # per-head decay of the FULL model
        local = heads // n
        module.log_decay = functools.partial(_local_heads, module.log_decay, plan.rank * local,
                                             (plan.rank + 1) * local)
    norm = getattr(module, "norm", None)
    if heads and getattr(norm, "dim", None) == heads * getattr(module, "head_dim", 0):
        if norm.weight is not None:                                        # a norm over all heads together
            plan.shards[_join(prefix, "norm.weight")] = Shard(0)
        module.norm = TensorParallelRMSNorm(norm, group)                   # (TNL): exact across the shards
    for name, p in module.named_parameters():
        full_name = _join(prefix, name)
        if full_name in plan.shards or name.split(".")[0] in columns or name.split(".")[0] == row:
            continue
        if heads and p.dim() and p.shape[0] == heads and not name.startswith(("norm.", *REPLICATED)):
            plan.shards[full_name] = Shard(0)                              # a per-head table (TNL's LRPE θ)
        else:                                                              # replicated, sees only local heads
            p.register_hook(functools.partial(_reduce_grad_hook, group))


def _tensor_parallel_experts(run_experts, group, rows, counts):
    """run_experts on this rank's F/n channels of every expert: f on the routed rows (n, D), g on the output."""
    return _ReduceFromTensorParallel.apply(run_experts(_CopyToTensorParallel.apply(rows, group), counts), group)


def _split_experts(prefix, module, plan):
    """Each stacked expert's SwiGLU split on its F channels; the router and the routing stay replicated."""
    for name, dim in EXPERT_SHARDS.items():
        plan.shards[_join(prefix, name)] = Shard(dim)
    module.run_experts = functools.partial(_tensor_parallel_experts, module.run_experts, plan.group)


def _split_vocabulary(model, plan):
    """Embedding (and an untied `lm_head`) split over the padded vocabulary; the loss made vocabulary-parallel."""
    embed = getattr(model, "embed", None)
    if not isinstance(embed, nn.Embedding):
        return
    vocab = _megatron().utils.VocabUtility
    start, _ = vocab.vocab_range_from_global_vocab_size(plan.padded_vocab_size, plan.rank, plan.size)
    plan.shards["embed.weight"] = Shard(0, vocab=plan.vocab_size)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight is not embed.weight:
        plan.shards["lm_head.weight"] = Shard(0, vocab=plan.vocab_size)
        head.out_features = plan.padded_vocab_size // plan.size            # logits(): this rank's vocab columns
    model.embed = VocabParallelEmbedding(embed.weight, start, plan.group)
    model.cross_entropy = functools.partial(model.cross_entropy, chunk_loss=functools.partial(
        vocab_parallel_chunk_loss, vocab_size=plan.vocab_size, group=plan.group))


def apply_tensor_parallel(model, mesh_or_group=None):
    """Split a plain model over a tensor-parallel group, in place; returns the model (with `model.tensor_parallel`,
    the TensorParallelPlan). Every rank of the group must hold the same full weights (build from one seed).

    mesh_or_group: a Mesh (its "tp" group), a process group, or None (the current mesh's tp group, else the default
    group). ValueError naming the sizes (see check_tensor_parallel) before anything changes or communicates; a
    vocabulary that is not a multiple of tp is padded (with a warning) and the padding never affects the loss.
    After it, `model.logits()` returns this rank's vocabulary columns; the loss is that of the full vocabulary.
    Assumes (as in models/) that a unit reads its input only through its column projections (and a replicated
    router whose gates scale local heads), writes the residual stream only through its writer, and that its other
    parameters act on local heads (their gradients are summed); and that routed experts see tokens only through
    `run_experts` (models/moe.py).
    """
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("apply_tensor_parallel: the model is already tensor-parallel")
    group = mesh_or_group.group("tp") if isinstance(mesh_or_group, Mesh) else mesh_or_group
    if group is None and current_mesh() is not None:
        group = current_mesh().group("tp")
    n, rank = comm.group_size(group), comm.group_rank(group)
    padded = check_tensor_parallel(model, n)
    vocab = getattr(getattr(model, "embed", None), "num_embeddings", 0)
    if padded != vocab:
        warnings.warn(f"tensor parallelism: vocab_size {vocab} is not a multiple of tp={n}; the embedding and "
                      f"output head are padded to {padded} rows (masked out of the loss, dropped from checkpoints)")
    plan = TensorParallelPlan(group, n, rank, vocab, padded)
    for prefix, module, columns, row, row_parts in _units(model):
        _split_unit(prefix, module, columns, row, row_parts, plan)
    for prefix, module in _expert_layers(model):
        _split_experts(prefix, module, plan)
    _split_vocabulary(model, plan)
    megatron = _megatron()
    for name, p in model.named_parameters():
        if name in plan.shards:
            p.data = plan.shard(name, p.data)
            megatron.set_tensor_model_parallel_attributes(p, True, plan.shards[name].dim, plan.shards[name].parts)
    model.tensor_parallel = plan
    return model


# ----------------------------------------------------------------------------------- checkpoints, clipping, groups
def full_state_dict(model):
    """The plain model's state dict (full, unpadded) from a tensor-parallel one. One all-gather over the tp group
    per split parameter: every tp rank must call it, and each gets the full tensors. Without TP: state_dict()."""
    plan, state = getattr(model, "tensor_parallel", None), model.state_dict()
    return state if plan is None else {k: plan.unshard(k, v) for k, v in state.items()}


def load_full_state_dict(model, state):
    """Load a plain (full) state dict into a tensor-parallel model: each rank keeps its slice. No collective."""
    plan = getattr(model, "tensor_parallel", None)
    model.load_state_dict(state if plan is None else {k: plan.shard(k, v) for k, v in state.items()})


def _map_optimizer_moments(model, optimizer, state, fn):
    """Apply fn(param name, tensor) to every per-element state tensor (same rank as its parameter: AdamW's
    moments split exactly as the weights do); scalars such as `step` stay. Parameters in param_groups order."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    params = dict(model.named_parameters())
    moments = {i: {k: (fn(order[i], v) if torch.is_tensor(v) and v.dim() and v.dim() == params[order[i]].dim()
                       else v) for k, v in per_param.items()}
               for i, per_param in state["state"].items()}
    return {**state, "state": moments}


def full_optimizer_state(model, optimizer):
    """optimizer.state_dict() with the moments of split parameters gathered to full (collective over tp)."""
    plan = getattr(model, "tensor_parallel", None)
    state = optimizer.state_dict()
    return state if plan is None else _map_optimizer_moments(model, optimizer, state, plan.unshard)


def load_full_optimizer_state(model, optimizer, state):
    """Inverse of full_optimizer_state on a model of any tensor-parallel size (no collective)."""
    plan = getattr(model, "tensor_parallel", None)
    if plan is not None:
        state = _map_optimizer_moments(model, optimizer, state, plan.shard)
    optimizer.load_state_dict(state)


def clip_grad_norm_(model, max_norm):
    """torch.nn.utils.clip_grad_norm_ with the norm of the FULL model's gradient: the squares of tensor-parallel
    shards summed over the tp group, of expert shards (`p.expert_group`, parallel/experts.py) over their expert
    group, replicated ones counted once. -> the norm before clipping. max_norm <= 0: measure only.

    Bins [replicated, tp shard, expert, expert and tp shard]: one all-reduce of bins 2-3 over the expert group (if
    any expert shard), then one of the tp bins over the tp group (if TP)."""
    plan = getattr(model, "tensor_parallel", None)
    grads = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return 0.0
    dtype = functools.reduce(torch.promote_types, [p.grad.dtype for _, p in grads], torch.float32)
    squares = torch.zeros(4, dtype=dtype, device=grads[0][1].grad.device)
    for name, p in grads:
        split = plan is not None and name in plan.shards
        squares[2 * hasattr(p, "expert_group") + split] += torch.linalg.vector_norm(p.grad, dtype=dtype) ** 2
    sharded = [p for _, p in grads if hasattr(p, "expert_group")]
    if sharded:                                          # (its group may be None: the default group)
        squares[2:] = comm.all_reduce(squares[2:].clone(), sharded[0].expert_group)
    if plan is not None:
        tp_bins = slice(1, None, 2) if sharded else slice(1, 2)
        squares[tp_bins] = comm.all_reduce(squares[tp_bins].clone(), plan.group)
    norm = squares.sum().sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, p in grads:
            p.grad.mul_(scale.to(p.grad.dtype))
    return float(norm)


def replica_group(mesh):
    """The ranks holding the same tensor-parallel shard (every dp × sp rank of one tp index), over which data-parallel
    gradients are averaged. None (the default group) when tp = 1. Every rank must call it: it creates one group per
    tp index (torch.distributed.new_group, like mesh.build_mesh; no collective payload)."""
    if mesh.tp == 1:
        return None
    import torch.distributed as dist
    ranks = torch.arange(mesh.world_size).view(-1, mesh.tp)
    mine = None
    for members in ranks.t().tolist():
        group = dist.new_group(members)
        if mesh.rank in members:
            mine = group
    return mine
