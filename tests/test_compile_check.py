"""GPU readiness without a GPU (kernels/compile_check.py, docs/kernels.md "GPU readiness"):
1. the Triton kernels built for sm_90 as a launch builds them (a fast subset of `python -m lasp.kernels.compile_check`)
   keep their budgets, and the spills it reports are those of Triton's own ptxas log (TRITON_DUMP_PTXAS_LOG=1);
2. the CUDA-only Python paths run on fake CUDA tensors: the `flash_cuda` aten calls of kernels/softmax_attn.py meet
   the flash kernel's documented argument contract, and the CUDA dispatch of lightning_attn reaches the Triton
   launchers with arguments that bind to the kernels;
3. the GPU acceptance run's plan, argument parsing and CPU refusal (kernels/bench.py --check).
The compile tests run in a subprocess: conftest sets TRITON_INTERPRET=1, under which kernels cannot be compiled.
They skip only when Triton's NVIDIA backend (or its ptxas) is missing."""
import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lasp.kernels import compile_check as cc

NO_NVIDIA = cc.nvidia_backend_missing()
needs_nvidia = pytest.mark.skipif(NO_NVIDIA is not None, reason=f"cannot build for NVIDIA GPUs: {NO_NVIDIA}")
sa = importlib.import_module("lasp.kernels.softmax_attn")
ALL_FWD = "log_decay+log_gate+initial_state"


def _run(args, tmp_path, **env):
    """A python subprocess without TRITON_INTERPRET (and with a fresh Triton cache when asked)."""
    clean = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env={**clean, **env},
                          cwd=tmp_path, timeout=600)


