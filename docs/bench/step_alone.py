"""One process, the training core's step of docs/bench/model_step.py's model at several lengths (issue 13).

    OMP_NUM_THREADS=1 python docs/bench/step_alone.py 65536 262144     # run two at once to see host contention

Per length: one untimed step, then the cheaper of two timed steps (CPU seconds, time.process_time) and the core's
seconds per phase. Heap-only allocation (launch/bench.py malloc_for_speed), LASP-2 on a group of one rank.
"""
import dataclasses
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from lasp import models  # noqa: E402
from lasp.launch import bench, trainer  # noqa: E402
from lasp.launch.config import ModelConfig  # noqa: E402
from tests.dist import run_ranks  # noqa: E402


def work(lens):
    bench.malloc_for_speed()
    torch.set_num_threads(1)
    cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), pattern="L", dim=32, n_heads=2, n_kv_heads=1,
                              ffn_dim=64)
    args = types.SimpleNamespace(preset="linear-llama3-tiny", batch=1, checkpoint=True, layout="contiguous",
                                 model=ModelConfig("linear-llama3-tiny", arch=cfg))
    run = bench.bench_run(args, "lasp2+allgather", trainer.setup_mesh(1, 1), torch.device("cpu"))
    out = {}
    for T in lens:
        batch = bench.sequence_batch(T, "contiguous", args, None, "cpu")
        trainer.train_step(run, batch)
        timed = []
        for _ in range(2):
            c0 = time.process_time()
            metrics = trainer.train_step(run, batch)
            timed.append((time.process_time() - c0, metrics["seconds"]))
        out[T] = min(timed, key=lambda x: x[0])
    return out


if __name__ == "__main__":
    lens = [int(x) for x in sys.argv[1:]] or [65536, 262144]
    print(f"load {os.getloadavg()}")
    for T, (cpu, phases) in run_ranks(1, work, lens)[0].items():
        print(f"T={T:>9,}  CPU {cpu:6.2f} s  {T / cpu:9,.0f} tokens/s  phases {phases}")
