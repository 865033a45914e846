"""One training step of minimax-tiny on one sequence of packed documents, over W gloo ranks: time and peak memory.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 8 docs/bench/minimax_1m.py --seq-len 1048576 \
        --engines lasp2+allgather --out docs/bench/minimax_1m.json

The training core's step (launch.trainer.train_step through launch/bench.py's bench_run: DDP engine, AdamW,
activation checkpointing per block, fp32) on random bytes cut into documents of random lengths (uniform in
[--min-doc, --max-doc] tokens, the last one cut at T), with global positions and segment ids sharded in the
layout. Softmax layers attend within a document (the engines skip other documents' key runs); lightning layers
reset their state at each document start (since the merge of issue 21; the committed JSON predates it). First a warm-up step at 512 tokens per rank (code pages, optimizer state; `runtime_bytes` is
the memory after it), then the measured step (launch/bench.py's meter: page faults included; its record is written
at once), then one timed step in bench's speed mode (heap never trimmed: about twice the resident memory, 4.0 GiB
per rank at 131,072 tokens per rank — at 1M on 8 ranks that step does not fit 23.5 GiB).
"""
import argparse
import json
import os
import time

import torch

from lasp.launch import bench
from lasp.parallel import comm, init_mesh, local_positions


def packed_batch(seq_len, min_doc, max_doc, layout, group, seed=1234):
    """This rank's shard of one packed sequence: tokens, labels, global positions, document ids."""
    W, r = comm.group_size(group), comm.group_rank(group)
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, 256, (1, seq_len + 1), generator=g)
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(min_doc, max_doc + 1, (), generator=g)))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len][None]
    pos = local_positions(seq_len, layout, r, W)
    return dict(tokens=full[:, pos], positions=pos, segment_ids=doc[:, pos], labels=full[:, pos + 1],
                loss_mask=None), len(lengths)


def _write(record, out, rank, device):
    """Rank 0 writes the record (with the load now and the machine) as JSON and prints it."""
    if rank == 0:
        record = dict(record, load_avg_end=os.getloadavg(), machine=bench.machine_info(device))
        with open(out, "w") as f:
            json.dump(record, f, indent=1)
        print(json.dumps(record, indent=1), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1048576)
    p.add_argument("--engines", default="lasp2+allgather", help="linear+softmax engine pair")
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"))
    p.add_argument("--min-doc", type=int, default=2048)
    p.add_argument("--max-doc", type=int, default=16384)
    p.add_argument("--out", default="docs/bench/minimax_1m.json")
    args = p.parse_args()
    bargs = bench.parse_args(["--mode", "long", "--preset", "minimax-tiny", "--engines", args.engines,
                              "--seq-lens", str(args.seq_len), "--layout", args.layout])
    mesh = init_mesh(sp=int(os.environ.get("WORLD_SIZE", 1)))
    group, device = mesh.group("sp"), torch.device("cpu")
    bench.malloc_for_measurement()
    load_start = os.getloadavg()
    run = bench.bench_run(bargs, args.engines, mesh, device)
    layout = run.cfg.parallel.layout
    bench.core_step(run, packed_batch(512 * mesh.world_size, 256, 1024, layout, group)[0])
    bench.malloc_for_measurement()
    runtime = int(bench.across_ranks([bench.PeakMemory(device).current()], group, device)[0])
    batch, n_docs = packed_batch(args.seq_len, args.min_doc, args.max_doc, layout, group)
    seconds, profile = bench.measure_step(run, batch)
    record = dict(preset="minimax-tiny", params=run.n_params, world=mesh.world_size, seq_len=args.seq_len,
                  tokens_per_rank=args.seq_len // mesh.world_size, engines=args.engines, layout=layout,
                  documents=n_docs, doc_len=[args.min_doc, args.max_doc], runtime_bytes=runtime,
                  measured_step_s=seconds, load_avg_start=load_start, **profile)
    _write(record, args.out, mesh.rank, device)              # kept even if the timed step does not finish
    bench.malloc_for_speed()
    start = time.perf_counter()
    phases = bench.core_step(run, batch, barrier=True)
    timed = bench.across_ranks([time.perf_counter() - start, *phases.values()], group, device)
    _write(dict(record, timed_step_s=timed[0], timed_phases_s=dict(zip(phases, timed[1:]))), args.out, mesh.rank,
           device)
    comm.barrier(group)


if __name__ == "__main__":
    main()
