"""Forward+backward timing of causal linear attention against softmax flash attention: `python -m lasp.kernels.bench`.

Providers, each timed on q, k, v (B, T, H, D) with do (B, T, H, D) and log_decay (H,) = -ALiBi slopes:
  triton  lightning_attn(backend="triton")                       (kernels/lightning_triton.py)
  torch   lightning_attn(backend="torch")                         (kernels/linear_attn.py, autograd backward)
  sdpa    torch SDPA, causal, flash backend on CUDA               (softmax attention, O(T²) work)
  fla     fla.ops.simple_gla.chunk_simple_gla(g_gamma=log λ, scale=1), when flash-linear-attention imports
GPU default: T in 2K..128K, B=1, H=16, D=128, bf16; the median of CUDA-event timings. A provider that runs
out of memory prints "oom"; once one call of a provider exceeds --max-ms, its longer lengths print "skip".
`--smoke` runs on CPU in seconds (T=256, H=2, D=16, fp32, torch and sdpa only; the Triton interpreter is far
too slow to time) so that checks can exercise this script. Prints a markdown table, writes JSON to --out.
`--ptxas 90` needs no GPU: `python -m lasp.kernels.compile_check --arch 90 --dtype bf16 --head-dim D` (every
Triton kernel and flag set built as a launch builds it; registers and spills from Triton's own ptxas run).
`--cpu` is the CPU kernel table (docs/kernels.md): fwd+bwd tokens/s of the torch kernel at T = 8K and 256K
(B=1, H=8, d=32, per-head decay, fp32, one process), ungated and gated, beside `baseline` (a copy of the torch
path before the hand-written backward, kept here for that comparison) and a 2048³ matmul, interleaved per repeat.
`--check` is the GPU acceptance run (kernels/acceptance.py, docs/kernels.md), planned for 8 minutes of an H100
(`--check --plan` prints the plan): every kernel vs float64, the timing table, every engine, 3 training steps
per model family; JSON to --out and markdown beside it. Without CUDA it runs the CPU parts, says what it
skipped and exits 1.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .acceptance import CHECK_CASES  # noqa: F401  (the --check run lives in kernels/acceptance.py)
from .lightning import lightning_attn, lightning_attn_bwd, lightning_attn_fwd

PROVIDERS = ("triton", "torch", "sdpa", "fla", "triton+gate", "fla+gate")
GPU_LENGTHS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lasp.kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU run (T=256, H=2, D=16, fp32, torch + sdpa)")
    p.add_argument("--out", default=None, help="write the results as JSON to this path")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths T (default 2K..128K)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per cell; the median is reported")
    p.add_argument("--max-ms", type=float, default=5000.0, help="skip longer T for a provider slower than this")
    p.add_argument("--check", action="store_true",
                   help="GPU acceptance run (kernels/acceptance.py: every kernel, engine and model family, the timing "
                        "table; planned for < 8 min on an H100); without CUDA its CPU parts, then exit 1")
    p.add_argument("--plan", action="store_true", help="with --check: print the steps and their estimates only")
    p.add_argument("--peak", default=None, metavar="KIND,T,GATED", help=argparse.SUPPRESS)
    p.add_argument("--cpu", action="store_true", help="CPU kernel table: new torch kernel vs baseline, 8K vs 256K")
    p.add_argument("--ptxas", type=int, default=None, metavar="SM",
                   help="no GPU needed: the Triton kernels built for sm_SM (e.g. 90) as a launch builds them, "
                        "bf16 at --head-dim: registers, spills, shared memory (kernels/compile_check.py)")
    args = p.parse_args(argv)
    if args.smoke:                             # tiny sizes so the CPU run takes seconds
        args.heads, args.head_dim, args.repeats = 2, 16, 3
    return args


def _fla_op():
    """chunk_simple_gla or the reason it is unavailable (reported in the table, never silently swapped)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        return None, f"flash-linear-attention not importable ({err.name or err})"
    return chunk_simple_gla, None


