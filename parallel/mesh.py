"""The process mesh: data × sequence × tensor parallel groups (and expert groups), built once from the environment.

Ranks are laid out as (dp, sp, tp) with tp fastest, so tensor-parallel peers share a node first, then
sequence-parallel peers. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; under plain
srun the SLURM_* variables are translated (MASTER_ADDR / MASTER_PORT must then come from the job script).
gloo on CPU, NCCL on GPU.

`group=None` in the engines means: the sequence-parallel group of the mesh made by `init_mesh`, or, without a
mesh, the default group (or a single process when torch.distributed is not initialised).
"""
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Mesh", "dist_env", "init_mesh", "build_mesh", "mesh_groups", "current_mesh", "sp_group"]


@dataclass
class Mesh:
    rank: int
    world_size: int
    dp: int
    sp: int
    tp: int
    groups: dict = field(default_factory=dict)  # "dp" | "sp" | "tp" | "ep" | "edp" -> ProcessGroup (None: 1 process)
    ep: int = 1

    def group(self, name):
        return self.groups.get(name)

    def rank_in(self, name):
        """This rank's index along a mesh axis."""
        dp_i, rest = divmod(self.rank, self.sp * self.tp)
        sp_i, tp_i = divmod(rest, self.tp)
        return {"dp": dp_i, "sp": sp_i, "tp": tp_i, "ep": (dp_i * self.sp + sp_i) % self.ep}[name]


_MESH = None  # the one mesh of this process, only to resolve group=None


def current_mesh():
    return _MESH


def sp_group():
    """The sequence-parallel group of the current mesh, or None (= default group) without one."""
    return None if _MESH is None else _MESH.group("sp")


def dist_env(env=None):
    """(rank, world_size, local_rank) from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def check_mesh_sizes(world_size, sp=1, tp=1, ep=1):
    """ValueError naming the sizes when sp·tp does not divide the world size, or ep does not divide dp·sp."""
    for name, n in (("sp", sp), ("tp", tp), ("ep", ep)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if world_size % (sp * tp):
        raise ValueError(f"world size {world_size} is not divisible by sp={sp} x tp={tp} = {sp * tp}")
    if (world_size // tp) % ep:
        raise ValueError(f"ep={ep} must divide dp x sp = {world_size // tp} (world size {world_size} / tp={tp})")
    return world_size // (sp * tp)


def mesh_groups(world_size, sp=1, tp=1, ep=1):
    """{axis name: lists of member ranks} of the (dp, sp, tp) layout, tp fastest; no process group needed (ValueError
    as check_mesh_sizes). ep: blocks of ep consecutive ranks of the flattened dp·sp axis that share a tp index
    (expert parallelism spans ranks holding different tokens of the same weight shard). edp (expert data
    parallel): the dp·sp/ep ranks of one tp index holding the same experts, one per ep group."""
    ranks = torch.arange(world_size).view(check_mesh_sizes(world_size, sp, tp, ep), sp, tp)
    lines = {name: ranks.movedim(axis, -1).reshape(-1, ranks.shape[axis]).tolist()
             for name, axis in (("dp", 0), ("sp", 1), ("tp", 2))}
    tokens_by_tp = ranks.flatten(0, 1).T                                     # (tp, dp·sp)
    lines["ep"] = tokens_by_tp.reshape(-1, ep).tolist()
    lines["edp"] = tokens_by_tp.reshape(tp, -1, ep).transpose(1, 2).flatten(0, 1).tolist()
    return lines


def build_mesh(rank, world_size, sp=1, tp=1, ep=1):
    """Create the dp, sp, tp, ep and edp groups on an initialised default group (every rank must call this, in the
    same order)."""
    global _MESH
    dp = check_mesh_sizes(world_size, sp, tp, ep)
    groups = {}
    for name, lines in mesh_groups(world_size, sp, tp, ep).items():
        for members in lines:  # new_group must be called by all ranks for every group
            g = dist.new_group(members) if dist.is_initialized() else None
            if rank in members:
                groups[name] = g
    _MESH = Mesh(rank, world_size, dp, sp, tp, groups, ep)
    return _MESH


def init_mesh(sp=1, tp=1, ep=1, backend=None):
    """Initialise torch.distributed from the environment (if needed) and build the dp × sp × tp mesh (+ ep)."""
    rank, world_size, local_rank = dist_env()
    check_mesh_sizes(world_size, sp, tp, ep)  # before any collective can hang
    if world_size > 1 and not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return build_mesh(rank, world_size, sp, tp, ep)
