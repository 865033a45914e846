"""Benchmarks of the sequence-parallel engines: one attention layer, a whole small model, one long training step.

    torchrun --nproc-per-node 4 launch/bench.py --mode layer --seq-lens 4096,8192,16384
    torchrun --nproc-per-node 4 launch/bench.py --mode model --seq-lens 8192,32768 --preset linear-llama3-tiny
    torchrun --nproc-per-node 8 launch/bench.py --mode long --seq-lens 2097152 --model.dim 64 ...
    torchrun --nproc-per-node 4 launch/bench.py --mode network --seq-lens 8192 \
        --networks "off;latency_us=50;latency_us=1000;latency_us=20000"

gloo on CPU, NCCL on GPU (parallel.init_mesh). Every rank holds T/W tokens of one sequence (batch B).
  layer  forward+backward of one attention layer per engine: linear (lasp2, lasp1, ring_linear = the left-product
         ring baseline) and softmax (allgather, ring, ulysses). Engines are interleaved inside each repetition.
         lasp2_delta, lasp1_delta, allscan_delta: the same engines running the gated delta rule (beta=, a gate
         per head and token, unit-norm keys; lasp/delta.py).
  model  one training step of the whole model per "linear+softmax" engine pair, interleaved.
  long   one training step with per-layer activation checkpointing; one record per length, so a list of lengths
         gives the curve of peak memory per rank.
         Both run the training core's step, launch.trainer.train_step (forward and loss, backward with the
         engine's gradient averaging, clipping, AdamW, schedule) on random bytes, built by launch.trainer.build;
         --dtype bfloat16 is autocast, as in training. Phases: forward (with the loss all-reduces), backward (with
         the gradient all-reduce), optimizer (clip, AdamW, schedule).
  network  the layer of `layer` mode for the linear engines under the network MODEL of parallel/comm.py
         (LASP_SIM_NETWORK semantics, one spec per --networks entry, "off" = none): every (engine, network)
         case interleaved in each repetition. Also per case: `wait_s`, the seconds the slowest rank was blocked
         in communication, and for LASP-2 `model_comm_s` (the model's gather time) and `hidden` = 1 − wait/model:
         the share of the gather time hidden behind the intra-chunk compute.
Time of a repetition = the slowest rank's; reported: the median over repetitions, global tokens/s, collectives
(calls and bytes RECEIVED per rank, the most loaded rank; for these symmetric patterns it equals bytes sent)
and peak memory per rank, measured in one extra untimed repetition. Memory: GPU = torch.cuda.max_memory_allocated;
CPU = the kernel's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs), with glibc told to
serve allocations ≥ 1 MiB by mmap during the measurement so freed tensors leave the resident set (timed runs use
glibc's settled defaults instead: mmap for ≥ 32 MiB). `peak` is above the rank's memory just
before the step (inputs and weights excluded); `peak_abs` is the whole process.
Results merge into <out>.json (one record per mode/engine/W/T/shape), then <out>.md and <out>.png are
rewritten from all records (launch/bench_report.py).
"""
import argparse
import ctypes
import functools
import os
import platform
import shlex
import statistics
import sys
import time


import torch

import lasp
from lasp.launch.bench_report import markdown, render, write_outputs
from lasp.launch.config import model_changes, parse_model_args
from lasp.parallel import comm, count_collectives, init_mesh, local_positions

# engine facts come from each engine's declaration (lasp.ENGINES, parallel/engines.py): names, functions, layouts
LINEAR = {name: spec.fn for name, spec in lasp.ENGINES.items() if spec.kind == "linear"}     # + ring_linear baseline
SOFTMAX = {name: spec.fn for name, spec in lasp.ENGINES.items() if spec.kind == "softmax"}
SOFTMAX.update({f"{name}_dense": fn for name, fn in SOFTMAX.items()})   # layer mode: on the dense torch twin
LINEAR.update({f"{name}_delta": LINEAR[name] for name in ("lasp2", "lasp1", "allscan")})   # beta=: the delta rule
CONTIGUOUS_ONLY = tuple(name for name, spec in lasp.ENGINES.items() if spec.layouts == ("contiguous",))
CONTIGUOUS_ONLY += ("lasp1_delta",)
DEFAULT_ENGINES = {"layer": "lasp2,lasp1,ring_linear,allgather,ulysses",
                   "model": "lasp2+allgather,lasp1+allgather,ring_linear+ring,lasp2+ulysses",
                   "long": "lasp2+allgather", "network": "lasp2,lasp1,allscan,ring_linear"}
MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------- machine, memory
def machine_info(device):
    """Where the numbers came from: nproc, CPU model, memory, torch version, load, GPU."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    info = dict(nproc=len(os.sched_getaffinity(0)), cpu=cpu, mem_gib=round(mem / 2 ** 30, 1),
                torch=torch.__version__, python=platform.python_version(), load_avg=os.getloadavg(),
                omp_num_threads=torch.get_num_threads(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
GLIBC_MMAP_MAX = 65536                     # glibc's default number of mmap'd blocks


def malloc_for_speed():
    """Every block from the heap, which is never trimmed: a freed tensor's pages are reused. glibc's own rule serves
    blocks above its (at most 32 MiB) threshold by a fresh mmap whose every page faults on first touch; at 262K
    tokens per rank every activation is that large, and a 1M-token step then cost 1.9× its CPU time (issue 13,
    docs/benchmarks.md)."""
    if _LIBC is not None:
        assert _LIBC.mallopt(M_MMAP_MAX, 0) == 1 and _LIBC.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def malloc_for_measurement():
    """≥ 1 MiB by mmap and the heap trimmed: a freed tensor leaves the resident set, so RSS ≈ live bytes."""
    if _LIBC is not None:
        assert _LIBC.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX) == 1
        assert _LIBC.mallopt(M_MMAP_THRESHOLD, MiB) == 1 and _LIBC.mallopt(M_TRIM_THRESHOLD, MiB) == 1
        _LIBC.malloc_trim(0)


def _proc_status_kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))


class PeakMemory:
    """Peak bytes since `reset()`: CUDA allocator stats on GPU, the RSS high-water mark (VmHWM) on CPU."""

    def __init__(self, device):
        self.device = device
        self.resettable = device.type == "cuda" or os.access("/proc/self/clear_refs", os.W_OK)

    def current(self):
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_kib("VmRSS") * 1024

    def reset(self):
        """Start a measurement (on CPU: glibc switched to `malloc_for_measurement`, the high-water mark reset)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            malloc_for_measurement()
            if self.resettable:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")                              # VmHWM := VmRSS
        self.base = self.current()

    def peak(self):
        """-> (peak bytes above the memory at reset, absolute peak bytes of the process)."""
        if self.device.type == "cuda":
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            top = _proc_status_kib("VmHWM") * 1024
        return top - self.base, top


# ---------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device, group):
    """Seconds this rank spends in step(), all ranks starting together."""
    comm.barrier(group)
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - start


def across_ranks(values, group, device):
    """Element-wise max over the ranks of a list of numbers (gathered on `device`: NCCL needs CUDA tensors)."""
    return comm.all_gather(torch.tensor([values], dtype=torch.float64, device=device), group).amax(0).tolist()


def profile_step(step, device, group):
    """One untimed call: collectives (calls, bytes received; the most loaded rank) and peak memory (max rank)."""
    meter = PeakMemory(device)
    meter.reset()
    with count_collectives() as log:
        step()
    _sync(device)
    peak, peak_abs = meter.peak()
    calls, nbytes = log.count(), log.bytes()
    ops = sorted(log.summary().items())
    calls, nbytes, peak, peak_abs = across_ranks([calls, nbytes, peak, peak_abs], group, device)
    return dict(calls=int(calls), bytes_per_rank=int(nbytes), ops={op: list(v) for op, v in ops},
                peak_bytes=int(peak), peak_abs_bytes=int(peak_abs), peak_scope="step" if meter.resettable
                else "process lifetime (clear_refs not writable)")


def run_interleaved(cases, reps, warmup, device, group):
    """{name: step} -> {name: per-repetition seconds of the slowest rank}, engines interleaved in every rep."""
    local = {name: [] for name in cases}
    for rep in range(warmup + reps):
        for name, step in cases.items():
            seconds = time_step(step, device, group)
            if rep >= warmup:
                local[name].append(seconds)
    return {name: across_ranks(times, group, device) for name, times in local.items()}


