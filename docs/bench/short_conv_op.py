"""The short convolution op alone, one process: kernels.short_conv with and without documents, its naive twin,
and torch's F.conv1d (depthwise, causal padding, SiLU), forward + backward (issue 26).

    OMP_NUM_THREADS=1 python docs/bench/short_conv_op.py [T] [C]        # default (1, 4096, 128): one rank's q at W = 4

CPU milliseconds per forward + backward (time.process_time): the median of 9 runs of 10 calls, after 5 warm-up calls.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from lasp.kernels.short_conv import short_conv, short_conv_naive


def cpu_ms(fn):
    for _ in range(5):
        fn()
    runs = []
    for _ in range(9):
        start = time.process_time()
        for _ in range(10):
            fn()
        runs.append((time.process_time() - start) / 10)
    return sorted(runs)[4] * 1e3


def main():
    T, C = (int(a) for a in (sys.argv[1:] + ["4096", "128"][len(sys.argv[1:]):])[:2])
    torch.set_num_threads(1)
    x = torch.randn(1, T, C, requires_grad=True)
    weight = torch.randn(C, 1, 4, requires_grad=True)
    ids = (torch.arange(T) // 512)[None]                             # documents of 512 tokens

    def run(op, **kw):
        def step():
            y = op(x, weight, **kw)
            y.backward(torch.ones_like(y))
        return step

    def conv1d():
        y = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), weight, groups=C)).transpose(1, 2)
        y.backward(torch.ones_like(y))

    print(f"(1, {T}, {C}), width 4, load {os.getloadavg()[0]:.1f}")
    for name, fn in (("short_conv", run(short_conv)),
                     ("short_conv, documents of 512", run(short_conv, segment_ids=ids)),
                     ("short_conv_naive", run(short_conv_naive)),
                     ("short_conv_naive, documents of 512", run(short_conv_naive, segment_ids=ids)),
                     ("F.conv1d + SiLU (no documents)", conv1d)):
        print(f"{name:36s} {cpu_ms(fn):7.2f} ms")
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
