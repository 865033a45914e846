"""Linear-attention sequence parallelism: LASP-2 (one all-gather each way), LASP-1 (ring baseline) and All-Scan
(one prefix state per segment, pipelined point to point)."""
from .allscan import allscan
from .lasp1 import lasp1
from .lasp2 import lasp2

__all__ = ["allscan", "lasp1", "lasp2"]
from .ring_linear import ring_linear_attention  # noqa: E402  the left-product ring baseline (benchmarks)

__all__ += ["ring_linear_attention"]
from .apply import apply_sequence_parallel  # noqa: E402  swap a model's attention functions for these engines
from .apply import ENGINES, LINEAR_ENGINES, SOFTMAX_ENGINES  # noqa: E402  every engine's declaration, by name

__all__ += ["apply_sequence_parallel", "ENGINES", "LINEAR_ENGINES", "SOFTMAX_ENGINES"]