# ---------------------------------------------------------------------------------------------- layer mode
def layer_step(engine, seq_len, args, group, device, dtype):
    """Inputs for one layer on this rank and a closure running forward + backward; None if the engine cannot run."""
    W, r = comm.group_size(group), comm.group_rank(group)
    spec = lasp.ENGINES[engine.removesuffix("_dense").removesuffix("_delta")]
    if spec.splits_heads and args.heads % W:
        return None                                          # an all-to-all over heads needs W | H
    layout = "contiguous" if engine in CONTIGUOUS_ONLY else args.layout
    pos = local_positions(seq_len, layout, r, W, device)
    g = torch.Generator(device=device).manual_seed(1234)
    kv_heads = args.heads if engine in LINEAR else args.kv_heads

    def rand(heads):
        full = torch.randn(args.batch, seq_len, heads, args.head_dim, generator=g, device=device) * 0.5
        return full[:, pos].to(dtype).requires_grad_()
    q, k, v, do = rand(args.heads), rand(kv_heads), rand(kv_heads), rand(args.heads).detach()
    if engine.endswith("_delta"):              # gated delta rule: unit keys, β in (0, 1), gates in (−0.7, 0)
        k = torch.nn.functional.normalize(k.detach(), dim=-1).requires_grad_()
        beta, gate = (torch.rand(*q.shape[:3], generator=g, device=device).to(dtype) for _ in range(2))
        kw = dict(beta=beta, log_gate=-0.7 * gate) | ({} if engine in CONTIGUOUS_ONLY else dict(layout=layout))
        fn = functools.partial(LINEAR[engine], group=group, **kw)
    elif engine in LINEAR:
        decay = -torch.logspace(-4, -1, args.heads, device=device)  # mild to strong per-head decays
        kw = dict(log_decay=decay) if engine in CONTIGUOUS_ONLY else dict(log_decay=decay, layout=layout)
        fn = functools.partial(LINEAR[engine], group=group, **kw)
    else:
        fn = functools.partial(SOFTMAX[engine], layout=layout, group=group,
                               **({"backend": "torch"} if engine.endswith("_dense") else {}))

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    return step


def measure_then_time(make_cases, seq_lens, args, device, group):
    """{T: {name: (profile, per-repetition seconds)}}. Phase 1 (glibc in measurement mode): for every length, one
    warm-up call per case, then its collectives and peak memory. Phase 2 (glibc defaults): the timed, interleaved
    repetitions. Measuring first keeps the heap compact: after timed runs its freed middle would be re-touched
    and counted as resident (RSS would overstate live tensors by up to 2x)."""
    profiles = {}
    for seq_len in seq_lens:
        cases = make_cases(seq_len)
        for step in cases.values():
            step()
        profiles[seq_len] = {name: profile_step(step, device, group) for name, step in cases.items()}
        del cases
    malloc_for_speed()
    out = {}
    for seq_len in seq_lens:
        times = run_interleaved(make_cases(seq_len), args.reps, args.warmup, device, group)
        out[seq_len] = {name: (profiles[seq_len][name], times[name]) for name in times}
    return out


def bench_layers(args, group, device, dtype):
    def make_cases(seq_len):
        cases = {e: layer_step(e, seq_len, args, group, device, dtype) for e in args.engines}
        return {e: s for e, s in cases.items() if s is not None}
    records = []
    for seq_len, results in measure_then_time(make_cases, args.seq_lens, args, device, group).items():
        for engine, (profile, times) in results.items():
            shape = dict(batch=args.batch, heads=args.heads, kv_heads=args.heads if engine in LINEAR else
                         args.kv_heads, head_dim=args.head_dim, dtype=str(dtype).replace("torch.", ""))
            records.append(_record("layer", engine, seq_len, group, times, shape, profile))
    return records


# ---------------------------------------------------------------------------------------------- network mode
def timed_comm(step, device, group):
    """-> (seconds, seconds blocked in communication, the model's all-gather seconds) of one step on this rank."""
    with count_collectives() as log:
        seconds = time_step(step, device, group)
    gathers = [r for r in log.records if r.op == "all_gather"]
    return seconds, sum(r.wait_s for r in log.records), sum(r.model_s for r in gathers), sum(
        r.wait_s for r in gathers)


