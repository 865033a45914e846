"""Pretrain a linear-attention / hybrid LLM with sequence and data parallelism.

    torchrun --nproc-per-node 4 launch/pretrain.py                       # launch/configs/default.toml
    torchrun --nproc-per-node 4 launch/pretrain.py --config tiny --sp 2 --max-steps 50 --run-dir runs/x
    torchrun --nproc-per-node 4 launch/pretrain.py --run-dir runs/x --resume        # after a stop or SIGTERM
    torchrun --nproc-per-node 4 launch/pretrain.py --config tiny --sp 2 --tp 2      # heads split over 2 ranks
    python launch/pretrain.py --dry-run --world-size 4                   # check the run for 4 ranks, no torchrun
    torchrun --nproc-per-node 4 launch/pretrain.py --dry-run             # the same, for torchrun's world

The training itself is launch/trainer.py (the one training core; this script parses and exits). Ranks form a
dp × sp × tp mesh (parallel.init_mesh); each packed sequence is split over the sp ranks of its group
in `parallel.layout`, each dp group reads its own batches, and the tp ranks of a group split the model's heads, MLP
channels and vocabulary (parallel/tensor.py; checkpoints hold full weights, so a run resumes at another tp).
Each step: forward on the local shard, the loss sum normalised by the token count of the whole sequence group
(engine.py explains the gradient scaling), backward, clip, AdamW, warm-up + cosine schedule. Checkpoints every
`checkpoint.every` steps, at the end and on SIGTERM (checkpoint.py), never after a step with a NaN/inf loss,
gradient norm or weight; `--resume` continues bit for bit (docs/launch.md says under which conditions). Exit codes:
0 done, 2 bad input (printed once, no traceback), 3 non-finite step. See docs/launch.md.

`--dry-run` checks the run for the world it will have (torchrun's, or `--world-size N` outside torchrun): the
rendezvous variables, ranks per node against visible GPUs, every config problem (launch.config.config_errors), the
corpus and the run folder, all reported together; then it prints the mesh.
"""
import os
import sys
from pathlib import Path

import torch

from lasp.launch.cli import quiet_ranks, user_error
from lasp.launch.config import config_errors, parse_args
from lasp.launch.trainer import NonFiniteStep, ReportedError, mesh_table, train
from lasp.parallel.mesh import dist_env

__all__ = ["dry_run", "main"]


def _environment_problems(world, local_world, launched):
    """The rendezvous variables (under a launcher), ranks per node against the world and the visible GPUs."""
    problems = []
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if launched and world > 1 and not os.environ.get(v)]
    if missing:
        problems.append(f"world size {world} needs {' and '.join(missing)} in the environment (torchrun sets them; "
                        f"launch/slurm/pretrain.sbatch exports them)")
    if world % local_world:
        problems.append(f"world size {world} is not a multiple of the ranks per node ({local_world})")
    if torch.cuda.is_available() and local_world > torch.cuda.device_count():
        problems.append(f"{local_world} ranks per node but {torch.cuda.device_count()} GPUs visible")
    return problems


def _data_and_folder_problems(cfg):
    """The data source readable (launch.data.check_data); a fresh run's checkpoint folder free of another run's checkpoints."""
    from lasp.launch import checkpoint as ckpt
    from lasp.launch.data import check_data
    problems = []
    for check in (lambda: check_data(cfg.data),
                  lambda: cfg.checkpoint.resume or ckpt.check_fresh(cfg.checkpoint.dir or Path(cfg.run.dir) /
                                                                    "checkpoints")):
        try:
            check()
        except ValueError as e:
            problems.append(str(e))
    return problems


def dry_run(cfg, world_size=None):
    """Check the run for the world it will have (torchrun's; else world_size ranks on one node, default 1) and
    print the mesh on rank 0 -> 0. ValueError listing every problem found (environment, config, corpus, folder)."""
    launched = "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ
    rank, world = dist_env()[:2]
    problems = []
    if world_size is not None and (world_size < 1 or (launched and world_size != world)):
        problems.append(f"--world-size {world_size}: " + (f"torchrun started {world} ranks" if launched else
                                                          "must be >= 1"))
    world = world if launched or world_size is None or world_size < 1 else world_size
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    problems += _environment_problems(world, local_world, launched)
    problems += config_errors(cfg, world, local_world)
    problems += _data_and_folder_problems(cfg)
    if problems:
        how = "" if launched or world_size else " (one process: --world-size N or torchrun checks N ranks)"
        raise ValueError(f"the dry run found {len(problems)} problem(s) for world size {world}{how}:\n  - "
                         + "\n  - ".join(problems))
    if rank == 0:
        env = os.environ
        where = f"{env.get('MASTER_ADDR', 'localhost')}:{env.get('MASTER_PORT', '-')}" if launched else "by torchrun"
        source = "the launcher's" if launched else "--world-size" if world_size else "one process; --world-size N: N"
        device = f"{'cuda' if torch.cuda.is_available() else 'cpu'} ({torch.cuda.device_count()} GPUs visible)"
        print(f"dry run: world size {world} ({source}); rendezvous {where}; corpus {cfg.data.corpus or ['embedded']};"
              f" run dir {cfg.run.dir}; {device}")
        print("\n".join(mesh_table(world, cfg.parallel.sp, local_world, cfg.parallel.tp, cfg.parallel.ep)))
        print("dry run OK")
    return 0


def main(argv=None):
    """Command-line entry: 0 done, 2 bad input (ValueError), 3 non-finite step. A user error is printed once
    (before any process group: by local rank 0 of each node, as every rank found the same, argparse's usage
    included; later: by the lowest failing rank, see launch.trainer), without a traceback."""
    try:
        with quiet_ranks():                                  # a flag typo: one usage block, not one per rank
            cfg, dry = parse_args(argv)
        if dry:
            return dry_run(cfg, dry["world_size"])
        train(cfg)
        return 0
    except ReportedError:
        return 2
    except ValueError as e:
        return user_error("pretrain", e)
    except NonFiniteStep:    # rank 0 printed it
        return 3


if __name__ == "__main__":
    sys.exit(main())
