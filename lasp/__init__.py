"""Linear-attention sequence parallelism: LASP-2 (one all-gather each way), LASP-1 (ring baseline) and All-Scan
(one prefix state per segment, pipelined point to point).

`lasp` is also the project's one import root: lasp.kernels, lasp.parallel, lasp.models and lasp.launch are the
repository's top-level folders kernels/, parallel/, models/ and launch/ (setup.py's package_dir installs them
there). In a source tree (a checkout or a worktree on PYTHONPATH) the lines below find those folders beside this
one; an installed copy has them inside and skips this.
"""
import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (the package's own search path)
from .allscan import allscan
from .lasp1 import lasp1
from .lasp2 import lasp2

__all__ = ["allscan", "lasp1", "lasp2"]
from .ring_linear import ring_linear_attention  # noqa: E402  the left-product ring baseline (benchmarks)

__all__ += ["ring_linear_attention"]
from .apply import apply_sequence_parallel  # noqa: E402  swap a model's attention functions for these engines
from .apply import ENGINES, LINEAR_ENGINES, SOFTMAX_ENGINES  # noqa: E402  every engine's declaration, by name

__all__ += ["apply_sequence_parallel", "ENGINES", "LINEAR_ENGINES", "SOFTMAX_ENGINES"]
