"""LASP-2 across the ranks of a torchrun job, checked against one device.

    torchrun --nproc-per-node 4 launch/demo.py [--seq-len 4096]

Every rank builds the same global sequence (one seed), runs LASP-2 on its shard in both layouts, and compares the
output and the gradients with the single-device float64 computation; rank 0 prints the errors and the
collectives each pass used.
"""
import argparse
import os
import time


import torch

from lasp.kernels import linear_attn_chunked
from lasp import lasp2
from lasp.parallel import count_collectives, init_mesh, shard


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    args = p.parse_args()
    mesh = init_mesh(sp=int(os.environ.get("WORLD_SIZE", 1)))
    W, r = mesh.sp, mesh.rank_in("sp")
    if args.seq_len % (2 * W):
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of 2·W = {2 * W}")
    g = torch.Generator().manual_seed(0)
    shape = (1, args.seq_len, args.heads, args.head_dim)
    q, k, v, do = (torch.randn(*shape, generator=g, dtype=torch.float64) / 4 for _ in range(4))
    log_decay = -torch.linspace(0.0, 0.1, args.heads, dtype=torch.float64)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref, _ = linear_attn_chunked(*full, log_decay)        # one device, float64
    ref_grads = torch.autograd.grad(ref, full, do)
    rows = []
    for layout in ("contiguous", "zigzag"):
        for dtype in (torch.float64, torch.float32):
            local = [shard(x, layout, r, W).to(dtype).requires_grad_() for x in (q, k, v)]
            t0 = time.perf_counter()
            with count_collectives() as log:
                o = lasp2(*local, log_decay=log_decay, layout=layout)
                grads = torch.autograd.grad(o, local, shard(do, layout, r, W).to(dtype))
            ms = 1e3 * (time.perf_counter() - t0)
            err = max([_rel(o, shard(ref, layout, r, W))] +
                      [_rel(a, shard(b, layout, r, W)) for a, b in zip(grads, ref_grads)])
            err_t = torch.tensor([err], dtype=torch.float64)
            torch.distributed.all_reduce(err_t, op=torch.distributed.ReduceOp.MAX) if W > 1 else None
            rows.append((layout, str(dtype).replace("torch.", ""), err_t.item(), log.summary(), ms))
    if r == 0:
        print(f"LASP-2 on {W} gloo ranks, T = {args.seq_len}, H = {args.heads}, D = {args.head_dim}, "
              f"per-head decay; max relative error of o, dq, dk, dv over all ranks vs one device (float64):")
        print(f"{'layout':<11} {'dtype':<8} {'max rel err':>11}  {'ms':>7}  collectives (calls, bytes received)")
        for layout, dtype, err, comms, ms in rows:
            print(f"{layout:<11} {dtype:<8} {err:>11.2e}  {ms:>7.1f}  {comms}")


if __name__ == "__main__":
    main()
