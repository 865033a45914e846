"""GPU readiness without a GPU: `python -m lasp.kernels.compile_check [--arch 90 80] [--json out.json]`.

Builds every Triton kernel the launchers of kernels/lightning_triton.py can start, at every flag combination,
for H100 (sm_90) and A100 (sm_80), exactly as a launch builds it, and checks each build against the budgets
below. No GPU and no CUDA driver are needed: Triton lowers to a cubin with the ptxas inside its wheel.

How a build is made (the launch path of Triton 3.9 up to the point where it asks the driver for a device):
1. the real launcher (`triton_fwd` / `triton_bwd`) runs on fake CUDA tensors (torch FakeTensorMode: shapes,
   dtypes and devices, no data), with every @triton.jit kernel of that module replaced by a recorder, so the
   grid, arguments, block sizes and options are the ones the launcher passes for these inputs;
2. the recorded call is specialised by Triton's own binder for the target (`create_function_from_signature`,
   `JITFunction._pack_args`: pointer alignment, integer divisibility, constexprs, options) and compiled by
   `triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", sm, 32), options)`:
   Triton's passes and its ptxas with Triton's flags (`--regAllocOptLevel=2` included);
3. registers and spill bytes come from the log of that ptxas run (what TRITON_DUMP_PTXAS_LOG=1 prints; captured
   here, the build is forced past the cache so the log exists), registers once more from the cubin (cuobjdump
   --dump-resource-usage; must agree), shared memory from the kernel's metadata (what Triton requests at launch
   and compares with the device's opt-in limit).
Sizes: B = 2, T = 4096, H = 16 (T, H, d multiples of 16, so integer specialisation is that of training shapes).

Budgets (a broken one makes the exit code 1, except a spill named with its reason in KNOWN_SPILLS; --strict
counts those too):
  spill      no spill stores or loads for bf16 / fp16 at d <= 128, sm_90 and sm_80;
  fp32       at most FP32_SPILL_BYTES of spill stores per thread (a few dozen registers' worth, cached in L1):
             fp32 dots are exact ("ieee": FMA units, no tensor cores), so their tiles take far more registers;
  shared     metadata.shared within the opt-in limit per block: H100 227 KB, A100 163 KB;
  threads    registers x threads per block within the 64K-register file (else the launch fails).
A launcher that refuses a configuration (d = 256 today: MAX_HEAD_DIM) is reported as refused, not compiled.
The test suite runs a subset (tests/test_compile_check.py); docs/kernels.md holds the full table.
"""
import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

ARCHS = {90: ("H100", 227 * 1024), 80: ("A100", 163 * 1024)}     # sm -> (card, opt-in shared bytes per block)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
SIZES = {"B": 2, "T": 4096, "H": 16}
FP32_SPILL_BYTES = 256
REGISTER_FILE = 64 * 1024                                         # 32-bit registers per SM (sm_80, sm_90)

# The launchers, by pass: (module of kernels/ whose @triton.jit kernels they start, a call of the launcher on
# (fake) q, k, v and the optional inputs `flags`). A new kernel module's launcher is one line here.
LAUNCHERS = {
    "fwd": ("lightning_triton", lambda lt, q, k, v, flags: lt.triton_fwd(q, k, v, **flags)),
    "bwd": ("lightning_triton", lambda lt, q, k, v, flags: lt.triton_bwd(
        q, k, v, **{"log_decay": None, "initial_state": None, **flags}, do=torch.zeros_like(v))),
}
PASSES = tuple(LAUNCHERS)

# The launchers' optional inputs: name -> (passes that take it, its shape from (B, T, H, d), its dtype). Every
# subset is compiled. A new flag of the kernels (e.g. segment_ids: (B, T) int32 document ids) is one line here.
FLAGS = {
    "log_decay": (("fwd", "bwd"), lambda B, T, H, d: (H,), torch.float32),
    "log_gate": (("fwd", "bwd"), lambda B, T, H, d: (B, T, H), torch.float32),
    "initial_state": (("fwd", "bwd"), lambda B, T, H, d: (B, H, d, d), torch.float32),
    "dfinal_state": (("bwd",), lambda B, T, H, d: (B, H, d, d), torch.float32),
    "segment_ids": (("fwd", "bwd"), lambda B, T, H, d: (B, T), torch.int64),
}

