"""Expert parallelism for routed FFN experts, and router token counts summed over ranks.

Modules are found by the attributes a model gives its MoE layers (models/moe.py): `expert_dispatch`
(x (S, D), expert_ids (S, k), run_experts, n_experts) -> (S, k, D) and `count_reduce` (counts (E,)) -> counts.

Expert parallelism over a group of W ranks, E experts, E_l = E/W: rank r keeps experts [r·E_l, (r+1)·E_l) (its
slices of the stacked expert weights). Per MoE layer and step, with S·k routes on each rank (dropless):

    forward   sort routes by expert -> counts c (E,);  c_recv = AllToAll(c) (W blocks of E_l)
              rows = AllToAllV(x[sorted routes], by destination rank)      only routed rows travel: O(S·k·D)
              y = local experts on rows regrouped by expert;  AllToAllV back; unsort -> (S, k, D)
    backward  the two AllToAllV in reverse order with the splits swapped

Gradients: an expert's weights see the routes of every rank of the group, so their gradients are already summed
over it; they must not be averaged with the other ranks' (different) experts. Replicated weights (router,
attention, embeddings) keep their usual data-parallel reduction. Parameters of sharded experts are marked with
`expert_group` (the group) for an optimizer/DDP wrapper to tell them apart.

Data parallelism around it (the launcher, launch/engine.py): the ranks holding the same experts (one per expert
group, the mesh's "edp" group, R = dp·sp/W of them) sum their expert gradients and divide by dp·sp, the divisor
of the replicated weights' average: each already holds the sum over its expert group, so Σ_edp / (dp·sp) =
(1/(dp·sp)) Σ_all ranks, what the replicated weights get. Checkpoints gather the shards (`full_state_dict`,
`full_optimizer_state`): a run resumes at another expert-parallel size. `parallel.tensor.clip_grad_norm_` takes
the full model's norm over expert shards too.

Router counts: the Switch balancing loss's f_i must count the routes of the whole step, i.e. of every rank that
holds tokens of it (sequence- and data-parallel ranks alike); `apply_global_router_counts` sums them.
"""
import functools

import torch
from torch import nn

from . import comm

__all__ = ["expert_parallel_dispatch", "check_expert_parallel", "apply_expert_parallel", "expert_parameters",
           "full_state_dict", "load_full_state_dict", "full_optimizer_state", "load_full_optimizer_state",
           "apply_global_router_counts"]

EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")   # stacked (E, ...) on dim 0