def bench_network(args, group, device, dtype):
    """Linear engines x network models, every case interleaved in each repetition; one record per case."""
    records = []
    for seq_len in args.seq_lens:
        cases = {}
        for spec in args.networks:
            for engine in args.engines:
                step = layer_step(engine, seq_len, args, group, device, dtype)

                def run(step=step, spec=spec):
                    with comm.simulated_network(None if spec == "off" else spec):
                        step()
                cases[engine, spec] = run
        profiles = {key: profile_step(step, device, group) for key, step in cases.items()}   # also the warm-up
        local = {key: [] for key in cases}
        for rep in range(args.warmup + args.reps):
            for key, step in cases.items():
                measured = timed_comm(step, device, group)
                if rep >= args.warmup:
                    local[key].append(measured)
        for (engine, spec), reps in local.items():
            times, wait, model, gather_wait = (across_ranks(list(col), group, device) for col in zip(*reps))
            shape = dict(batch=args.batch, heads=args.heads, kv_heads=args.heads, head_dim=args.head_dim,
                         dtype=str(dtype).replace("torch.", ""), network=spec)
            net = comm.parse_network("" if spec == "off" else spec) or comm.NetworkModel()
            extra = dict(wait_s=statistics.median(wait), model_comm_s=statistics.median(model),
                         gather_wait_s=statistics.median(gather_wait), latency_s=net.latency_s,
                         gbps=None if net.bytes_per_s == float("inf") else net.bytes_per_s * 8 / 1e9)
            declared = lasp.ENGINES[engine.removesuffix("_delta")]
            if declared.overlaps_exchange and not engine.endswith("_delta") and extra["model_comm_s"] > 0:
                extra["hidden"] = max(0.0, 1 - extra["gather_wait_s"] / extra["model_comm_s"])
            profile = {k: v for k, v in profiles[engine, spec].items() if not k.startswith("peak")}
            records.append(_record("network", engine, seq_len, group, times, shape, dict(profile, **extra)))
    return records


# ---------------------------------------------------------------------------------------------- model modes
# Both time the training core's step (launch.trainer.train_step): forward and loss, backward with the engine's
# gradient averaging (launch.engine.DDPEngine), clipping, AdamW and the schedule, on synthetic tokens.
def pair_layout(pair, layout):
    """`layout` if both engines of "linear+softmax" run it (their declarations say), else "contiguous"."""
    return layout if all(layout in lasp.ENGINES[e].layouts for e in pair.split("+") if e in lasp.ENGINES) \
        else "contiguous"


def core_config(pair, layout, sp, checkpoint, dtype=torch.float32):
    """The launch.config.TrainConfig of a bench run: the engine pair (a baseline engine is bound afterwards by
    set_engines: training does not offer it), checkpointing per block, AdamW at a constant 1e-3, bf16 autocast
    for dtype bfloat16 (as training runs it)."""
    from lasp.launch.config import TrainConfig
    linear, softmax = pair.split("+")
    cfg = TrainConfig()
    cfg.parallel.linear = "lasp2" if lasp.ENGINES[linear].baseline else linear
    cfg.parallel.softmax, cfg.parallel.layout, cfg.parallel.sp = softmax, layout, sp
    cfg.parallel.activation_checkpointing = checkpoint
    cfg.optim.lr = cfg.optim.min_lr = 1e-3
    cfg.optim.warmup_steps = 0
    cfg.run.dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    return cfg


def set_engines(model, pair, layout, group):
    """Point the model's mixers at the engine pair "linear+softmax" (linear may be the ring_linear baseline)."""
    linear, softmax = pair.split("+")
    lasp.apply_sequence_parallel(model, linear=linear, softmax=softmax, layout=layout, group=group, baselines=True)


def seeded_model(args, device, checkpointed=False):
    """The preset's plain model, the same weights on every rank (seed 0); checkpointed: each block recomputed in
    backward (bench_run leaves that to the core's parallelize instead)."""
    from lasp import models
    from lasp.parallel.checkpointing import apply_activation_checkpointing
    torch.manual_seed(0)
    model = models.build_model(args.model.arch, device=device)      # launch.config.parse_model_args typed it
    return apply_activation_checkpointing(model) if checkpointed else model


def bench_run(args, pair, mesh, device, dtype=torch.float32):
    """The training core's run (launch.trainer.build: parallelism, DDP engine, AdamW) of the seeded preset model
    under the engine pair "linear+softmax" over the mesh's sp group."""
    from lasp.launch import trainer
    layout = pair_layout(pair, args.layout)
    cfg = core_config(pair, layout, mesh.sp, args.checkpoint, dtype)
    run = trainer.build(cfg, seeded_model(args, device), mesh, device)
    set_engines(run.model, pair, layout, mesh.group("sp"))
    return run


def sequence_batch(seq_len, layout, args, group, device):
    """This rank's batch for the core's step: one random byte sequence per row, next-token labels, global
    positions; no documents (segment_ids None) and every label counted (loss_mask None)."""
    W, r = comm.group_size(group), comm.group_rank(group)
    g = torch.Generator().manual_seed(4321)
    full = torch.randint(0, 256, (args.batch, seq_len + 1), generator=g)
    pos = local_positions(seq_len, layout, r, W)
    return dict(tokens=full[:, pos].to(device), positions=pos.to(device), segment_ids=None,
                labels=full[:, pos + 1].to(device), loss_mask=None)