def _step(provider, q, k, v, log_decay, log_gate, do, fla_op):
    """One forward + backward of `provider`; gradients land in q.grad, k.grad, v.grad (and log_gate.grad)."""
    if provider in ("triton", "torch"):
        o, _ = lightning_attn(q, k, v, log_decay=log_decay, backend=provider)
    elif provider == "triton+gate":
        o, _ = lightning_attn(q, k, v, log_decay=log_decay, log_gate=log_gate, backend="triton")
    elif provider == "fla+gate":
        o, _ = fla_op(q, k, v, g=log_gate + log_decay, scale=1.0)           # the same a_t = g_t + log λ
    elif provider == "sdpa":
        # (B, T, H, D) -> (B, H, T, D) for SDPA; the flash backend is forced on CUDA so a silent math fallback
        # cannot pass for flash attention
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if q.is_cuda:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
        else:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    else:
        o, _ = fla_op(q, k, v, g_gamma=log_decay, scale=1.0)
    o.backward(do)
    return o


def _time_ms(fn, repeats, cuda):
    """Median milliseconds of `repeats` calls after one warm-up call (CUDA events on GPU, perf_counter on CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(T, H, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(1, T, H, D, generator=g, device=device, dtype=dtype) for _ in range(4))
    q, k = q / D ** 0.5, k / D ** 0.5          # keep linear-attention outputs O(1) in bf16
    slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)
    log_gate = F.logsigmoid(torch.randn(1, T, H, generator=g, device=device) + 4.0)   # g ≈ −0.02, mostly
    return [x.requires_grad_() for x in (q, k, v, log_gate)], -slopes, do


def _run_cell(provider, T, args, dtype, device, fla_op):
    """-> (milliseconds or None, status string, output for cross-checks or None)."""
    (q, k, v, log_gate), log_decay, do = _inputs(T, args.heads, args.head_dim, dtype, device)

    def step():
        for x in (q, k, v, log_gate):
            x.grad = None
        return _step(provider, q, k, v, log_decay, log_gate, do, fla_op)
    try:
        ms = _time_ms(step, args.repeats, device.type == "cuda")
        return ms, "ok", step().detach().float()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "oom", None
    except Exception as err:  # noqa: BLE001 - one broken provider must not lose the other cells; it is reported
        return None, f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}", None


def run(args):
    """Time every (provider, T) cell. Returns the JSON-ready result dict."""
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    lengths = args.lengths or ((256,) if args.smoke else GPU_LENGTHS)
    fla_op, fla_reason = _fla_op() if cuda else (None, "CPU run")
    skip_reason = {"triton": None if cuda else "CPU run (interpreter too slow to time)", "fla": fla_reason}
    skip_reason.update({"triton+gate": skip_reason["triton"], "fla+gate": fla_reason})
    too_slow = set()
    rows = []
    for T in lengths:
        row = {"T": T}
        outputs = {}
        for provider in PROVIDERS:
            ms, status, out = None, skip_reason.get(provider), None
            if status is None and provider in too_slow:
                status = f"skip (> {args.max_ms:.0f} ms at a shorter T)"
            if status is None:
                ms, status, out = _run_cell(provider, T, args, dtype, device, fla_op)
                if ms is not None and ms > args.max_ms:
                    too_slow.add(provider)
            row[f"{provider}_ms"], row[f"{provider}_status"] = ms, status
            if out is not None and provider != "sdpa":
                outputs[provider] = out
        # the linear-attention providers compute the same function: record how far apart they are
        for ref, others in (("torch", ("triton", "fla")), ("triton+gate", ("fla+gate",))):
            for other in others:
                if ref in outputs and other in outputs:
                    diff = (outputs[other] - outputs[ref]).norm() / outputs[ref].norm()
                    row[f"{other}_vs_{ref}_rel_err"] = diff.item()
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{p} {_cell(row, p)}" for p in PROVIDERS), flush=True)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu",
            "config": {"B": 1, "H": args.heads, "D": args.head_dim, "dtype": str(dtype).replace("torch.", ""),
                       "repeats": args.repeats, "smoke": args.smoke, "timing": "median, fwd+bwd"},
            "rows": rows}


def _cell(row, provider):
    ms = row[f"{provider}_ms"]
    if ms is not None:
        return f"{ms:.2f}"
    status = row[f"{provider}_status"]
    return status if status in ("oom",) else ("error" if status.startswith("error") else "skip")


def _ratio(num, den):
    return f"{num / den:.2f}" if num is not None and den is not None else "-"


def table(result):
    """Markdown table: milliseconds per provider, ours/fla (< 1: ours faster) and SDPA/ours (> 1: ours faster)."""
    cfg = result["config"]
    lines = [f"Card: {result['device']} | B={cfg['B']} H={cfg['H']} D={cfg['D']} {cfg['dtype']} | "
             f"forward+backward, median ms",
             "", "| T | triton (ours) | torch | SDPA flash | fla simple_gla | ours/fla | SDPA/ours | "
                 "triton+gate | fla+gate | ours/fla gated |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [_cell(row, p) for p in ("triton", "torch", "sdpa", "fla")]
        gated = [_cell(row, p) for p in ("triton+gate", "fla+gate")]
        lines.append(f"| {row['T']} | " + " | ".join(cells) + f" | {_ratio(row['triton_ms'], row['fla_ms'])} | "
                     f"{_ratio(row['sdpa_ms'], row['triton_ms'])} | " + " | ".join(gated) +
                     f" | {_ratio(row['triton+gate_ms'], row['fla+gate_ms'])} |")
    notes = {f"{p}: {row[p + '_status']}" for row in result["rows"] for p in PROVIDERS
             if row[p + "_ms"] is None}
    return "\n".join(lines + ([""] + sorted(notes) if notes else []))


# ----------------------------------------------------------------------------------------- CPU kernel table
def _baseline_chunk_scan(q, k, v, log_decay, state, c):
    """COPY of kernels/linear_attn.py `_chunk_scan` as of issue 13 (one Python step per chunk, autograd backward):
    the baseline of the CPU table only, not used by the library. (B, H, T, D), T = n·c -> (o, final state)."""
    B, H, T, _ = q.shape
    n = T // c
    q, k, v = (x.reshape(B, H, n, c, x.shape[-1]) for x in (q, k, v))
    i = torch.arange(c, device=q.device)
    diff = i[:, None] - i[None, :]
    powers = (lambda e: torch.exp(log_decay[:, None] * e[None, :].to(log_decay.dtype)))
    scores = q @ k.transpose(-1, -2)
    mask = powers(diff.clamp(min=0).flatten()).view(H, 1, c, c) * (diff >= 0)
    q = q * powers(i + 1).view(H, 1, c, 1)
    chunk_decay = powers(torch.tensor([c])).view(H, 1, 1)
    o = (scores * mask) @ v
    chunk_states = (k * powers(c - 1 - i).view(H, 1, c, 1)).transpose(-1, -2) @ v
    prefixes = []
    for m_j in chunk_states.unbind(2):
        prefixes.append(state)
        state = m_j + chunk_decay * state
    o = o + q @ torch.stack(prefixes, dim=2)
    return o.reshape(B, H, T, -1), state


def _baseline(q, k, v, log_decay, chunk_len=64):
    """The baseline torch path (full chunks only: the table's T are multiples of 64)."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    state = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    o, _ = _baseline_chunk_scan(qh, kh, vh, log_decay, state, chunk_len)
    return o.transpose(1, 2)


def _nominal_flops(T, H, d_k, d_v, c=64):
    """Lightning-2 count per fwd+bwd (backward = 2 × forward): 3·(2c(d_k + d_v) + 4 d_k d_v) per token and head."""
    return 3 * (2 * c * (d_k + d_v) + 4 * d_k * d_v) * T * H


def _cpu_cell(kind, T, H, d, gated):
    """A fwd+bwd closure for one cell of the CPU table."""
    from .linear_attn import linear_attn_chunked
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, T, H, d, generator=g) / d ** 0.5 for _ in range(4))
    log_decay = -2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)
    log_gate = F.logsigmoid(torch.randn(1, T, H, generator=g) + 4.0) if gated else None
    leaves = [x.requires_grad_() for x in (q, k, v)] + ([log_gate.requires_grad_()] if gated else [])

    def step():
        for x in leaves:
            x.grad = None
        if kind == "baseline":
            o = _baseline(q, k, v, log_decay)
        elif kind == "recompute":           # the engines' no-autograd pair: the backward redoes the state pass
            lightning_attn_fwd(q, k, v, log_decay, log_gate=log_gate)
            lightning_attn_bwd(q, k, v, log_decay, None, do, log_gate=log_gate)
            return
        else:                                           # block-entry states saved by the forward
            o, _ = linear_attn_chunked(q, k, v, log_decay, log_gate=log_gate)
        o.backward(do)
    return step