# Spill budgets the kernel bodies cannot meet at any launch shape tried (docs/kernels.md), with the reason and the
# change of the kernel body that would meet them: (pass, flag that must be set or None, dtypes) -> reason. A build
# that breaks only its spill budget and matches one is reported as KNOWN and fails the run only with --strict.
# Shared memory and the register file are never excused. tests/test_compile_check.py keeps every entry live.
KNOWN_SPILLS = {
    ("bwd", "log_gate", ("bf16", "fp16")):
        "the gated backward spills at every BT, BV and warp count tried (BT 16-32, BV 16-64, 4-16 warps), with or "
        "without dS_final, where the ungated one at the same shapes does not: the gate's segment sums and "
        "per-token terms do not fit beside both passes in 255 registers. Meeting it needs a kernel-body change "
        "(e.g. the dq pass and the dk/dv pass as two kernels)",
}


@dataclass
class Launch:
    """One recorded kernel launch: the JITFunction, its grid, and the arguments the launcher passed."""
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Build:
    """What one launch compiles to for one GPU, and the budgets it breaks (empty when it keeps them)."""
    kernel: str
    kind: str
    flags: list
    dtype: str
    head_dim: int
    arch: int
    config: dict = field(default_factory=dict)         # BT, BK, BV, PRECISION, num_warps, num_stages
    registers: int = None
    spill_stores: int = None
    spill_loads: int = None
    stack: int = None
    shared: int = None
    compile_s: float = None
    refused: str = None                                  # the launcher's ValueError, when it refuses the config
    broken: list = field(default_factory=list)
    known: str = None                                    # why its spills are accepted for now (KNOWN_SPILLS)

    @property
    def spill(self):
        return (self.spill_stores or 0) + (self.spill_loads or 0)


