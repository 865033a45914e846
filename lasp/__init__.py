"""Linear-attention sequence parallelism: LASP-2 (one all-gather each way), LASP-1 (ring baseline) and All-Scan
(one prefix state per segment, pipelined point to point).

`lasp` is also the project's one import root: lasp.kernels, lasp.parallel, lasp.models and lasp.launch are the
repository's top-level folders kernels/, parallel/, models/ and launch/ (setup.py's package_dir installs them
there). In a source tree (a checkout or a worktree on PYTHONPATH) the lines below find those folders beside this
one, and keep them from shadowing installed packages named kernels, models, ...; an installed copy skips this.
"""
import importlib.machinery as _machinery
import os as _os
import sys as _sys

_root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
_FOLDERS = ("kernels", "parallel", "models", "launch")


class _InstalledFirst:
    """A source tree's root on sys.path (python started in the repository root, pytest) would make our top-level
    folders shadow installed packages of the same names, such as Hugging Face's `kernels`, which transformers >= 5
    imports. We import those folders only as lasp.*, so a bare `kernels` resolves to the installed package when one
    exists (and to nothing of ours otherwise)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _FOLDERS:
            return None
        paths = [p for p in _sys.path if _os.path.realpath(p or ".") != _root]
        return _machinery.PathFinder.find_spec(name, paths)


if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (the package's own search path)
    _sys.meta_path.insert(0, _InstalledFirst)

from .allscan import allscan
from .lasp1 import lasp1
from .lasp2 import lasp2

__all__ = ["allscan", "lasp1", "lasp2"]
from .ring_linear import ring_linear_attention  # noqa: E402  the left-product ring baseline (benchmarks)

__all__ += ["ring_linear_attention"]
from .apply import apply_sequence_parallel  # noqa: E402  swap a model's attention functions for these engines
from .apply import ENGINES, LINEAR_ENGINES, SOFTMAX_ENGINES  # noqa: E402  every engine's declaration, by name

__all__ += ["apply_sequence_parallel", "ENGINES", "LINEAR_ENGINES", "SOFTMAX_ENGINES"]
