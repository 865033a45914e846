"""Run a function on W gloo ranks on CPU: forked processes (spawn costs seconds per test).

`run_ranks(W, fn, *args)` calls fn(*args) on every rank after init_process_group and returns the list of the
ranks' return values (keep them small and picklable). A rank's exception fails the caller with that rank's
traceback; a hang fails it after `timeout` seconds instead of blocking the suite.
"""
import multiprocessing as mp
import os
import tempfile
import traceback

import torch
import torch.distributed as dist


def _rank_main(rank, world, store_path, fn, args, queue):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
        result = fn(*args)
        dist.barrier()  # end with a barrier; destroy_process_group() has been seen to hang on gloo
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        queue.close()
        queue.join_thread()  # flush the feeder thread before the hard exit
        os._exit(0)


def run_ranks(world, fn, *args, timeout=240):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, world, store, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        try:
            while len(results) < world:
                rank, ok, value = queue.get(timeout=timeout)
                if not ok:
                    raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
                results[rank] = value
        except mp.queues.Empty:
            missing = sorted(set(range(world)) - set(results))
            raise TimeoutError(f"ranks {missing} of {world} did not finish in {timeout}s (hang?)") from None
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world)]


def rel_err(a, b):
    """Norm-wise relative error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(got, want, tol, names):
    """Each pair (a, b) of got, want: both None, or the same shape, finite, and rel_err(a, b) < tol (names label them)."""
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), f"{name}: got {a is None and 'None'}, want {b is None and 'None'}"
        if a is not None:
            assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
            assert torch.isfinite(a).all(), f"{name}: non-finite values"
            err = rel_err(a, b)
            assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"
