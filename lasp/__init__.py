"""Linear-attention sequence parallelism: LASP-2 (one all-gather each way) and LASP-1 (ring baseline)."""
from .lasp2 import lasp2

__all__ = ["lasp2"]
