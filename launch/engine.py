"""The model, optimizer and data-parallel wrapper of a pretraining run (DDP, or DeepSpeed ZeRO 1-3).

Gradient scaling under sequence parallelism. Sequence-parallel rank r of a data-parallel group holds loss_sum_r
over its tokens; N = Σ_r count_r (all-reduced over the SP group, no grad). The group's mean loss is
L = Σ_r loss_sum_r / N, and because every rank holds a replica of the weights whose activations meet in the SP
collectives, ∂L/∂θ = Σ_r g_r with g_r the gradient of rank r's replica from backward(loss_sum_r / N): gradients
must be SUMMED over the SP group and AVERAGED over the dp groups. DDP and DeepSpeed both average over the whole
world (dp·sp ranks), so each rank backpropagates sp · loss_sum_r / N:
(1/(dp·sp)) Σ_all sp·g = (1/dp) Σ_dp Σ_sp g.
Under tensor parallelism (tp > 1, DDP only) each rank holds a shard: DDP then runs over the dp·sp ranks holding the
same shard (parallel.tensor.replica_group), so the same scaling holds; clipping uses the full model's norm, and
checkpoints and model.pt hold the full weights (gathered over tp), so a run resumes at another tp size.
DeepSpeed under tensor parallelism gets the same replica group as its data-parallel group (`_ModelParallelUnit`).
Under expert parallelism (ep > 1, DDP only) a rank holds E/ep experts, whose gradients the all-to-all's backward
has already summed over the ep ranks of its expert group: they are SUMMED over the ranks holding the same experts
(the mesh's edp group, dp·sp/ep ranks) and divided by dp·sp, the replicated weights' divisor:
(1/(dp·sp)) Σ_edp Σ_ep sp·g = (1/dp) Σ_dp Σ_sp g as above. Clipping and checkpoints see the full experts too.
"""
import dataclasses
import logging
import math
import os
import re

import torch
from torch import nn

from lasp import models
from lasp.launch import checkpoint as ckpt
from lasp.parallel import comm, experts, tensor
from lasp.parallel.checkpointing import apply_activation_checkpointing

__all__ = ["model_config", "build_model", "parallelize", "lr_at", "build_optimizer",
           "LossModel", "fixed_buckets", "average_gradients", "DDPEngine", "DeepSpeedEngine", "make_engine"]


def model_config(cfg_model, vocab_size):
    """The run's typed model config (launch.config ModelConfig.arch: the preset + its [model] / --model.<field>
    values) with the tokenizer's vocabulary."""
    return dataclasses.replace(cfg_model.arch, vocab_size=vocab_size)


def build_model(cfg_model, vocab_size, seed, device=None):
    """Every rank builds the same weights: init_weights() draws from the global generator seeded here, or all
    load `cfg_model.init_from` (e.g. an upcycled BAM checkpoint; its config replaces the preset's)."""
    torch.manual_seed(seed)
    if not cfg_model.init_from:
        return models.build_model(model_config(cfg_model, vocab_size), device=device)
    model = models.load_model(cfg_model.init_from, device=device)
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"model.init_from: {cfg_model.init_from} has vocabulary {model.config.vocab_size}, the "
                         f"tokenizer {vocab_size}: train with data.vocab_size = {model.config.vocab_size} on the "
                         f"same corpus")
    return model


def parallelize(model, cfg_parallel, mesh):
    """Apply the run's parallelism to `model` from outside, in place, in this order: the sequence-parallel engines
    of its mixers, global router counts (MoE balancing loss over every rank's routes; no-op without MoE), expert
    parallelism over the mesh's ep groups, tensor parallelism over its tp groups, activation checkpointing."""
    from lasp.apply import apply_sequence_parallel
    from lasp.parallel.tensor import apply_tensor_parallel
    apply_sequence_parallel(model, linear=cfg_parallel.linear, softmax=cfg_parallel.softmax,
                            layout=cfg_parallel.layout, group=mesh.group("sp"))
    experts.apply_global_router_counts(model)
    if mesh.ep > 1:
        experts.apply_expert_parallel(model, mesh.group("ep"))
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh)
    if cfg_parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def lr_at(step, optim, restart=None):
    """Linear warm-up over warmup_steps, then cosine decay from lr to min_lr at max_steps (step counts from 0).

    restart {"step": s, "lr": r} (a resume that changed max_steps, launch.trainer): from step s on, the cosine
    decays from r, the LR the schedule had reached at s, to min_lr at the new max_steps, so the LR continues
    without a jump. Ignored when s falls in the warm-up (the warm-up is the same either way)."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    start, peak = optim.warmup_steps, optim.lr
    if restart is not None and restart["step"] >= optim.warmup_steps:
        start, peak = restart["step"], restart["lr"]
    span = max(1, optim.max_steps - start)
    progress = min(1.0, max(0.0, (step - start) / span))
    return optim.min_lr + (peak - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model, optim):
    """AdamW (weight decay on matrices only) and its warm-up + cosine LambdaLR."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    base = optim.lr if optim.lr > 0 else 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, optim) / base)
    return opt, sched


