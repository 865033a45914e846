"""What every entry point shares (pretrain, evaluate, generate, upcycle): the error contract and a checked model load.

The contract: a user error (ValueError, or an OSError on a path the user gave) is one line `<prog>: error: ...` on
stderr, exit code 2, no traceback, printed once. "Once" before any process group means by local rank 0 of each
node (every rank of a node found the same problem, and each node's torchrun has its own log); `quiet_ranks` silences
the other ranks' argparse output the same way, so a flag typo under torchrun prints one usage block, not one per
rank. After a group exists, launch.trainer's `_agree` picks the printing rank.
"""
import contextlib
import os
import sys
import zipfile
from pathlib import Path

__all__ = ["local_rank", "quiet_ranks", "user_error", "run_entry", "load_model_file"]


def local_rank():
    """This process's rank on its node (0 outside torchrun; the test helper's group rank when one exists)."""
    import torch.distributed as dist
    from lasp.parallel.mesh import dist_env
    if dist.is_initialized():
        return dist.get_rank()
    return dist_env()[2]


@contextlib.contextmanager
def quiet_ranks():
    """Inside: stdout and stderr of every rank but local rank 0 go to /dev/null (argparse's usage, --help)."""
    if local_rank() == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


def user_error(prog, error):
    """Print `<prog>: error: <message>` once (local rank 0) -> exit code 2."""
    if local_rank() == 0:
        message = str(error) if not isinstance(error, OSError) else f"{error.filename or ''}: {error.strerror or error}"
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


def run_entry(prog, parse, body, argv=None):
    """parse(argv) with the other ranks quiet, then body(args) -> its exit code (None = 0); 2 for a user error."""
    with quiet_ranks():
        args = parse(argv)
    try:
        code = body(args)
    except (ValueError, OSError) as e:
        return user_error(prog, e)
    return 0 if code is None else code


def load_model_file(path, prog, device="cpu"):
    """models.load_model(path) for a file the user named; ValueError naming it when it is not a model file (a text
    file, a folder, a training checkpoint's optim.pt, an archive whose config does not build)."""
    from lasp import models
    if not Path(path).is_file() or not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a model file (a models.save_model archive such as <run dir>/model.pt)")
    try:
        return models.load_model(path, device=device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:   # crafted or foreign archives
        raise ValueError(f"{path}: not a model file this code can build ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
