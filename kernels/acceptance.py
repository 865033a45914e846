"""The GPU acceptance run, `python -m lasp.kernels.bench --check [--plan] [--out check.json]` (docs/kernels.md).

One command for a lent GPU's minutes, planned to finish within CHECK_BUDGET_S on an H100 and prepared and tested
on CPU: the accuracy of every lightning_attn and softmax_attn kernel against float64, the driver's register and
spill counts of every Triton kernel it built, the timing table of kernels/bench.py against SDPA flash and fla,
every sequence-parallel engine (one layer each, launch/bench.py on one CUDA rank) and 3 training steps of every
model family (launch/pretrain.py). `kernels` imports no engine or model: those steps are subprocesses. Without
CUDA it runs the CPU parts (CPU accuracy, every training command's --dry-run), prints SKIPPED for the rest and is
not complete: the command exits 1.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import torch

from .lightning import lightning_attn


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


CHECK_BUDGET_S = 480                    # the whole run on one H100: 8 minutes of a lent GPU's 15
# Every engine of lasp.apply.ENGINES (the ring_linear baseline included), forward + backward of one attention
# layer at sp = 1 on CUDA: one layer-mode run of launch/bench.py (engines there by the same names).
CHECK_ENGINES = ("lasp2", "lasp1", "allscan", "ring_linear", "allgather", "ring", "ulysses")
# One training run per model family and per linear+softmax engine pair a family trains with: (family, engines,
# pretrain flags), 3 steps each at sp = 1, bf16 autocast on CUDA. A new family or engine is one line here
# (tests/test_compile_check.py fails until every models.FAMILIES entry and training engine has one).
CHECK_TRAIN = (
    ("linear-llama3", "lasp2+allgather", ("--config", "tiny")),
    ("linear-llama3", "lasp1+ring", ("--config", "tiny", "--parallel.linear", "lasp1", "--parallel.softmax", "ring")),
    ("linear-llama3", "allscan+ulysses", ("--config", "tiny", "--parallel.linear", "allscan",
                                          "--parallel.softmax", "ulysses")),
    ("tnl", "lasp2 (zigzag)", ("--config", "tnl-tiny", "--sp", "1")),
    ("minimax", "lasp2+allgather", ("--config", "tiny", "--model", "minimax-tiny")),
    ("qwen3-next", "lasp2+allgather", ("--config", "tiny", "--model", "qwen3-next-tiny")),
)
# Estimated seconds on an H100 machine per step (how they were obtained: docs/kernels.md "GPU acceptance run").
CHECK_ESTIMATE_S = {"accuracy": 60, "timing": 90, "engines": 45, "train": 30}


def check_plan(cuda):
    """[(step, what it runs, estimated seconds on an H100, whether it runs on this machine)], in run order."""
    steps = [("accuracy", "every lightning_attn and softmax_attn kernel vs float64: " +
              ("triton + torch, T = 1000" if cuda else "CPU backends, T = 77"), CHECK_ESTIMATE_S["accuracy"], True),
             ("timing", "the timing table, fwd+bwd ms at T = 4K/16K/64K: triton, torch, SDPA flash, fla (+ gated)",
              CHECK_ESTIMATE_S["timing"], cuda),
             ("engines", "one layer of " + ", ".join(CHECK_ENGINES) + " on one CUDA rank",
              CHECK_ESTIMATE_S["engines"], cuda)]
    steps += [(f"train {family} {engines}", "3 steps of launch/pretrain.py " + " ".join(flags) +
               ("" if cuda else " (here: --dry-run)"), CHECK_ESTIMATE_S["train"], True)
              for family, engines, flags in CHECK_TRAIN]
    return steps


def _commands(cuda, tmp):
    """step name -> argv (after the interpreter) of the subprocess steps; on CPU the training runs' --dry-run."""
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "1"]
    cmds = {"engines": torchrun + ["launch/bench.py", "--mode", "layer", "--engines", ",".join(CHECK_ENGINES),
                                   "--seq-lens", "4096", "--reps", "1", "--heads", "8", "--head-dim", "64",
                                   "--out", f"{tmp}/layer"]} if cuda else {}
    for i, (family, engines, flags) in enumerate(CHECK_TRAIN):
        argv = ["launch/pretrain.py", *flags, "--max-steps", "3", "--run-dir", f"{tmp}/run{i}"]
        cmds[f"train {family} {engines}"] = torchrun + argv if cuda else argv + ["--dry-run"]
    return cmds


