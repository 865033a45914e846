"""Does a gloo rank that waits for a late peer burn CPU? (issue 13: the CPU cost of LASP-2's gathers)

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 docs/bench/gloo_wait_cpu.py

One async all-gather of a (8, 64, 64) fp32 state per rank, waited for at once; rank 0 joins after `delay`
seconds. Prints each rank's wall and CPU (time.process_time, all threads) milliseconds per delay.
"""
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
torch.set_num_threads(1)
r, W = dist.get_rank(), dist.get_world_size()
x, out = torch.zeros(8 * 64 * 64), torch.zeros(W * 8 * 64 * 64)
for delay in (0.0, 0.2):
    dist.barrier()
    c0, t0 = time.process_time(), time.perf_counter()
    if r == 0:
        time.sleep(delay)
    dist.all_gather_into_tensor(out, x, async_op=True).wait()
    print(f"rank {r} delay {delay} s: wall {(time.perf_counter() - t0) * 1e3:.1f} ms, CPU "
          f"{(time.process_time() - c0) * 1e3:.1f} ms", flush=True)