# ------------------------------------------------------------------------------------------ 1. record launches
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)                          # CUDA's grid dimensions x, y, z


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` appends a Launch instead of running,
    after the checks a launch would fail on: the arguments bind to the kernel's parameters (count, names), every
    tensor is on the GPU, the grid is within CUDA's limits."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bind_launch(self.kernel, args, kwargs)
            name = self.kernel.__name__
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and not value.is_cuda:
                    raise ValueError(f"{name}: an argument on {value.device} {tuple(value.shape)}, not on the GPU")
            if not 1 <= len(grid) <= 3 or any(not 0 < g <= top for g, top in zip(grid, GRID_LIMITS)):
                raise ValueError(f"{name}: grid {tuple(grid)} outside CUDA's limits {GRID_LIMITS}")
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


def bind_launch(kernel, args, kwargs):
    """inspect.BoundArguments of a launch's kernel arguments (launch options such as num_warps left out); TypeError
    when they do not match the kernel's parameters."""
    import inspect
    params = inspect.signature(kernel.fn).parameters
    return inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})


def _basic_index(x, index):
    """x[index] for ints, slices, None and Ellipsis, through aten view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        used = sum(i is not None and i is not Ellipsis for i in index)
        index = index[:at] + (slice(None),) * (x.dim() - used) + index[at + 1:]
    dim = 0
    for i in index:
        if i is None:
            x, dim = x.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            x = x.select(dim, i)
        elif isinstance(i, slice):
            x, dim = torch.ops.aten.slice.Tensor(x, dim, i.start, i.stop, i.step or 1), dim + 1
        else:
            raise TypeError(f"fake CUDA indexing supports ints, slices, None and ..., got {type(i).__name__}")
    return x


class FakeCudaIndexing(torch.overrides.TorchFunctionMode):
    """`t[...]` on fake CUDA tensors in a CPU-only torch build: Tensor.__getitem__ takes a CUDA device guard, which
    such a build cannot give even to a fake tensor ("not linked with support for cuda devices"); the same view is
    taken with aten ops instead. Other functions pass through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and args[0].is_cuda:
            return _basic_index(*args)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_cuda():
    """FakeTensorMode in which tensors may live on "cuda" without a GPU (shapes, dtypes, devices; no data)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True), FakeCudaIndexing():
        yield


@contextlib.contextmanager
def recording(module="lightning_triton"):
    """Fake CUDA tensors, and every Triton kernel of kernels/<module>.py recorded instead of launched
    (compiled or, under TRITON_INTERPRET, interpreted ones). Yields the list of Launch objects. The kernels are
    restored on exit (their bodies resolve helpers through the module's globals, so nothing may be compiled
    while the recorders are in place)."""
    from triton.runtime.jit import KernelInterface
    mod = importlib.import_module(f"{__package__}.{module}")
    launches = []
    kernels = {name: fn for name, fn in vars(mod).items() if isinstance(fn, KernelInterface)}
    with contextlib.ExitStack() as stack:
        for name, fn in kernels.items():
            stack.enter_context(mock.patch.object(mod, name, _Recorder(fn, launches)))
        stack.enter_context(fake_cuda())
        yield launches


def record_launches(kind, dtype, head_dim, flags, sizes=SIZES):
    """The launches pass `kind` makes with the optional inputs named in `flags`; ValueError when it refuses."""
    B, T, H = sizes["B"], sizes["T"], sizes["H"]
    module, launch = LAUNCHERS[kind]
    with recording(module) as launches:
        q, k, v = (torch.zeros(B, T, H, head_dim, dtype=dtype, device="cuda") for _ in range(3))
        extra = {name: torch.zeros(FLAGS[name][1](B, T, H, head_dim), dtype=FLAGS[name][2], device="cuda")
                 for name in flags}
        try:
            launch(importlib.import_module(f"{__package__}.{module}"), q, k, v, extra)
        except TypeError as e:
            # host code AFTER the launches that fake tensors cannot run (the gated backward with documents sums
            # its gate gradient per document with tensor indexing): the launches are recorded, the rest is not
            # GPU code. Before any launch the error is real.
            if not launches or "fake CUDA indexing" not in str(e):
                raise
    return launches


# ------------------------------------------------------------------------------------------ 2. build as Triton
class _Pointer:
    """What Triton's binder reads from a tensor argument: its dtype and a data pointer (CUDA allocations are
    256-byte aligned, so the 16-byte alignment specialisation holds)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 0


def specialise(launch, arch):
    """(ASTSource, GPUTarget, options dict) exactly as JITFunction.run (Triton 3.9, runtime/jit.py) derives them
    before compiling: the same extra options, binder and _pack_args, for the target instead of the driver's."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn.__name__} is interpreted (kernels.lightning_triton was imported under "
                           f"TRITON_INTERPRET=1) and cannot be compiled: run without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    args = [_Pointer(a.dtype) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {n: _Pointer(a.dtype) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options.__dict__


PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log):
    """ptxas -v text -> {registers, stack, spill_stores, spill_loads} (one kernel per log; bytes per thread)."""
    regs, spill = PTXAS_REGS.findall(log), PTXAS_SPILL.findall(log)
    if len(regs) != 1 or len(spill) != 1:
        raise ValueError(f"expected one kernel in the ptxas log, got {len(regs)}:\n{log}")
    stack, stores, loads = map(int, spill[0])
    return {"registers": int(regs[0]), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def cubin_registers(cubin):
    """Registers per thread recorded in the cubin itself (cuobjdump from Triton's wheel)."""
    import tempfile

    from triton import knobs
    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1))


def compile_launch(launch, arch):
    """Compile one recorded launch for sm_`arch` with Triton's pipeline -> (CompiledKernel, ptxas log text)."""
    import triton
    from triton import knobs
    echo = knobs.nvidia.dump_ptxas_log                  # the user asked to see the log: show it as well
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log), warnings.catch_warnings():
        # Triton 3.9 warns that fp fusion defaults to on when TRITON_DEFAULT_FP_FUSION is unset; a launch gets the
        # same default, so the build is the same: only the noise goes
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        src, target, options = specialise(launch, arch)
        knobs.nvidia.dump_ptxas_log = True               # Triton prints its ptxas log after a build ...
        knobs.compilation.always_compile = True          # ... and a cache hit runs no ptxas
        compiled = triton.compile(src, target=target, options=options)
    if echo:
        print(log.getvalue(), end="")
    return compiled, log.getvalue()


def measure(launch, arch, build):
    """Fill `build` with the registers, spills, stack and shared memory of `launch` compiled for sm_`arch`."""
    t0 = time.perf_counter()
    compiled, log = compile_launch(launch, arch)
    build.compile_s = round(time.perf_counter() - t0, 2)
    for key, value in parse_ptxas_log(log).items():
        setattr(build, key, value)
    from_cubin = cubin_registers(compiled.asm["cubin"])
    assert from_cubin == build.registers, f"ptxas log says {build.registers} registers, the cubin {from_cubin}"
    build.shared = compiled.metadata.shared
    build.config = {k: v for k, v in launch.kwargs.items() if k in ("BT", "BK", "BV", "PRECISION", "num_warps",
                                                                    "num_stages")}
    build.broken = budget_breaks(build)
    build.known = known_spill(build)
    return build


# ------------------------------------------------------------------------------------------ 3. budgets
def budget_breaks(build):
    """The budgets (module docstring) this build breaks, each as one sentence."""
    card, shared_limit = ARCHS[build.arch]
    breaks = []
    if build.dtype in ("bf16", "fp16") and build.head_dim <= 128 and build.spill:
        breaks.append(f"spills {build.spill_stores} B stores / {build.spill_loads} B loads per thread "
                      f"({build.dtype}, d={build.head_dim}, {card})")
    if build.dtype == "fp32" and build.spill_stores > FP32_SPILL_BYTES:
        breaks.append(f"fp32 spills {build.spill_stores} B per thread (stores) > {FP32_SPILL_BYTES} B ({card})")
    if build.shared > shared_limit:
        breaks.append(f"shared memory {build.shared} B > {shared_limit} B opt-in limit of the {card}")
    threads = build.config.get("num_warps", 4) * 32
    if -(-build.registers // 8) * 8 * threads > REGISTER_FILE:      # registers are allocated in units of 8
        breaks.append(f"{build.registers} registers x {threads} threads exceed the {REGISTER_FILE}-register file")
    return breaks


def known_spill(build):
    """The KNOWN_SPILLS reason that covers all of `build`'s broken budgets, else None."""
    if not build.broken or any("spill" not in b for b in build.broken):
        return None
    for (kind, flag, dtypes), reason in KNOWN_SPILLS.items():
        if build.kind == kind and (flag is None or flag in build.flags) and build.dtype in dtypes:
            return reason
    return None


# ------------------------------------------------------------------------------------------ the sweep
def flag_sets(kind):
    """Every subset of the optional inputs pass `kind` takes, the empty one first."""
    names = [name for name, (passes, *_) in FLAGS.items() if kind in passes]
    return [[n for n, on in zip(names, mask) if on] for mask in itertools.product((False, True), repeat=len(names))]


def sweep(archs=(90, 80), dtypes=tuple(DTYPES), head_dims=HEAD_DIMS, kinds=PASSES, flag_filter=None, log=print):
    """Build every (pass, flag set, dtype, head dim) launch for every arch -> list of Build."""
    builds = []
    for kind, dtype, d in itertools.product(kinds, dtypes, head_dims):
        for flags in flag_sets(kind):
            if flag_filter is not None and not flag_filter(kind, flags):
                continue
            try:
                launches = record_launches(kind, DTYPES[dtype], d, flags)
            except ValueError as err:
                builds += [Build("-", kind, flags, dtype, d, arch, refused=str(err)) for arch in archs]
                log(f"refused  {kind} {dtype} d={d} {'+'.join(flags) or 'plain'}: {err}")
                continue
            for launch, arch in itertools.product(launches, archs):
                build = measure(launch, arch, Build(launch.kernel.__name__, kind, flags, dtype, d, arch))
                builds.append(build)
                log(_line(build))
    return builds


def _line(b):
    if b.refused:
        return f"{b.kind} {b.dtype} d={b.head_dim} sm_{b.arch}: refused ({b.refused})"
    c = b.config
    verdict = "ok   " if not b.broken else "KNOWN" if b.known else "FAIL "
    return (f"{verdict} sm_{b.arch} {b.kernel:12s} {b.dtype} d={b.head_dim:<3d} "
            f"{'+'.join(b.flags) or 'plain':45s} BT={c.get('BT')} BV={c.get('BV')} w={c.get('num_warps')} "
            f"regs {b.registers:3d} spill {b.spill_stores}/{b.spill_loads} B shared {b.shared / 1024:.1f} KB "
            f"({b.compile_s:.1f} s)" + "".join(f"\n     broken: {m}" for m in b.broken))


def summary_markdown(builds):
    """One row per (arch, dtype, d, pass): the worst flag set's registers, spills and shared memory."""
    lines = ["| GPU | dtype | d | pass | BT | BV | warps | max regs | max spill B (st/ld) | worst flags | "
             "max shared KB | budgets |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for b in builds:
        groups.setdefault((b.arch, b.dtype, b.head_dim, b.kind), []).append(b)
    for (arch, dtype, d, kind), group in groups.items():
        card = f"{ARCHS[arch][0]} sm_{arch}"
        if group[0].refused:
            lines.append(f"| {card} | {dtype} | {d} | {kind} | - | - | - | - | - | - | - | refused by the launcher |")
            continue
        worst = max(group, key=lambda b: (b.spill, b.registers))
        c = worst.config
        known, broken = (sum(bool(b.broken) and bool(b.known) == k for b in group) for k in (True, False))
        verdict = ", ".join([f"{broken} of {len(group)} broken"] * bool(broken) +
                            [f"{known} of {len(group)} KNOWN"] * bool(known))
        lines.append(f"| {card} | {dtype} | {d} | {kind} | {c['BT']} | {c['BV']} | {c['num_warps']} | "
                     f"{max(b.registers for b in group)} | {worst.spill_stores}/{worst.spill_loads} | "
                     f"{'+'.join(worst.flags) or 'plain'} | {max(b.shared for b in group) / 1024:.1f} | "
                     f"{verdict or 'kept'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ command line
def _what_if(config, shape, precision):
    """lightning_triton._config with --shape (BT, BV, warps) and --precision forced; itself when neither is set."""
    if shape is None and precision is None:
        return config

    def forced(q, v, block_len, block_v, backward):
        BT, BK, BV, warps, prec = config(q, v, *(shape[:2] if shape else (block_len, block_v)), backward)
        return BT, BK, BV, shape[2] if shape else warps, precision or prec
    return forced


def write_builds(path, builds):
    with open(path, "w") as f:
        json.dump({"sizes": SIZES, "budgets": {"fp32_spill_bytes": FP32_SPILL_BYTES,
                                               "shared_limit": {a: s for a, (_, s) in ARCHS.items()}},
                   "builds": [dict(asdict(b), spill=b.spill) for b in builds]}, f, indent=1)


def read_builds(paths):
    """The builds of earlier --json outputs, merged, in table order (sm_90 first, fwd before bwd)."""
    builds = []
    for path in paths:
        with open(path) as f:
            builds += [Build(**{k: v for k, v in b.items() if k != "spill"}) for b in json.load(f)["builds"]]
    return sorted(builds, key=lambda b: (-b.arch, b.dtype, b.head_dim, b.kind != "fwd"))


def nvidia_backend_missing():
    """None when Triton can build for NVIDIA GPUs here (its backend and the ptxas it uses for sm_80 and sm_90),
    else the reason."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tools = [get_ptxas(arch).path for arch in ARCHS]
    except (ImportError, RuntimeError, AttributeError) as err:
        return f"Triton's NVIDIA backend is not installed ({err})"
    missing = [tool for tool in tools if not (tool and os.path.exists(tool))]
    return f"Triton's ptxas is missing ({missing})" if missing else None


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lasp.kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS), help="sm versions")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS), help="d_k = d_v")
    p.add_argument("--pass", dest="kinds", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--flags", nargs="+", default=None, metavar="SET",
                   help="only these flag sets, each '+'-joined (e.g. plain log_gate+initial_state)")
    p.add_argument("--json", default=None, help="write every build as JSON to this path")
    p.add_argument("--markdown", action="store_true", help="print the summary table (docs/kernels.md)")
    p.add_argument("--strict", action="store_true", help="KNOWN spills (KNOWN_SPILLS) fail the run too")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="print the summary table of earlier --json outputs (merged), build nothing")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("BT", "BV", "WARPS"),
                   help="what-if: every launch at these token / d_v blocks and warps instead of _config's")
    p.add_argument("--precision", default=None, choices=("ieee", "tf32", "tf32x3"),
                   help="what-if: every launch with these dot products instead of _config's")
    p.add_argument("--allow-head-dim", type=int, default=None, metavar="D",
                   help="what-if: let the launcher take head dims up to D (its MAX_HEAD_DIM) for this run")
    return p.parse_args(argv)


def main(argv=None):
    """Exit code: 0 every budget kept, 1 a budget broken, 2 Triton cannot build for NVIDIA here."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):   # interpreted kernels cannot be compiled
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "lasp.kernels.compile_check", *argv], env=env).returncode
    args = _parse(argv)
    if args.render:
        return print(summary_markdown(read_builds(args.render))) or 0
    missing = nvidia_backend_missing()
    if missing:
        print(f"compile_check: {missing}", file=sys.stderr)
        return 2
    wanted = None if args.flags is None else {tuple(s.split("+")) if s != "plain" else () for s in args.flags}
    from . import lightning_triton as lt
    with mock.patch.object(lt, "MAX_HEAD_DIM", args.allow_head_dim or lt.MAX_HEAD_DIM), \
            mock.patch.object(lt, "_config", _what_if(lt._config, args.shape, args.precision)):
        builds = sweep(tuple(args.arch), tuple(args.dtype), tuple(args.head_dim), tuple(args.kinds),
                       None if wanted is None else (lambda kind, flags: tuple(flags) in wanted))
    broken = [b for b in builds if b.broken and (args.strict or not b.known)]
    known = [b for b in builds if b.broken and b.known and not args.strict]
    if args.markdown:
        print(summary_markdown(builds))
    if args.json:
        write_builds(args.json, builds)
    refused = sum(bool(b.refused) for b in builds)
    print(f"compile_check: {len(builds) - len(broken) - len(known) - refused} of {len(builds)} builds within "
          f"budget, {len(known)} KNOWN spills, {len(broken)} broken, {refused} refused by the launcher")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
