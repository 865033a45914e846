"""The process mesh: data × sequence × tensor parallel groups, built once from the launcher's environment.

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

__all__ = ["Mesh", "dist_env", "init_mesh", "build_mesh", "current_mesh", "sp_group"]


@dataclass
class Mesh:
    rank: int
    world_size: int
    dp: int
    sp: int
    tp: int
    groups: dict = field(default_factory=dict)  # "dp" | "sp" | "tp" -> ProcessGroup (None on one process)

    def group(self, name):
        return self.groups.get(name)

    def rank_in(self, name):
        """This rank's index along a mesh axis."""
        dp_i, rest = divmod(self.rank, self.sp * self.tp)
        sp_i, tp_i = divmod(rest, self.tp)
        return {"dp": dp_i, "sp": sp_i, "tp": tp_i}[name]


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


def check_mesh_sizes(world_size, sp=1, tp=1):
    """ValueError naming the sizes when sp·tp does not divide the world size."""
    for name, n in (("sp", sp), ("tp", tp)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if world_size % (sp * tp):
        raise ValueError(f"world size {world_size} is not divisible by sp={sp} x tp={tp} = {sp * tp}")
    return world_size // (sp * tp)


def build_mesh(rank, world_size, sp=1, tp=1):
    """Create the groups on an initialised default group (every rank must call this, in the same order)."""
    global _MESH
    dp = check_mesh_sizes(world_size, sp, tp)
    ranks = torch.arange(world_size).view(dp, sp, tp)
    groups = {}
    for name, axis in (("dp", 0), ("sp", 1), ("tp", 2)):
        lines = ranks.movedim(axis, -1).reshape(-1, ranks.shape[axis]).tolist()
        for members in lines:  # new_group must be called by all ranks for every group
            g = dist.new_group(members) if dist.is_initialized() else None
            if rank in members:
                groups[name] = g
    _MESH = Mesh(rank, world_size, dp, sp, tp, groups)
    return _MESH


def init_mesh(sp=1, tp=1, backend=None):
    """Initialise torch.distributed from the environment (if needed) and build the dp × sp × tp mesh."""
    rank, world_size, local_rank = dist_env()
    check_mesh_sizes(world_size, sp, tp)  # before any collective can hang
    if world_size > 1 and not dist.is_initialized():
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return build_mesh(rank, world_size, sp, tp)