class LossModel(nn.Module):
    """forward(batch) -> (loss_sum, count) of the local tokens, so that DDP / DeepSpeed see one forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, segment_ids, labels, loss_mask):
        hidden = self.model(tokens, positions, segment_ids)
        return self.model.loss(hidden, labels, loss_mask)


BUCKET_ELEMENTS = 1 << 24   # gradient elements per all-reduce (64 MiB of fp32): bounds the extra memory


def fixed_buckets(params, cap=BUCKET_ELEMENTS):
    """Consecutive runs of `params` (in model order) of one dtype and at most `cap` elements each (a larger tensor
    alone)."""
    buckets, size = [], cap
    for p in params:
        if size + p.numel() > cap or buckets[-1][-1].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    return buckets


def average_gradients(buckets, group=None, divisor=None):
    """p.grad <- the mean of p.grad over `group` (default: the world), one all-reduce per bucket of flat gradients
    in the buckets' fixed order; a missing gradient counts as zeros (every rank then holds one). divisor: divide
    the sum by it instead of the group size (expert shards: dp·sp, see the module docstring)."""
    world = comm.group_size(group) if divisor is None else divisor
    for bucket in buckets:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        comm.all_reduce(flat, group).div_(world)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad = g.view_as(p)


class DDPEngine:
    """Data parallelism in plain torch: gradients averaged over the world (or data_group: under tensor parallelism
    the ranks holding the same shard) by all-reduces of fixed buckets, clipping, AdamW, LambdaLR. Expert shards
    (expert parallelism) are left out of those buckets and reduced over expert_data_group in buckets of their own.

    Why not torch's DistributedDataParallel: DDP rebuilds its buckets after the first iteration of each process, in
    the order the gradients became ready. A resumed process runs its first step with the initial layout (reverse
    parameter order) where the uninterrupted run already had the rebuilt one, and a ring all-reduce (gloo's, NCCL's)
    adds the ranks' contributions to an element in an order set by the element's position in the buffer: a one-ulp
    difference in some gradients at the first resumed step, visible in the loss about ten steps later and growing
    (issue 16: 9e-8 at step ~20, 7e-4 at step 40 on 4 ranks). Buckets fixed by parameter order make every step's
    sums independent of the process's history, so a resumed run is bit-identical. The cost: the all-reduce runs
    after backward instead of overlapping it."""

    safe_types = ()   # classes its checkpoint files may hold besides tensors and containers (ckpt.load_tensors)

    def __init__(self, model, optim_cfg, world_size, data_group=None, expert_data_group=None):
        self.model, self.grad_clip, self.group = model, optim_cfg.grad_clip, data_group
        self.optimizer, self.scheduler = build_optimizer(model, optim_cfg)
        self.forward = LossModel(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = fixed_buckets([p for p in params if not hasattr(p, "expert_group")])
        self.expert_buckets = fixed_buckets([p for p in params if hasattr(p, "expert_group")])
        self.world_size, self.expert_group = world_size, expert_data_group
        assert not self.expert_buckets or expert_data_group is not None, "expert shards need their replica group"

    def backward(self, loss):
        loss.backward()
        if self.world_size > 1:
            average_gradients(self.buckets, self.group)
        if self.expert_buckets:                          # Σ over the ranks holding the same experts, / (dp·sp)
            average_gradients(self.expert_buckets, self.expert_group, divisor=comm.group_size(self.group))

    def step(self):
        """Clip, step optimizer and schedule -> the global grad norm before clipping."""
        if self.expert_buckets or getattr(self.model, "tensor_parallel", None) is not None:
            norm = tensor.clip_grad_norm_(self.model, self.grad_clip)    # the full model's: ep and tp shards
        else:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self):
        return self.scheduler.get_last_lr()[0]

    def set_schedule(self, optim, restart=None):
        """After a resume: the schedule of `optim` (this run's fields) with `restart` (lr_at), so steps after the
        checkpoint's follow it; the position (last step, last LR) stays the checkpoint's."""
        base = optim.lr if optim.lr > 0 else 1.0
        self.scheduler.lr_lambdas = [lambda step: lr_at(step, optim, restart) / base] * len(self.scheduler.base_lrs)
        self.scheduler.base_lrs = [optim.lr] * len(self.scheduler.base_lrs)

    def weights_finite(self):
        """-> bool tensor: every weight the torch optimizer updates on this rank is finite (ZeRO: this rank's
        partition of the fp32 master weights). One pass over the weights: the sum of a tensor holding a NaN/inf
        is NaN/inf."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)   # DeepSpeed wraps the torch AdamW
        sums = [p.detach().sum(dtype=torch.float32) for g in optimizer.param_groups for p in g["params"]]
        return torch.isfinite(torch.stack(sums).sum()) if sums else torch.tensor(True)

    def full_state_dict(self):
        """The full (unsplit) weights: gathered over tp and ep (every rank must call it)."""
        return experts.full_state_dict(self.model, tensor.full_state_dict(self.model))

    def save(self, folder, rank):
        # full (unsplit) weights and moments: gathered over tp and ep by every rank, written once
        model_state = self.full_state_dict()
        optim_state = experts.full_optimizer_state(self.model, self.optimizer,
                                                   tensor.full_optimizer_state(self.model, self.optimizer))
        if rank == 0:  # replicated state: one copy
            torch.save(model_state, folder / "model.pt")
            torch.save({"optimizer": optim_state, "scheduler": self.scheduler.state_dict()}, folder / "optim.pt")

    def load(self, folder):
        model_state = ckpt.load_tensors(folder / "model.pt")
        tensor.load_full_state_dict(self.model, experts.load_full_state_dict(self.model, model_state))
        state = ckpt.load_tensors(folder / "optim.pt")
        optim_state = experts.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        tensor.load_full_optimizer_state(self.model, self.optimizer, optim_state)
        self.scheduler.load_state_dict(state["scheduler"])

    def export(self, path, rank):
        """models.save_model(path) of the full model, on rank 0 (every rank calls it: tp and ep ranks gather)."""
        state = self.full_state_dict()
        if rank == 0:
            try:
                models.save_model(path, self.model, state_dict=state)   # removes its temp file when it fails
            except (OSError, RuntimeError) as e:                        # torch: ENOSPC as 'basic_ios::clear'
                raise ckpt.write_failure(path, e) from None


def _import_deepspeed(device):
    """DeepSpeed with the CPU accelerator on CPU. We use a plain torch optimizer, so no DeepSpeed C++ op is
    needed; marking them all unavailable stops DeepSpeed compiling its shared-memory allreduce (it then uses
    torch.distributed, i.e. gloo) and skips the compiler probes at start-up."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist
    if dist.is_initialized():  # DeepSpeed reads these even on an initialised group (absent under the test helper)
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(device.index or 0))
    import deepspeed
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def _deepspeed_safe_types():
    """The data classes DeepSpeed pickles into its ZeRO files (found by loading stage 1-3 files; no code runs when
    they are rebuilt: the loss scaler holds numbers, a fragment address two ints, the stage is an Enum);
    everything else must be tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_deepspeed_loads(ds_engine):
    """Route every file DeepSpeed's load_checkpoint reads through ckpt.load_tensors. DeepSpeed's own torch
    checkpoint engine unpickles without the weights-only guard: a crafted file runs code. Keeping DeepSpeed's format
    (rather than re-deriving its partitions ourselves) keeps its exact resume of stages 1-3 and world-size checks;
    only the reader changes. Checked: stages 1-3 read nothing else on this path (torch.load elsewhere in DeepSpeed
    serves universal checkpoints, which we do not use)."""
    engine = ds_engine.checkpoint_engine
    assert type(engine).__name__ == "TorchCheckpointEngine", type(engine)   # the one whose reads we replace
    safe = _deepspeed_safe_types()
    engine.load = lambda path, map_location=None: ckpt.load_tensors(path, allow=safe)


class _ModelParallelUnit:
    """DeepSpeed's `mpu` under tensor parallelism: the tp group is its model-parallel group, the ranks holding the
    same shard (dp·sp of them) its data-parallel group. ZeRO then partitions and reduces over those replicas, and its
    clipping norm sums the squares of split parameters (megatron's `tensor_model_parallel` attribute, set by
    parallel.tensor) over the tp group and counts replicated ones on tp rank 0 only: the full model's norm."""

    def __init__(self, tp_group, data_group):
        self.tp_group, self.data_group = tp_group, data_group

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self):
        return comm.group_rank(self.tp_group)

    def get_model_parallel_world_size(self):
        return comm.group_size(self.tp_group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self.data_group

    def get_data_parallel_rank(self):
        return comm.group_rank(self.data_group)

    def get_data_parallel_world_size(self):
        return comm.group_size(self.data_group)

    def get_data_parallel_group_ranks(self):
        return [comm.global_rank(self.data_group, i) for i in range(comm.group_size(self.data_group))]


class DeepSpeedEngine(DDPEngine):
    """DeepSpeed ZeRO stage 1-3 with a torch AdamW; same interface as DDPEngine. Over the whole world, or under
    tensor parallelism over data_group (the ranks holding the same shard; `_ModelParallelUnit`). Its checkpoints hold
    DeepSpeed's partitions (and tp shards): they resume at the same world size, stage and tp; model.pt is full."""

    TAG = "deepspeed"

    def __init__(self, model, optim_cfg, world_size, *, stage, batch_size, device, data_group=None):
        ds = self.ds = _import_deepspeed(device)
        self.model, self.stage = model, stage
        plan = getattr(model, "tensor_parallel", None)
        mpu = None if plan is None else _ModelParallelUnit(plan.group, data_group)
        self.tp = 1 if plan is None else plan.size
        optimizer, scheduler = build_optimizer(model, optim_cfg)
        loss_model = LossModel(model)
        if stage == 3:  # the loss reads the output head's weight directly, outside any submodule's forward
            for p in self._outside_blocks(model):
                ds.zero.register_external_parameter(loss_model, p)
        config = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}, "gradient_clipping": optim_cfg.grad_clip,
                  "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
        self.forward, self.optimizer, _, self.scheduler = ds.initialize(
            model=loss_model, optimizer=optimizer, lr_scheduler=scheduler, config=config, mpu=mpu,
            dist_init_required=False)
        _weights_only_deepspeed_loads(self.forward)
        self.safe_types = _deepspeed_safe_types()

    @staticmethod
    def _outside_blocks(model):
        inside = {id(p) for p in model.layers.parameters()}
        return [p for p in model.parameters() if id(p) not in inside]

    def backward(self, loss):
        self.forward.backward(loss)

    def step(self):
        self.forward.step()
        norm = self.forward.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def save(self, folder, rank):
        self.forward.save_checkpoint(str(folder), tag=self.TAG, save_latest=False)
        if rank == 0:  # DeepSpeed copies its recovery scripts in; a checkpoint holds data, never code
            for script in RECOVERY_SCRIPTS:
                (folder / script).unlink(missing_ok=True)

    def load(self, folder):
        saved_tp = len({m[1] for m in (re.search(r"mp_rank_(\d+)", f.name) for f in (folder / self.TAG).glob("*"))
                        if m}) or 1
        if saved_tp != self.tp:
            raise ValueError(f"checkpoint {folder}: written by ZeRO at tp={saved_tp}, this run has tp={self.tp}; a "
                             f"ZeRO checkpoint resumes at the same tp and world size (its model.pt is the full model)")
        path, _ = self.forward.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"checkpoint {folder}: DeepSpeed found no state under tag {self.TAG!r}")

    def export(self, path, rank):
        if self.stage < 3:
            return super().export(path, rank)
        with self.ds.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            super().export(path, rank)


def make_engine(model, cfg, world_size, device, data_group=None, expert_data_group=None):
    """DDPEngine (parallel.zero = 0) or DeepSpeedEngine. data_group: the ranks holding the same tp shard (None: the
    world); expert_data_group: the ranks holding the same experts (the mesh's "edp" group; DDP only)."""
    if cfg.parallel.zero == 0:
        return DDPEngine(model, cfg.optim, world_size, data_group, expert_data_group)
    if experts.expert_parameters(model):
        raise ValueError(f"parallel.zero={cfg.parallel.zero} with expert parallelism (parallel.ep > 1) is not "
                         f"supported: run --ep with --zero 0 (DDP)")
    return DeepSpeedEngine(model, cfg.optim, world_size, stage=cfg.parallel.zero, batch_size=cfg.data.batch_size,
                           device=device, data_group=data_group)