class _AllToAllV(torch.autograd.Function):
    """Rows to ranks by `input_splits`; the gradient returns the same way with the splits swapped."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.config = (output_splits, input_splits, group)
        return comm.all_to_all_v(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, dy):
        output_splits, input_splits, group = ctx.config
        return comm.all_to_all_v(dy.contiguous(), input_splits, output_splits, group), None, None, None


def _expert_major(recv_counts):
    """Row permutation of blocks received in (source rank, local expert) order into (local expert, rank) order.

    recv_counts (W, E_l) rows per block -> (n,) long indices into the received rows.
    """
    sizes = recv_counts.flatten()
    starts = sizes.cumsum(0) - sizes
    blocks = torch.arange(sizes.numel()).view(recv_counts.shape).t().flatten()       # expert-major block order
    index = [torch.arange(s, s + n) for s, n in zip(starts[blocks].tolist(), sizes[blocks].tolist())]
    return torch.cat(index) if index else torch.zeros(0, dtype=torch.long)


def expert_parallel_dispatch(x, expert_ids, run_experts, n_experts, *, group):
    """The `expert_dispatch` of a layer whose experts are sharded over `group`: x (S, D), expert_ids (S, k) ->
    (S, k, D), each chosen expert's output. run_experts(rows, counts) runs this rank's E_l experts."""
    W, (S, k) = comm.group_size(group), expert_ids.shape
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)                                  # routes grouped by expert = by rank
    counts = torch.bincount(flat, minlength=n_experts)                 # (E,) long
    recv_counts = comm.all_to_all(counts, group).view(W, n_experts // W)
    send_splits, recv_splits = counts.view(W, -1).sum(1).tolist(), recv_counts.sum(1).tolist()
    received = _AllToAllV.apply(x[order // k], recv_splits, send_splits, group)
    regroup = _expert_major(recv_counts).to(x.device)
    y = run_experts(received[regroup], recv_counts.sum(0).tolist())[regroup.argsort()]
    returned = _AllToAllV.apply(y, send_splits, recv_splits, group)    # (S·k, D) in `order`
    return returned[order.argsort()].view(S, k, -1)


def _moe_layers(model):
    return [m for m in model.modules() if hasattr(m, "expert_dispatch")]


def check_expert_parallel(model, ep):
    """ValueError naming the sizes when `model`'s experts cannot be split over `ep` ranks: no MoE layer (ep > 1),
    or n_ffn_experts not divisible by ep. Touches nothing, issues no collective (works on the meta device)."""
    if ep < 1:
        raise ValueError(f"expert parallelism: ep must be >= 1, got {ep}")
    layers = [m for m in _moe_layers(model) if getattr(m, "router", None) is not None]
    if ep > 1 and not layers:
        raise ValueError(f"expert parallelism over ep={ep} ranks needs routed FFN experts; {type(model).__name__} "
                         f"has no MoE layer (a BAM preset with n_ffn_experts > 1, e.g. bam-moe-tiny)")
    for m in layers:
        if m.n_experts % ep:
            raise ValueError(f"expert parallelism over ep={ep} ranks needs n_ffn_experts divisible by {ep}, got "
                             f"{m.n_experts}")


def apply_expert_parallel(model, group=None):
    """Shard every MoE layer's experts over `group` (None: the default group) and route tokens by all-to-all.

    Each rank keeps experts [r·E/W, (r+1)·E/W) of the stacked weights gate_proj, up_proj, down_proj; the state
    dict then holds this rank's slice. ValueError, before touching the model, if W does not divide E.
    Returns the model.
    """
    layers, W, r = _moe_layers(model), comm.group_size(group), comm.group_rank(group)
    check_expert_parallel(model, W)
    for m in layers:
        held = slice(r * m.n_experts // W, (r + 1) * m.n_experts // W)
        for name in EXPERT_WEIGHTS:
            p = nn.Parameter(getattr(m, name).detach()[held].clone())
            p.expert_group = group
            setattr(m, name, p)
        m.expert_offset = held.start
        m.expert_dispatch = functools.partial(expert_parallel_dispatch, group=group)
    return model


def expert_parameters(model):
    """{state-dict name: parameter} of the expert shards (marked `expert_group` by apply_expert_parallel)."""
    return {n: p for n, p in model.named_parameters() if hasattr(p, "expert_group")}


def _gather(p, local):
    return comm.all_gather(local.contiguous(), p.expert_group)               # (E_l, ...) -> (E, ...)


def _slice(p, full):
    n, r = comm.group_size(p.expert_group), comm.group_rank(p.expert_group)
    return full.chunk(n)[r].clone()                                            # (E, ...) -> (E_l, ...)


def full_state_dict(model, state):
    """`state` (model's names) with every expert shard gathered over its group: one all-gather per expert tensor,
    every rank of the group must call it. Without expert parallelism: `state` unchanged."""
    experts = expert_parameters(model)
    return {k: _gather(experts[k], v) if k in experts else v for k, v in state.items()}


def load_full_state_dict(model, state):
    """Inverse of full_state_dict: this rank's slice of every full expert tensor (no collective)."""
    experts = expert_parameters(model)
    return {k: _slice(experts[k], v) if k in experts else v for k, v in state.items()}


def _map_expert_moments(model, optimizer, state, fn):
    """fn(param, tensor) on every per-element optimizer state tensor (AdamW's moments) of an expert shard."""
    experts = {id(p) for p in expert_parameters(model).values()}
    order = [p for g in optimizer.param_groups for p in g["params"]]
    def moment(p, v):
        return id(p) in experts and torch.is_tensor(v) and v.dim() == p.dim()
    moments = {i: {k: (fn(order[i], v) if moment(order[i], v) else v) for k, v in per_param.items()}
               for i, per_param in state["state"].items()}
    return {**state, "state": moments}


def full_optimizer_state(model, optimizer, state):
    """An optimizer state dict (param_groups order of `optimizer`) with the expert moments gathered (collective)."""
    return _map_expert_moments(model, optimizer, state, _gather)


def load_full_optimizer_state(model, optimizer, state):
    """Inverse of full_optimizer_state: this rank's slices of the expert moments (no collective)."""
    return _map_expert_moments(model, optimizer, state, _slice)


def _sum_counts(counts, group):
    return comm.all_reduce(counts.detach().clone(), group)


def apply_global_router_counts(model, group=None):
    """Make every MoE layer's balancing loss count the routes of all ranks of `group` (None: every rank of the
    default group, i.e. all data- and sequence-parallel ranks of the step). One all-reduce of E ints per layer
    and forward. Returns the model."""
    for m in model.modules():
        if hasattr(m, "count_reduce"):
            m.count_reduce = functools.partial(_sum_counts, group=group)
    return model
