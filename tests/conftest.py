import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: forked gloo ranks must not oversubscribe 2 cores
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU through the interpreter
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# subprocesses (torchrun, python -m lasp.launch...) import this tree too, not another installed copy
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

import torch  # noqa: E402

import lasp  # noqa: E402,F401  first: our folders must not shadow installed packages named kernels, ... (lasp/__init__)

torch.set_num_threads(1)