def core_step(run, batch, barrier=False):
    """One step of the training core -> seconds per phase (forward, backward, optimizer), this rank's."""
    from lasp.launch.trainer import train_step
    if barrier:
        comm.barrier(run.mesh.group("sp"))
    return train_step(run, batch)["seconds"]


def bench_models(args, mesh, device, dtype):
    """Training steps of the whole model per engine pair, interleaved: one core run, its mixers re-pointed at
    each pair before its step."""
    group = mesh.group("sp")
    run = bench_run(args, args.engines[0], mesh, device, dtype)

    def make_cases(seq_len):
        cases = {}
        for pair in args.engines:
            layout = pair_layout(pair, args.layout)
            batch = sequence_batch(seq_len, layout, args, group, device)

            def step(pair=pair, layout=layout, batch=batch):
                set_engines(run.model, pair, layout, group)
                core_step(run, batch)
            cases[pair] = step
        return cases
    shape = dict(batch=args.batch, preset=args.preset, overrides=model_changes(args.model),
                 checkpoint=args.checkpoint, dtype=str(dtype).replace("torch.", ""))
    return [_record("model", pair, seq_len, group, times, shape, dict(profile, step="launch.trainer.train_step"))
            for seq_len, results in measure_then_time(make_cases, args.seq_lens, args, device, group).items()
            for pair, (profile, times) in results.items()]


def bench_long(args, mesh, device, emit):
    """One full training step per length (ascending), checkpointed per layer; memory measured per step.

    A warm-up step on 512 tokens per rank comes first: it loads the code pages and allocates the (tiny) optimizer
    state, and `runtime_bytes` = the rank's memory after it (interpreter, torch, gloo, weights: what does not grow
    with the sequence). emit(records) is called after every length so a long sweep leaves results as it goes."""
    group, pair = mesh.group("sp"), args.engines[0]
    run = bench_run(args, pair, mesh, device)
    layout = run.cfg.parallel.layout
    warm_len = 512 * comm.group_size(group)
    core_step(run, sequence_batch(warm_len, layout, args, group, device))
    malloc_for_measurement()                                  # trims the heap
    runtime = int(across_ranks([PeakMemory(device).current()], group, device)[0])
    shape = dict(batch=args.batch, preset=args.preset, overrides=model_changes(args.model),
                 checkpoint=args.checkpoint, params=run.n_params, dtype="float32")
    records = []
    for seq_len in sorted(args.seq_lens):                    # phase 1: memory (see measure_then_time)
        batch = sequence_batch(seq_len, layout, args, group, device)
        seconds, profile = measure_step(run, batch)
        records.append(_record("long", pair, seq_len, group, [seconds], shape, dict(profile, runtime_bytes=runtime)))
        del batch
        emit(records)
    malloc_for_speed()
    for rec in records if args.reps else []:                  # phase 2: timed steps, every block from the heap
        batch = sequence_batch(rec["seq_len"], layout, args, group, device)
        timed = [core_step(run, batch, barrier=True) for _ in range(args.reps)]
        steps = across_ranks([sum(p.values()) for p in timed], group, device)
        phases = across_ranks([statistics.median(p[k] for p in timed) for k in timed[0]], group, device)
        rec.update(_record("long", pair, rec["seq_len"], group, steps, shape, {}),
                   phases_s=dict(zip(timed[0], phases)), timed=f"{args.reps} step(s) after the measured one")
        emit(records)
    return records


def measure_step(run, batch):
    """One core step under the memory meter -> (seconds of the slowest rank, profile); its time includes the page
    faults of the measurement mode."""
    group, device = run.mesh.group("sp"), run.device
    meter = PeakMemory(device)
    meter.reset()
    with count_collectives() as log:
        phases = core_step(run, batch, barrier=True)
    peak, peak_abs = meter.peak()
    calls, nbytes, peak, peak_abs, *phases_max = across_ranks(
        [log.count(), log.bytes(), peak, peak_abs, *phases.values()], group, device)
    return sum(phases_max), dict(calls=int(calls), bytes_per_rank=int(nbytes), peak_bytes=int(peak),
                                 peak_abs_bytes=int(peak_abs), phases_s=dict(zip(phases, phases_max)),
                                 timed="measured step (page faults)", step="launch.trainer.train_step",
                                 peak_scope="step" if meter.resettable else "process lifetime")


