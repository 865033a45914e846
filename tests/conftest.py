import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked gloo ranks must not oversubscribe 2 cores
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU through the interpreter
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)