def step_peak_mib(kind, T, gated, heads=8, head_dim=32):
    """Resident-set high-water mark of one fwd+bwd above the resident set just before it (Linux /proc), MiB.
    Run in a fresh process (`--peak`), first call, so that nothing earlier is cached in the heap."""
    step = _cpu_cell(kind, T, heads, head_dim, gated)

    def read(key):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) / 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                    # resets VmHWM to the current resident set
    before = read("VmRSS:")
    step()
    return read("VmHWM:") - before


def _peak_in_subprocess(kind, T, gated):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "lasp.kernels.bench", "--peak", f"{kind},{T},{int(gated)}"],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def cpu_table(lengths=(8192, 262144), repeats=3, heads=8, head_dim=32, kinds=("new", "recompute", "baseline"),
              memory=True):
    """Median seconds of every cell, interleaved: each repeat runs every cell once (a load spike hits all)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    cells = {("matmul", 2048, False): lambda: a @ b}
    for T in lengths:
        for kind in kinds:
            for gated in ((False,) if kind == "baseline" else (False, True)):
                cells[(kind, T, gated)] = _cpu_cell(kind, T, heads, head_dim, gated)
    times = {key: [] for key in cells}
    for fn in cells.values():
        fn()                                                     # warm-up
    for _ in range(repeats):
        for key, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rows = []
    for (kind, T, gated), ts in times.items():
        sec = statistics.median(ts)
        flops = 2 * 2048 ** 3 if kind == "matmul" else _nominal_flops(T, heads, head_dim, head_dim)
        peak = _peak_in_subprocess(kind, T, gated) if memory and kind != "matmul" else None
        rows.append({"kernel": kind, "T": T, "gated": gated, "seconds": sec, "peak_mib": peak,
                     "tokens_per_s": None if kind == "matmul" else T / sec, "gflops": flops / sec / 1e9})
    return {"config": {"B": 1, "H": heads, "d": head_dim, "dtype": "float32", "repeats": repeats,
                       "threads": torch.get_num_threads(), "timing": "median, fwd+bwd, interleaved"}, "rows": rows}


def cpu_markdown(result):
    cfg = result["config"]
    lines = [f"B={cfg['B']} H={cfg['H']} d={cfg['d']} {cfg['dtype']}, {cfg['threads']} thread(s), "
             f"median of {cfg['repeats']} interleaved repeats", "",
             "| kernel | gate | T | median s | tokens/s | nominal GFLOP/s | step peak MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        gate = "-" if r["kernel"] == "matmul" else ("log_gate + decay" if r["gated"] else "decay")
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        name = "matmul 2048³" if r["kernel"] == "matmul" else r["kernel"]
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {name} | {gate} | {r['T']} | {r['seconds']:.3f} | {tps} | {r['gflops']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    if args.ptxas:                          # Triton's own build, read from its ptxas log: kernels/compile_check.py
        from .compile_check import main as compile_check
        return compile_check(["--arch", str(args.ptxas), "--dtype", "bf16", "--head-dim", str(args.head_dim)])
    if args.peak:
        kind, T, gated = args.peak.split(",")
        return print(f"peak MiB {step_peak_mib(kind, int(T), gated == '1'):.1f}")
    if args.check:
        from .acceptance import main as acceptance
        return acceptance(args)
    if args.cpu:
        lengths = tuple(args.lengths or (8192, 262144))
        result = cpu_table(lengths, args.repeats if args.repeats != 10 else 3)
        print(cpu_markdown(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return result
    result = run(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def cli(argv=None):
    """`python -m lasp.kernels.bench`: exit 1 when --check fails or is not a complete GPU run (no CUDA here)."""
    result = main(argv)
    if isinstance(result, dict) and "complete" in result and not (result["ok"] and result["complete"]):
        sys.exit(1)
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    cli()
