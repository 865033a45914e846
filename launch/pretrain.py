"""Pretrain a linear-attention / hybrid LLM with sequence and data parallelism.

    torchrun --nproc-per-node 4 launch/pretrain.py                       # launch/configs/default.toml
    torchrun --nproc-per-node 4 launch/pretrain.py --config tiny --sp 2 --max-steps 50 --run-dir runs/x
    torchrun --nproc-per-node 4 launch/pretrain.py --run-dir runs/x --resume        # after a stop or SIGTERM
    torchrun --nproc-per-node 4 launch/pretrain.py --config tiny --sp 2 --tp 2      # heads split over 2 ranks
    python launch/pretrain.py --dry-run --sp 4                           # check env + config, print the mesh

The training itself is launch/trainer.py (the one training core; this script parses and exits). Ranks form a
dp × sp × tp mesh (parallel.init_mesh); each packed sequence is split over the sp ranks of its group
in `parallel.layout`, each dp group reads its own batches, and the tp ranks of a group split the model's heads, MLP
channels and vocabulary (parallel/tensor.py; checkpoints hold full weights, so a run resumes at another tp).
Each step: forward on the local shard, the loss sum normalised by the token count of the whole sequence group
(engine.py explains the gradient scaling), backward, clip, AdamW, warm-up + cosine schedule. Checkpoints every
`checkpoint.every` steps, at the end and on SIGTERM (checkpoint.py), never after a step with a NaN/inf loss,
gradient norm or weight; `--resume` continues bit for bit (docs/launch.md says under which conditions). Exit codes:
0 done, 2 bad input (printed once, no traceback), 3 non-finite step. See docs/launch.md.
"""
import sys


from lasp.launch.config import parse_args
from lasp.launch.trainer import NonFiniteStep, ReportedError, dry_run, train
from lasp.parallel.mesh import dist_env

__all__ = ["main"]


def main(argv=None):
    """Command-line entry: 0 done, 2 bad input (ValueError), 3 non-finite step. A user error is printed once
    (before any process group: by local rank 0 of each node, as every rank found the same; later: by the lowest
    failing rank, see launch.trainer), without a traceback."""
    local_rank = dist_env()[2]
    try:
        cfg, dry = parse_args(argv)
        if dry:
            return dry_run(cfg)
        train(cfg)
        return 0
    except ReportedError:
        return 2
    except ValueError as e:
        if local_rank == 0:
            print(f"pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteStep:    # rank 0 printed it
        return 3


if __name__ == "__main__":
    sys.exit(main())