def _record(mode, engine, seq_len, group, times, shape, profile):
    W = comm.group_size(group)
    median = statistics.median(times)
    batch = shape.get("batch", 1)
    return dict(mode=mode, engine=engine, world=W, seq_len=seq_len, tokens_per_rank=seq_len // W, shape=shape,
                median_s=median, times_s=times, tokens_per_s=batch * seq_len / median, **profile)


# ---------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("layer", "model", "long", "network"), default="layer")
    p.add_argument("--seq-lens", "--seq-len", default="4096,8192,16384", help="comma-separated global lengths")
    p.add_argument("--engines", help="layer: names; model/long: linear+softmax pairs (default per mode)")
    p.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"),
                   help="for engines that take one (lasp1 and ring_linear always run contiguous)")
    p.add_argument("--networks", default="off;latency_us=50;latency_us=1000;latency_us=20000",
                   help="network mode: ';'-separated LASP_SIM_NETWORK specs (e.g. 'latency_us=50,gbps=25'), 'off'")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, help="softmax layer engines (default: --heads)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="layer/model (default float32 CPU, bf16 GPU)")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, help="per-layer activation "
                   "checkpointing (default: on in long mode, off otherwise)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 5; long: 1 timed step after the step "
                   "that measures memory, whose page faults would distort its time)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first (default 1; long: 0)")
    p.add_argument("--out", help="output prefix (default docs/bench/<mode>); .json, .md and .png are written")
    p.add_argument("--render-only", action="store_true", help="rewrite <out>.md and <out>.png from <out>.json "
                   "(no torchrun, nothing measured)")
    args = parse_model_args(p, argv, default="linear-llama3-tiny")       # --preset and its --model.<field> flags
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")]
    args.engines = (args.engines or DEFAULT_ENGINES[args.mode]).split(",")
    args.kv_heads = args.kv_heads or args.heads
    args.networks = [spec.strip() for spec in args.networks.split(";")]
    long = args.mode == "long"
    args.checkpoint = long if args.checkpoint is None else args.checkpoint
    args.reps = (1 if long else 5) if args.reps is None else args.reps
    args.warmup = (0 if long else 1) if args.warmup is None else args.warmup
    args.out = args.out or os.path.join("docs", "bench", args.mode)
    _validate(p, args)
    return args


def _validate(parser, args):
    names = set(LINEAR) | set(SOFTMAX)
    for spec in args.networks:
        try:
            comm.parse_network("" if spec == "off" else spec)
        except ValueError as e:
            parser.error(f"--networks: {e}")
    if args.mode == "network" and not set(args.engines) <= set(LINEAR):
        parser.error(f"--engines: network mode runs linear engines only, one of {sorted(LINEAR)}")
    for engine in args.engines:
        parts = engine.split("+")
        single = args.mode in ("layer", "network")
        ok = (parts[0] in names) if single else (len(parts) == 2 and parts[0] in LINEAR and parts[1] in SOFTMAX)
        if not ok:
            parser.error(f"--engines: {engine!r} is not " + (f"one of {sorted(names)}" if single
                         else f"a pair linear+softmax of {sorted(LINEAR)} + {sorted(SOFTMAX)}"))
    if args.mode == "long" and len(args.engines) != 1:
        parser.error("--engines: long mode runs one engine pair")


def main(argv=None):
    args = parse_args(argv)
    if args.render_only:
        return render(args.out)
    mesh = init_mesh(sp=int(os.environ.get("WORLD_SIZE", 1)))
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    malloc_for_measurement()                                  # each mode switches to malloc_for_speed to time
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    group = mesh.group("sp")
    machine = machine_info(device)
    machine["device"] = machine.get("gpu", "cpu")
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} torchrun --nproc-per-node "
               f"{mesh.world_size} launch/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv))

    def emit(records):
        """Stamp the records with the command and the load, write the outputs (rank 0), print the table."""
        for rec in records:
            rec.setdefault("command", command)
            rec.setdefault("load_avg_start", machine["load_avg"])
            rec.setdefault("load_avg_end", os.getloadavg())
        if mesh.rank == 0:
            write_outputs(records, machine, args.out)
            print(markdown({"records": records}), flush=True)
    if args.mode == "long":
        bench_long(args, mesh, device, emit)
    elif args.mode == "network":
        emit(bench_network(args, group, device, dtype))
    else:
        emit(bench_layers(args, group, device, dtype) if args.mode == "layer" else
             bench_models(args, mesh, device, dtype))
    comm.barrier(group)


if __name__ == "__main__":
    main()