# ---------------------------------------------------------------------------------------------- 1. compile
@needs_nvidia
def test_fast_subset_keeps_budgets_on_sm90(tmp_path):
    """bf16, d = 128, sm_90, forward and backward, without and with every flag: no spill and shared memory within
    227 KB, except the gated backward's spill, which must be the KNOWN_SPILLS entry (with its reason) and must
    still spill (an entry that no longer applies has to go)."""
    out = tmp_path / "builds.json"
    done = _run(["-m", "lasp.kernels.compile_check", "--arch", "90", "--dtype", "bf16", "--head-dim", "128",
                 "--flags", "plain", ALL_FWD, ALL_FWD + "+dfinal_state", "--json", str(out)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    builds = json.loads(out.read_text())["builds"]
    assert {(b["kind"], "+".join(b["flags"]) or "plain") for b in builds} == {
        ("fwd", "plain"), ("fwd", ALL_FWD), ("bwd", "plain"), ("bwd", ALL_FWD), ("bwd", ALL_FWD + "+dfinal_state")}
    for b in builds:
        assert b["arch"] == 90 and 0 < b["shared"] <= 227 * 1024 and 0 < b["registers"] <= 255, b
        gated_backward = b["kind"] == "bwd" and "log_gate" in b["flags"]
        assert (b["spill"] == 0 and b["broken"] == []) or (gated_backward and b["known"]), b
    assert any(b["spill"] > 0 and b["known"] for b in builds), "KNOWN_SPILLS entry no longer needed: remove it"
    assert "0 broken" in done.stdout


CROSS_CHECK = """
import contextlib, io, json, torch, triton
from lasp.kernels import compile_check as cc, lightning_triton as lt
with cc.recording() as launches:
    q = torch.zeros(2, 4096, 16, 128, dtype=torch.bfloat16, device="cuda")
    lt.triton_fwd(q, q, q, torch.zeros(16, device="cuda"), torch.zeros(2, 16, 128, 128, device="cuda"),
                  log_gate=torch.zeros(2, 4096, 16, device="cuda"), block_len=32, block_v=32)
launch, = launches
launch.kwargs["num_warps"] = 4       # whatever _config's rule: gated, 32 x 32 blocks at 4 warps spill on sm_90
src, target, options = cc.specialise(launch, 90)
triton.compile(src, target=target, options=options)           # Triton prints its own ptxas log (fresh cache)
with contextlib.redirect_stdout(io.StringIO()):
    build = cc.measure(launch, 90, cc.Build("_fwd_kernel", "fwd", [], "bf16", 128, 90))
print("BUILD " + json.dumps({"registers": build.registers, "stores": build.spill_stores, "loads": build.spill_loads}))
"""


@needs_nvidia
def test_reported_spills_are_those_of_tritons_own_ptxas_log(tmp_path):
    """The bug of the old `bench --ptxas` (ptxas re-run on the PTX without Triton's flags reported no spill where
    Triton's cubin spills) must not come back: the module's numbers equal the log Triton itself prints for the
    same build with TRITON_DUMP_PTXAS_LOG=1 and a fresh cache, on a config that does spill."""
    done = _run(["-c", CROSS_CHECK], tmp_path, TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout.split("BUILD ")[0]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.findall(r"Used (\d+) registers", log)
    assert len(spills) == len(regs) == 1, log                 # exactly Triton's one build printed its log
    build = json.loads(done.stdout.split("BUILD ")[1])
    assert (build["stores"], build["loads"]) == tuple(map(int, spills[0])) and build["registers"] == int(regs[0])
    assert build["stores"] > 0, "this config is meant to spill: pick one that does"


def test_ptxas_log_parser():
    log = ("ptxas info    : Function properties for _bwd_kernel\n    24 bytes stack frame, 24 bytes spill stores, "
           "48 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size")
    assert cc.parse_ptxas_log(log) == {"registers": 255, "stack": 24, "spill_stores": 24, "spill_loads": 48}
    with pytest.raises(ValueError, match="one kernel"):
        cc.parse_ptxas_log(log + "\n" + log)


def test_budgets():
    """Each budget of the module docstring, broken once."""
    ok = cc.Build("k", "fwd", [], "bf16", 128, 90, config={"num_warps": 8}, registers=255, spill_stores=0,
                  spill_loads=0, shared=20 * 1024)
    assert cc.budget_breaks(ok) == []
    cases = [({"spill_stores": 4}, "spills"), ({"shared": 228 * 1024}, "opt-in limit"),
             ({"arch": 80, "shared": 164 * 1024}, "A100"), ({"config": {"num_warps": 16}}, "register file"),
             ({"dtype": "fp32", "spill_stores": cc.FP32_SPILL_BYTES + 4}, "fp32 spills")]
    for change, words in cases:
        broken = cc.budget_breaks(cc.Build(**{**ok.__dict__, **change}))
        assert len(broken) == 1 and words in broken[0], (change, broken)
    assert cc.budget_breaks(cc.Build(**{**ok.__dict__, "head_dim": 256, "spill_stores": 8})) == []
    assert cc.budget_breaks(cc.Build(**{**ok.__dict__, "dtype": "fp32", "spill_stores": 8, "spill_loads": 300})) == []


def test_flag_sets_cover_every_subset():
    assert len(cc.flag_sets("fwd")) == 2 ** 4 and len(cc.flag_sets("bwd")) == 2 ** 5     # + segment_ids (documents)
    assert cc.flag_sets("bwd")[0] == [] and cc.flag_sets("bwd")[-1] == list(cc.FLAGS)


# ---------------------------------------------------------------------------------------------- 2. fake CUDA
class _AtenLog(TorchDispatchMode):
    """Records the aten flash-attention calls (their arguments as the CUDA kernel would receive them)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "flash_attention" in func.name():
            self.calls.append((func.name(), _named(func, args, kwargs or {})))
        return func(*args, **(kwargs or {}))


def _named(func, args, kwargs):
    """The call's arguments by their schema names, defaults filled in (the dispatcher drops trailing defaults)."""
    named = {}
    for i, arg in enumerate(func._schema.arguments):
        named[arg.name] = args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
    return named


def _flash_contract(name, a, q_heads, tq, tk):
    """The TORCH_CHECKs of torch's CUDA flash kernel (aten/src/ATen/native/transformers/cuda/flash_attn/
    flash_api.cpp, mha_fwd / mha_bwd) that a fake run can see: 16-bit q, k, v of one dtype, (B, h, T, d) with the
    last dim contiguous, d <= 256 and a multiple of 8, KV heads dividing query heads; backward: grad_out and out
    like q, logsumexp float32 (B, H, Tq) contiguous, max_q / max_k the sequence lengths; dropout 0, a float scale."""
    q, k, v = a["query"], a["key"], a["value"]
    if name.endswith("backward"):
        assert a["grad_out"].shape == a["out"].shape == q.shape and a["grad_out"].dtype == a["out"].dtype == q.dtype
        lse = a["logsumexp"]
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.is_contiguous()
        assert (a["cum_seq_q"], a["cum_seq_k"], a["max_q"], a["max_k"]) == (None, None, tq, tk)
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
    assert q.dim() == k.dim() == v.dim() == 4 and q.shape[1] == q_heads and q.shape[2] == tq and k.shape[2] == tk
    assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[1] % k.shape[1] == 0
    assert q.shape[-1] == k.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    assert all(x.stride(-1) == 1 for x in (q, k, v)) and a["dropout_p"] == 0.0 and isinstance(a["scale"], float)


@pytest.mark.parametrize("causal,heads,d_k,d_v,tq,tk", [
    (True, 4, 64, 64, 37, 37), (False, 4, 64, 64, 37, 37), (True, 8, 20, 12, 16, 16), (False, 8, 20, 12, 16, 16),
    (False, 6, 80, 48, 5, 23)])                              # causal is the diagonal block: Tq = Tk only
def test_flash_cuda_calls_on_fake_cuda(causal, heads, d_k, d_v, tq, tk):
    """softmax_attn_fwd / _bwd with backend=flash_cuda (the default for 16-bit CUDA tensors) on fake CUDA
    tensors: the aten calls meet the flash kernel's contract, and the results have the documented shapes and
    dtypes (out, lse, dq, dk, dv in float32). GQA (KV heads 2) and d_k != d_v (zero-padded to a multiple of 8)."""
    log = _AtenLog()
    with cc.fake_cuda(), log:
        q = torch.zeros(2, tq, heads, d_k, dtype=torch.bfloat16, device="cuda")
        k = torch.zeros(2, tk, 2, d_k, dtype=torch.bfloat16, device="cuda")
        v = torch.zeros(2, tk, 2, d_v, dtype=torch.bfloat16, device="cuda")
        assert sa.resolve_softmax_backend(None, q.device, q.dtype, max(d_k, d_v)) == "flash_cuda"
        out, lse = sa.softmax_attn_fwd(q, k, v, causal=causal)
        dq, dk, dv = sa.softmax_attn_bwd(q, k, v, out, lse, torch.zeros_like(out, dtype=q.dtype), causal=causal)
        o16 = sa.softmax_attn(q, k, v, causal=causal) if causal else out
    assert [c[0] for c in log.calls] == ["aten::_scaled_dot_product_flash_attention",
                                         "aten::_scaled_dot_product_flash_attention_backward"] + (
        ["aten::_scaled_dot_product_flash_attention"] if causal else [])
    for name, named in log.calls:
        _flash_contract(name, named, heads, tq, tk)
        assert named["is_causal"] is causal
    assert out.shape == (2, tq, heads, d_v) and lse.shape == (2, tq, heads) and out.dtype == lse.dtype == torch.float32
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert {x.dtype for x in (dq, dk, dv)} == {torch.float32}
    assert o16.dtype == (torch.bfloat16 if causal else torch.float32)


def _bound(launch):
    return cc.bind_launch(launch.kernel, launch.args, launch.kwargs).arguments


STATE_ARGS = ("S0", "SF", "DSF", "DQP", "DKP", "DS0", "TERMS", "LOG_DECAY", "LOG_GATE")   # float32 by contract
INPUT_ARGS = ("Q", "K", "V", "DO", "O", "DV_OUT")                                          # the input dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lightning_cuda_dispatch_on_fake_cuda(dtype):
    """The CUDA dispatch of the linear-attention op on fake CUDA tensors, kernels recorded instead of launched:
    lightning_attn (no decay or gate: their value checks need data) and the engines' no-autograd pair with every
    flag. Each launch binds to its kernel's parameters (the recorder checks count and names, devices and grid),
    the state-like pointers are float32 and the token tensors in the input dtype, the flags reach the kernels as
    their constexprs, and the results have the documented shapes and dtypes. d_k = 32 != d_v = 48, T = 100."""
    from lasp.kernels import lightning_attn, lightning_attn_bwd, lightning_attn_fwd
    B, T, H, d_k, d_v = 2, 100, 4, 32, 48
    with cc.recording() as launches:
        q, k = (torch.zeros(B, T, H, d_k, dtype=dtype, device="cuda") for _ in range(2))
        v, do = (torch.zeros(B, T, H, d_v, dtype=dtype, device="cuda") for _ in range(2))
        state, dfinal = (torch.zeros(B, H, d_k, d_v, device="cuda") for _ in range(2))
        log_decay, log_gate = torch.zeros(H, device="cuda"), torch.zeros(B, T, H, device="cuda")
        o, final = lightning_attn(q, k, v, initial_state=state, output_final_state=True)
        o2, final2 = lightning_attn_fwd(q, k, v, log_decay, state, "triton", log_gate)
        grads = lightning_attn_bwd(q, k, v, log_decay, state, do, dfinal, "triton", log_gate)
    assert [launch.kernel.__name__ for launch in launches] == ["_fwd_kernel", "_fwd_kernel", "_bwd_kernel"]
    for launch in launches:
        args = _bound(launch)
        for name, value in args.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == (dtype if name in INPUT_ARGS else torch.float32), name
                assert name in INPUT_ARGS + STATE_ARGS, f"new pointer argument {name}: add it to a list above"
        assert (args["T"], args["H"], args["DK"], args["DV"]) == (T, H, d_k, d_v)
        assert launch.grid == (-(-d_v // args["BV"]), B * H) and args["BK"] >= d_k
        assert args["PRECISION"] == ("ieee" if dtype == torch.float32 else "tf32")
    plain, gated, backward = (_bound(launch) for launch in launches)
    assert (plain["HAS_DECAY"], plain["HAS_GATE"], plain["HAS_INIT"]) == (False, False, True)
    assert (gated["HAS_DECAY"], gated["HAS_GATE"], gated["HAS_INIT"]) == (True, True, True)
    assert (backward["HAS_GATE"], backward["HAS_DFINAL"]) == (True, True)
    for out, fin in ((o, final), (o2, final2)):
        assert (out.shape, out.dtype, fin.shape, fin.dtype) == ((B, T, H, d_v), dtype, (B, H, d_k, d_v), torch.float32)
    dq, dk, dv, dstate, dgate = grads
    assert (dq.shape, dk.shape, dv.shape, dstate.shape, dgate.shape) == (q.shape, k.shape, v.shape, state.shape,
                                                                        log_gate.shape)
    assert (dq.dtype, dk.dtype, dv.dtype, dstate.dtype) == (dtype, dtype, dtype, torch.float32)


def test_recorder_refuses_what_a_launch_would():
    """A launch with an argument missing, a CPU tensor, or a grid past CUDA's 65535 in y fails on CPU."""
    from lasp.kernels import lightning_triton as lt
    with cc.fake_cuda():
        q = torch.zeros(1, 8, 1, 16, device="cuda")
        args = [q, q, q, None, None, None, q, q, None, 8, 1, 16, 16]      # SEG None: no documents
        consts = dict(HAS_DECAY=False, HAS_GATE=False, HAS_INIT=False, PRECISION="ieee", BT=16, BK=16, BV=16)
        record = cc._Recorder(lt._fwd_kernel, [])
        record[(1, 1)](*args, **consts, num_warps=4)
        with pytest.raises(TypeError):
            record[(1, 1)](*args[:-1], **consts)
        with pytest.raises(ValueError, match="not on the GPU"):
            record[(1, 1)](*args[:6], torch.zeros(1), *args[7:], **consts)
        with pytest.raises(ValueError, match="grid"):
            record[(1, 65536)](*args, **consts)
    assert len(record.launches) == 1


# ---------------------------------------------------------------------------------------------- 3. --check
def test_acceptance_plan_covers_every_family_and_engine():
    """`bench --check` trains every model family and every training engine pair member, runs every engine of
    lasp.apply.ENGINES (baselines included) in launch/bench.py's layer mode, and is planned within its budget.
    Each training entry's family is the one its config's preset builds, and its engines the ones it selects."""
    import tomllib

    from lasp import models
    from lasp.apply import ENGINES, LINEAR_ENGINES, SOFTMAX_ENGINES
    from lasp.kernels import acceptance, bench
    assert set(acceptance.CHECK_ENGINES) == set(ENGINES)
    trained = set()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for family, engines, flags in acceptance.CHECK_TRAIN:
        opts = dict(zip(flags[::2], flags[1::2]))
        with open(os.path.join(root, "launch", "configs", opts["--config"] + ".toml"), "rb") as f:
            cfg = tomllib.load(f)
        config = models.get_config(opts.get("--model", cfg["model"]["preset"]))
        assert type(config) is models.FAMILIES[family][0], (family, cfg["model"]["preset"])
        chosen = (opts.get("--parallel.linear", cfg.get("parallel", {}).get("linear", "lasp2")),
                  opts.get("--parallel.softmax", cfg.get("parallel", {}).get("softmax", "allgather")))
        assert engines.split(" ")[0] in ("+".join(chosen), chosen[0]), (engines, chosen)
        trained |= set(chosen)
    assert {f for f, *_ in acceptance.CHECK_TRAIN} == set(models.FAMILIES)
    assert set(LINEAR_ENGINES) | set(SOFTMAX_ENGINES) - {"local"} <= trained
    plan = bench.main(["--check", "--plan"])
    assert [step for step, *_ in plan][:3] == ["accuracy", "timing", "engines"] and len(plan) == 3 + len(
        acceptance.CHECK_TRAIN)
    assert sum(estimate for _, _, estimate, _ in plan) <= acceptance.CHECK_BUDGET_S


def test_acceptance_without_gpu_fails_clearly(tmp_path, monkeypatch, capsys):
    """No CUDA: the command runs its CPU parts (stubbed here: test_kernels.py runs them for real), dry-runs every
    training command, lists the GPU parts as SKIPPED, writes JSON + markdown, and exits 1 with a line that says
    it was not a GPU run."""
    from lasp.kernels import acceptance, bench
    ran = {}

    def fake_run(cmds, cuda, deadline):
        ran.update(cmds)
        return {n: {"command": " ".join(c), "rc": 0, "tail": "", "seconds": 0.0} for n, c in cmds.items()}, []
    monkeypatch.setattr(acceptance, "check_accuracy", lambda device, T: [])
    monkeypatch.setattr(acceptance, "_run_commands", fake_run)
    out = tmp_path / "check.json"
    with pytest.raises(SystemExit) as stop:
        bench.cli(["--check", "--out", str(out)])
    assert stop.value.code == 1
    printed = capsys.readouterr().out
    assert "check: NOT A GPU RUN: no CUDA device, 4 parts not run" in printed
    assert "SKIPPED: timing" in printed and "SKIPPED: engines" in printed
    assert len(ran) == len(acceptance.CHECK_TRAIN) and all(c[-1] == "--dry-run" for c in ran.values())
    result = json.loads(out.read_text())
    assert result["ok"] and not result["complete"] and result["device"] == "cpu"
    assert "NOT" not in (tmp_path / "check.md").read_text() and "| engines:" in (tmp_path / "check.md").read_text()


def test_bench_ptxas_is_the_compile_check(monkeypatch):
    """`bench --ptxas 90` prints the compile check's numbers (Triton's own build), not a ptxas re-run."""
    from lasp.kernels import bench
    seen = []
    monkeypatch.setattr(cc, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["--ptxas", "90", "--head-dim", "64"]) == 0
    assert seen == [["--arch", "90", "--dtype", "bf16", "--head-dim", "64"]]


def test_what_if_overrides_the_launch_config():
    """--shape / --precision force every launch's blocks, warps and dots; without them _config is untouched."""
    from lasp.kernels import lightning_triton as lt
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    assert cc._what_if(lt._config, None, None) is lt._config
    assert cc._what_if(lt._config, (16, 64, 4), "tf32x3")(q, q, None, None, True) == (16, 128, 64, 4, "tf32x3")
    assert cc._what_if(lt._config, None, "ieee")(q, q, None, None, True)[4] == "ieee"


def test_main_leaves_the_interpreter(tmp_path, capfd, monkeypatch):
    """Under the suite's TRITON_INTERPRET=1 the module re-runs itself without it (interpreted kernels cannot be
    compiled), with the same arguments; --render prints the table of an earlier JSON without building anything."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(cc.subprocess, "run", lambda argv, env: calls.append((argv, env)) or
                      subprocess.CompletedProcess(argv, 3))
        assert cc.main(["--pass", "fwd", "--arch", "80"]) == 3
    (argv, env), = calls
    assert argv[1:] == ["-m", "lasp.kernels.compile_check", "--pass", "fwd", "--arch", "80"]
    assert "TRITON_INTERPRET" not in env and env["PATH"] == os.environ["PATH"]
    build = cc.Build("_fwd_kernel", "fwd", ["log_gate"], "bf16", 128, 90, config={"BT": 32, "BV": 16, "num_warps": 8},
                     registers=226, spill_stores=0, spill_loads=0, shared=12288)
    cc.write_builds(tmp_path / "one.json", [build])
    assert cc.main(["--render", str(tmp_path / "one.json")]) == 0
    row = "| H100 sm_90 | bf16 | 128 | fwd | 32 | 16 | 8 | 226 | 0/0 | log_gate | 12.0 | kept |"
    assert row in capfd.readouterr().out