def _run_commands(cmds, cuda, deadline):
    """Run the subprocess steps -> ({name: {command, rc, tail, seconds}}, [skipped]): in turn on CUDA (one GPU),
    each only if its estimate ends before `deadline` (perf_counter seconds); all at once on CPU (dry runs)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out, skipped = {}, []
    for batch in ([[n] for n in cmds] if cuda else [list(cmds)]):
        if cuda and time.perf_counter() + CHECK_ESTIMATE_S["engines" if batch[0] == "engines" else "train"] > deadline:
            skipped.append(f"{batch[0]}: would pass the {CHECK_BUDGET_S} s budget")
            continue
        t0 = time.perf_counter()
        procs = {n: subprocess.Popen([sys.executable, *cmds[n]], cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True) for n in batch}
        for name, proc in procs.items():
            try:
                text = proc.communicate(timeout=max(60.0, deadline - time.perf_counter()) if cuda else 600)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                text = proc.communicate()[0] + "\n[killed: past the check's time budget]"
            out[name] = {"command": " ".join(cmds[name]), "rc": proc.returncode, "tail": text[-2000:],
                         "seconds": round(time.perf_counter() - t0, 1)}
    return out, skipped


def _gpu_builds():
    """Registers, spills and shared memory the CUDA driver reports for every Triton kernel this process built:
    the measured counterpart of `python -m lasp.kernels.compile_check` (docs/kernels.md)."""
    from triton.runtime.jit import JITFunction

    from . import lightning_triton as lt
    rows = []
    for fn in (f for f in vars(lt).values() if isinstance(f, JITFunction)):
        for cache, *_ in fn.device_caches.values():
            for kernel in cache.values():                 # CompiledKernel; n_regs, n_spills once loaded
                consts = {fn.arg_names[k[0]]: v for k, v in kernel.src.constants.items() if len(k) == 1}
                rows.append({"kernel": fn.__name__, "constexprs": consts, "num_warps": kernel.metadata.num_warps,
                             "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                             "shared": kernel.metadata.shared})
    return rows


def check(args):
    """GPU acceptance run: the steps of `check_plan`; a step is skipped (and named) if its estimate would pass
    CHECK_BUDGET_S. Without CUDA: the CPU parts (CPU accuracy, the training commands' --dry-run), the rest listed
    as SKIPPED, and the result is not complete (the command exits 1)."""
    import tempfile
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    plan = check_plan(cuda)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "budget_s": CHECK_BUDGET_S,
              "plan": [{"step": s, "what": w, "estimate_s": e, "runs_here": here} for s, w, e, here in plan],
              "skipped": [] if cuda else [
                  "accuracy of backend='triton' (needs CUDA; the CPU backends ran)",
                  *(f"{s}: {w} (needs CUDA)" for s, w, _, here in plan if not here),
                  "CUDA training steps of launch/pretrain.py (needs CUDA; their flags checked with --dry-run)"]}
    result["accuracy"] = check_accuracy(device, 1000 if cuda else 77)
    for row in result["accuracy"]:
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['case']:24s} {row['backend']:6s} {row['dtype']:8s} "
              f"worst rel err {row['worst_rel_err']:.2e}  / torch {row['ratio_to_torch']:.2f}", flush=True)
    if cuda:
        result["gpu_builds"] = _gpu_builds()
        args.lengths = args.lengths or [4096, 16384, 65536]
        args.repeats, args.max_ms = min(args.repeats, 5), min(args.max_ms, 2000.0)
        from .bench import run, table
        if time.perf_counter() - t0 + CHECK_ESTIMATE_S["timing"] > CHECK_BUDGET_S:
            result["skipped"].append(f"timing: would pass the {CHECK_BUDGET_S} s budget")
        else:
            result["timing"] = run(args)
            print(table(result["timing"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["runs"], over = _run_commands(_commands(cuda, tmp), cuda, t0 + CHECK_BUDGET_S)
    result["skipped"] += over
    result["train"] = next((r for n, r in result["runs"].items() if n.startswith("train")), None)   # the first
    return _check_verdict(result, time.perf_counter() - t0, cuda)


def _check_verdict(result, seconds, cuda):
    """Print every run's line and the SKIPPED list; set ok (every part run passed) and complete (nothing skipped)."""
    for name, r in result["runs"].items():
        print(f"{'ok  ' if r['rc'] == 0 else 'FAIL'} {name}: {r['command']} (rc {r['rc']}, {r['seconds']} s)")
        if r["rc"]:
            print("    " + r["tail"][-600:].replace("\n", "\n    "))
    for reason in result["skipped"]:
        print(f"SKIPPED: {reason}")
    result["seconds"] = round(seconds, 1)
    result["ok"] = all(r["ok"] for r in result["accuracy"]) and all(r["rc"] == 0 for r in result["runs"].values())
    result["complete"] = cuda and not result["skipped"]
    verdict = "all parts passed" if result["ok"] else "FAILED (see above)"
    if not cuda:
        verdict = f"NOT A GPU RUN: no CUDA device, {len(result['skipped'])} parts not run; the CPU parts " + \
                  ("passed" if result["ok"] else "FAILED")
    print(f"check: {verdict} ({result['seconds']} s)")
    return result


def check_markdown(result):
    """The acceptance run as markdown: steps, accuracy rows, the timing table."""
    lines = [f"# GPU acceptance run: {result['device']}, {result['seconds']} s of {result['budget_s']} s", "",
             "| step | H100 estimate s | result |", "|---|---|---|"]
    for step in result["plan"]:
        r = result["runs"].get(step["step"])
        got = f"rc {r['rc']}, {r['seconds']} s" if r else "in-process" if step["runs_here"] else "skipped"
        lines.append(f"| {step['step']}: {step['what']} | {step['estimate_s']} | {got} |")
    lines += ["", "| case | backend | dtype | worst rel err | / torch | ok |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['backend']} | {r['dtype']} | {r['worst_rel_err']:.2e} | "
              f"{r['ratio_to_torch']:.2f} | {r['ok']} |" for r in result["accuracy"]]
    if "timing" in result:
        from .bench import table
        lines += ["", table(result["timing"])]
    return "\n".join(lines + [""] + [f"SKIPPED: {s}" for s in result["skipped"]])


def main(args):
    """--plan: print the plan; else run it, write JSON to args.out and markdown beside it -> the result dict."""
    if args.plan:
        plan = check_plan(torch.cuda.is_available())
        for step, what, estimate, here in plan:
            print(f"{step:38s} {estimate:4d} s  {'' if here else '(not here: needs CUDA) '}{what}")
        total = sum(estimate for *_, estimate, _ in plan)
        print(f"total estimate on an H100: {total} s of the {CHECK_BUDGET_S} s budget")
        return plan
    result = check(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(check_markdown(result) + "\n")
    return result
