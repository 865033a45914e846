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
`--ptxas 90` needs no GPU: it compiles the Triton kernels for sm_90 and prints ptxas register and spill counts.
`--cpu` is the CPU kernel table (docs/kernels.md): fwd+bwd tokens/s of the torch kernel at T = 8K and 256K
(B=1, H=8, d=32, per-head decay, fp32, one process), ungated and gated, beside `baseline` (a copy of the torch
path before the hand-written backward, kept here for that comparison) and a 2048³ matmul, interleaved per repeat.
`--check` is the GPU acceptance run (docs/kernels.md): every lightning_attn kernel against float64 on the CPU in
fp32 and bf16, the timing table, three CUDA steps of launch/pretrain.py; on CPU it says what it skips.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
                   help="GPU acceptance run (accuracy of every kernel, timing, a training step); on CPU: what it can")
    p.add_argument("--peak", default=None, metavar="KIND,T,GATED", help=argparse.SUPPRESS)
    p.add_argument("--cpu", action="store_true", help="CPU kernel table: new torch kernel vs baseline, 8K vs 256K")
    p.add_argument("--ptxas", type=int, default=None, metavar="SM",
                   help="no GPU needed: compile the Triton kernels for sm_SM (e.g. 90) and print ptxas register use")
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


def ptxas_report(arch, head_dim=128, dtype="bf16"):
    """Compile the forward and backward kernels at their CUDA config for sm_`arch` and print ptxas -v (registers,
    spills). Runs without a GPU (Triton ships ptxas); needs TRITON_INTERPRET unset. How the configs were chosen."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from . import lightning_triton as lt
    if lt._INTERPRET:
        raise SystemExit("--ptxas compiles for a GPU: unset TRITON_INTERPRET")
    ptxas = get_ptxas(arch).path                          # the ptxas Triton itself uses for this arch
    x = torch.empty(1, 1, 1, head_dim, dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
    for kernel, backward, gated in ((lt._fwd_kernel, False, False), (lt._bwd_kernel, True, False),
                                    (lt._fwd_kernel, False, True), (lt._bwd_kernel, True, True)):
        BT, BK, BV, num_warps, precision = lt._config(x, x, None, None, backward)
        consts = {"HAS_DECAY": True, "HAS_GATE": gated, "HAS_INIT": True, "HAS_DFINAL": True,
                  "PRECISION": precision, "BT": BT, "BK": BK, "BV": BV}
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("T", "H", "DK", "DV"):
                sig[name] = "i32"
            else:  # inputs/outputs in the input dtype, states, decays and partial gradients in float32
                sig[name] = f"*{dtype}" if name in ("Q", "K", "V", "DO", "O", "DV_OUT") else "*fp32"
        consts = {k: v for k, v in consts.items() if k in sig}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 1})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull], capture_output=True,
                             text=True).stderr
        info = [line.split(":", 1)[-1].strip() for line in out.splitlines() if "spill" in line or "Used" in line]
        name = ("bwd" if backward else "fwd") + ("+gate" if gated else "")
        print(f"{name} {dtype} d={head_dim} BT={BT} BV={BV} warps={num_warps} {gpu}: "
              f"shared {compiled.metadata.shared} B; " + "; ".join(info or [out.strip()]))


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


# ------------------------------------------------------------------------------------ GPU acceptance (--check)
CHECK_CASES = {            # name: (gate scale g = scale·U(0, 1) or None, per-head decay, initial state + dS_final)
    "plain": (None, False, False), "decay+state": (None, True, True),
    "gate strong+decay+state": (-20.0, True, True), "gate weak": (-1e-4, False, False)}


def _check_inputs(case, T, B=2, H=4, d_k=64, d_v=128, seed=0):
    """float64 CPU inputs of one accuracy case: (q, k, v, log_decay, log_gate, state, do, dfinal)."""
    scale, decay, with_state = CHECK_CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, d_k, generator=g, dtype=torch.float64) / d_k ** 0.5 for _ in range(2))
    v, do = (torch.randn(B, T, H, d_v, generator=g, dtype=torch.float64) for _ in range(2))
    log_decay = -(2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float64) / H)) if decay else None
    log_gate = None if scale is None else scale * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    state, dfinal = ((torch.randn(B, H, d_k, d_v, generator=g, dtype=torch.float64) for _ in range(2))
                     if with_state else (None, None))
    return q, k, v, log_decay, log_gate, state, do, dfinal


def _outputs(inputs, backend, dtype, device):
    """(o, final, dq, dk, dv, dstate, dlog_gate) of lightning_attn in `dtype` on `device` (Nones dropped), float64
    on the CPU. Inputs are rounded to `dtype` first, so the float64 reference sees the same numbers."""
    q, k, v, log_decay, log_gate, state, do, dfinal = inputs
    cast = (lambda x, to: None if x is None else x.detach().to(dtype).to(device=device, dtype=to).requires_grad_())
    q, k, v = (cast(x, dtype) for x in (q, k, v))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    log_gate, state = cast(log_gate, sdt), cast(state, sdt)
    ld = None if log_decay is None else log_decay.to(device=device, dtype=sdt)
    o, final = lightning_attn(q, k, v, log_decay=ld, log_gate=log_gate, initial_state=state,
                              output_final_state=True, backend=backend)
    outs, grads = [o], [do.to(dtype).to(device=device, dtype=o.dtype)]
    if dfinal is not None:
        outs.append(final)
        grads.append(dfinal.to(device=device, dtype=final.dtype))
    torch.autograd.backward(outs, grads)
    got = [o, final, q.grad, k.grad, v.grad, None if state is None else state.grad,
           None if log_gate is None else log_gate.grad]
    return [None if x is None else x.detach().double().cpu() for x in got]


def _errors(got, want):
    names = ("o", "final", "dq", "dk", "dv", "dstate", "dlog_gate")
    return {n: ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
            for n, a, b in zip(names, got, want) if a is not None}


def _softmax_outputs(inputs, backend, dtype, device):
    """(o, dq, dk, dv) of causal softmax_attn (kernels/softmax_attn.py) in `dtype` on `device`, float64 on the CPU."""
    from .softmax_attn import softmax_attn
    q, k, v, do = inputs
    q, k, v = (x.detach().to(dtype).to(device).requires_grad_() for x in (q, k, v))
    o = softmax_attn(q, k, v, causal=True, backend=backend)
    o.backward(do.to(dtype).to(device))
    return [x.detach().double().cpu() for x in (o, q.grad, k.grad, v.grad)]


def _softmax_rows(device, T):
    """The softmax kernels' accuracy rows: every backend this device runs in fp32 / bf16 against float64."""
    from .softmax_attn import SOFTMAX_BACKENDS, resolve_softmax_backend
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, T, 4, 64, generator=g, dtype=torch.float64) for _ in range(4)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rounded = [x.to(dtype).double() for x in inputs]
        want = _softmax_outputs(rounded, "torch", torch.float64, torch.device("cpu"))
        errs = {}
        for backend in SOFTMAX_BACKENDS:
            try:
                resolve_softmax_backend(backend, device, dtype, 64)
            except ValueError:
                continue                                        # not a kernel of this device and dtype
            got = _softmax_outputs(inputs, backend, dtype, device)
            errs[backend] = {n: ((a - b).norm() / b.norm()).item()
                             for n, a, b in zip(("o", "dq", "dk", "dv"), got, want)}
        for backend, err in errs.items():
            worst = max(err.values())
            ratio = worst / max(max(errs["torch"].values()), 1e-300)
            ok = worst < 2e-5 if dtype == torch.float32 else (ratio <= 2.0 or backend == "torch")
            rows.append({"case": "softmax causal", "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                         "worst_rel_err": worst, "ratio_to_torch": ratio, "errors": err, "ok": ok})
    return rows


def _delta_outputs(inputs, backend, dtype, device):
    """(o, final, dq, dk, dv, dbeta, dstate, dlog_gate) of gated_delta_attn in `dtype` on `device`, float64 CPU."""
    from .delta_rule import gated_delta_attn
    q, k, v, beta, gate, state, do, dfinal = (x.detach().to(dtype).to(device) for x in inputs)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    beta, gate, state = (x.to(sdt) for x in (beta, gate, state))
    leaves = [x.requires_grad_() for x in (q, k, v, beta, state, gate)]
    o, final = gated_delta_attn(q, k, v, beta, log_gate=gate, initial_state=state, output_final_state=True,
                                backend=backend)
    torch.autograd.backward([o, final], [do.to(o.dtype), dfinal.to(final.dtype)])
    return [x.detach().double().cpu() for x in (o, final, *(leaf.grad for leaf in leaves))]


def _delta_rows(device, T):
    """gated_delta_attn (GVA 2 -> 4 heads, d_k = 64, d_v = 128, unit keys, β in (0, 1), logsigmoid gates, a state)
    in fp32 / bf16 on every backend of the device against float64 torch on the CPU; triton = fla-core's kernel,
    a row marked skipped when fla does not import."""
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, T, 2, 64, generator=g, dtype=torch.float64) for _ in range(2))
    inputs = [q / 8, torch.nn.functional.normalize(k, dim=-1), torch.randn(2, T, 4, 128, generator=g,
              dtype=torch.float64), torch.rand(2, T, 4, generator=g, dtype=torch.float64),
              torch.nn.functional.logsigmoid(torch.randn(2, T, 4, generator=g, dtype=torch.float64) + 4),
              *(torch.randn(2, 4, 64, 128, generator=g, dtype=torch.float64) for _ in range(2))]
    inputs.insert(6, torch.randn(2, T, 4, 128, generator=g, dtype=torch.float64))          # do
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        want = _delta_outputs([x.to(dtype).double() for x in inputs], "torch", torch.float64, torch.device("cpu"))
        worst = {}
        for backend in (("torch", "triton") if device.type == "cuda" else ("torch",)):
            try:
                got = _delta_outputs(inputs, backend, dtype, device)
            except ValueError as e:                     # fla-core not installed: say so, do not fail the check
                rows.append({"case": "delta rule", "backend": backend, "skipped": str(e), "ok": True,
                             "dtype": str(dtype).replace("torch.", ""), "worst_rel_err": float("nan"),
                             "ratio_to_torch": float("nan")})
                continue
            worst[backend] = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))
            ratio = worst[backend] / max(worst.get("torch", worst[backend]), 1e-300)
            ok = worst[backend] < 2e-5 if dtype == torch.float32 else (ratio <= 2.0 or backend == "torch")
            rows.append({"case": "delta rule", "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                         "worst_rel_err": worst[backend], "ratio_to_torch": ratio, "ok": ok})
    return rows


def check_accuracy(device, T):
    """Every lightning_attn and softmax_attn kernel on `device` in fp32 and bf16 against float64 on the CPU. Error
    ratio = its error / the torch backend's error on the same device and dtype (house rule: bf16 ≤ 2); fp32 must
    be < 2e-5."""
    backends = ("triton", "torch") if device.type == "cuda" else ("torch",)
    rows = []
    for case in CHECK_CASES:
        inputs = _check_inputs(case, T)
        for dtype in (torch.float32, torch.bfloat16):
            rounded = [None if x is None else x.to(dtype).double() for x in inputs]   # what both sides see
            want = _outputs(rounded, "torch", torch.float64, torch.device("cpu"))
            errs = {b: _errors(_outputs(inputs, b, dtype, device), want) for b in backends}
            for backend in backends:
                worst = max(errs[backend].values())
                ratio = worst / max(max(errs["torch"].values()), 1e-300)
                ok = worst < 2e-5 if dtype == torch.float32 else (ratio <= 2.0 or backend == "torch")
                rows.append({"case": case, "backend": backend, "dtype": str(dtype).replace("torch.", ""),
                             "worst_rel_err": worst, "ratio_to_torch": ratio, "errors": errs[backend], "ok": ok})
    return rows + _softmax_rows(device, T) + _delta_rows(device, T)


def _train_step(cuda, run_dir):
    """The launcher for 3 steps of the tiny config on one CUDA rank; on CPU only its flags (--dry-run)."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "launch/pretrain.py",
           "--config", "tiny", "--max-steps", "3", "--run-dir", str(run_dir)]
    if not cuda:
        cmd = [sys.executable, "launch/pretrain.py", "--config", "tiny", "--max-steps", "3", "--run-dir",
               str(run_dir), "--dry-run"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)
    return {"command": " ".join(cmd[1:]), "rc": done.returncode, "tail": (done.stdout + done.stderr)[-2000:]}


def check(args):
    """GPU acceptance run: accuracy of every kernel, the timing table, one short CUDA training step. On CPU it
    runs what it can (the torch backend's accuracy at a small size, the launcher's flags) and lists the rest as
    skipped, with the reason."""
    import tempfile
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    skipped = [] if cuda else [
        "accuracy of backend='triton' (needs CUDA)", "timing table vs fla chunk_simple_gla and SDPA flash (needs CUDA)",
        "CUDA training step of launch/pretrain.py (needs CUDA; its flags checked with --dry-run)"]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "skipped": skipped,
              "accuracy": check_accuracy(device, 1000 if cuda else 77)}
    for row in result["accuracy"]:
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['case']:24s} {row['backend']:6s} {row['dtype']:8s} "
              f"worst rel err {row['worst_rel_err']:.2e}  / torch {row['ratio_to_torch']:.2f}", flush=True)
    if cuda:
        args.lengths = args.lengths or [4096, 16384, 65536]
        args.repeats = min(args.repeats, 5)
        result["timing"] = run(args)
        print(table(result["timing"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["train"] = _train_step(cuda, tmp)
    print(f"{'ok  ' if result['train']['rc'] == 0 else 'FAIL'} {result['train']['command']} "
          f"(rc {result['train']['rc']})")
    for reason in skipped:
        print(f"SKIPPED: {reason}")
    result["ok"] = all(r["ok"] for r in result["accuracy"]) and result["train"]["rc"] == 0
    print("check: " + ("all run parts passed" if result["ok"] else "FAILED (see above)"))
    return result


def main(argv=None):
    args = _parse(argv)
    if args.ptxas:
        return ptxas_report(args.ptxas, args.head_dim)
    if args.peak:
        kind, T, gated = args.peak.split(",")
        return print(f"peak MiB {step_peak_mib(kind, int(T), gated == '1'):.1f}")
    if args.check:
        result = check(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return result
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


if __name__ == "__main__":
    main()
