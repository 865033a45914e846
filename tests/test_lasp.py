"""LASP-2 and LASP-1 against the float64 dense oracle on 1, 2, 3, 4 and 8 gloo ranks, forward and backward."""
import pytest
import torch
import torch.distributed as dist

from tests.dist import rel_err, run_ranks
from tests.oracles import gated_linear_attention, linear_attention_dense

# a head with λ = 1, a mild decay, and one whose λ^C underflows to 0
DECAY = torch.tensor([0.0, -0.05, -60.0])
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _gates(T, g):
    """log_gate (2, T, 3) per K/V head: weak (−1e−4 at most), logsigmoid-like, and strong (down to −20)."""
    u = torch.rand(2, T, 3, generator=g, dtype=torch.float64)
    return torch.stack([-1e-4 * u[..., 0], torch.nn.functional.logsigmoid(4 * u[..., 1] - 1), -20 * u[..., 2]], -1)


def _case(engine, W, layout, causal, log_decay, dtype, T=None, seed=0, q_heads=3, gated=False, overlap=True):
    """Run one engine call on this rank's shard; return (errors vs oracle shard, comm summary per pass).

    q_heads = 6 makes 2 query heads share each of the 3 K/V heads (grouped, head i reads K/V head i // 2).
    gated: a data-dependent log_gate (B, T, 3) too, against the gated oracle, with its gradient (last error).
    overlap=False: LASP-2's fused path (the kernel runs from the gathered prefix)."""
    from lasp import lasp1, lasp2
    from lasp.parallel import count_collectives, shard
    r = dist.get_rank()
    T = T or 16 * W
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, T, h, d, generator=g, dtype=torch.float64) for h, d in ((q_heads, 4), (3, 4), (3, 5)))
    do = torch.randn(2, T, q_heads, 5, generator=g, dtype=torch.float64)
    inputs = (q, k, v, _gates(T, g)) if gated else (q, k, v)
    full = [x.clone().requires_grad_() for x in inputs]
    G = q_heads // 3
    per_query_head = [x.repeat_interleave(G, dim=2) for x in full[1:]]
    ld = None if log_decay is None else log_decay.repeat_interleave(G)
    if gated:
        ref = gated_linear_attention(full[0], *per_query_head, log_decay=ld)[0]
    else:
        ref = linear_attention_dense(full[0], *per_query_head, ld, causal)
    ref_grads = torch.autograd.grad(ref, full, do)
    local = [shard(x, layout, r, W).to(dtype).requires_grad_() for x in inputs]
    kwargs = dict(log_decay=None if log_decay is None else log_decay.to(dtype), causal=causal)
    if gated:
        kwargs["log_gate"] = local.pop()
        local.append(kwargs["log_gate"])
    with count_collectives() as fwd_log:
        if engine == "lasp2":
            o = lasp2(*local[:3], layout=layout, overlap=overlap, **kwargs)
        else:
            o = lasp1(*local[:3], **kwargs)
    with count_collectives() as bwd_log:
        grads = torch.autograd.grad(o, local, shard(do, layout, r, W).to(dtype))
    errors = [rel_err(o, shard(ref, layout, r, W))]
    errors += [rel_err(a, shard(b, layout, r, W)) for a, b in zip(grads, ref_grads)]
    return errors, fwd_log.summary(), bwd_log.summary()


def _configs(engine):
    layouts = ["contiguous", "zigzag"] if engine == "lasp2" else ["contiguous"]
    for layout in layouts:
        for dtype in (torch.float64, torch.float32):
            for causal, decay in ((True, None), (True, DECAY), (False, None)):
                yield layout, causal, decay, dtype, 3, False
        yield layout, True, DECAY, torch.float64, 6, False               # grouped K/V heads
        yield layout, False, None, torch.float64, 6, False
        for dtype in (torch.float64, torch.float32):                      # data-dependent gates (+ decay)
            yield layout, True, None, dtype, 3, True
        yield layout, True, DECAY, torch.float64, 6, True


def _all_cases(engine, W):
    out = []
    for layout, causal, decay, dtype, q_heads, gated in _configs(engine):
        for overlap in (True, False) if engine == "lasp2" and causal and dtype == torch.float64 else (True,):
            errors, fwd, bwd = _case(engine, W, layout, causal, decay, dtype, q_heads=q_heads, gated=gated,
                                     overlap=overlap)
            out.append(((layout, causal, decay is not None, str(dtype), q_heads, gated, overlap), errors, fwd, bwd))
    return out


@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("engine", ["lasp2", "lasp1"])
def test_engine_matches_float64_oracle(engine, W):
    for rank, results in enumerate(run_ranks(W, _all_cases, engine, W)):
        for config, errors, fwd, bwd in results:
            tol = TOL[torch.float64 if "float64" in config[3] else torch.float32]
            assert max(errors) < tol, f"{engine} W={W} rank {rank} {config}: errors o,dq,dk,dv(,dg) = {errors}"
            if engine == "lasp2":  # exactly one all-gather each way, nothing else
                assert fwd == {"all_gather": fwd["all_gather"]} and fwd["all_gather"][0] == 1, (config, fwd)
                assert bwd == {"all_gather": bwd["all_gather"]} and bwd["all_gather"][0] == 1, (config, bwd)


def _payload_bytes(W):
    sizes = []
    for T, q_heads, gated in ((8 * W, 3, False), (32 * W, 3, False), (8 * W, 6, False), (8 * W, 3, True),
                              (32 * W, 6, True)):       # 6 query heads on 3 K/V heads: the same states
        _, fwd, bwd = _case("lasp2", W, "zigzag", True, DECAY, torch.float32, T=T, q_heads=q_heads, gated=gated)
        sizes.append((fwd["all_gather"][1], bwd["all_gather"][1]))
    return sizes


def test_lasp2_payload_independent_of_length():
    """Per layer and pass: (W−1)·n·B·H_kv·d_k·d_v·4 bytes, + n·B·H_kv·4 for the gate totals, + the 8-byte header."""
    W, n, B, H_kv, d_k, d_v = 4, 2, 2, 3, 4, 5
    for sizes in run_ranks(W, _payload_bytes, W):
        (f1, b1), (f2, b2), grouped, (gf1, gb1), (gf2, gb2) = sizes
        assert grouped == (f1, b1), sizes                 # messages count the distinct K/V heads only
        assert b1 == b2 == (W - 1) * n * B * H_kv * d_k * d_v * 4, sizes
        assert f1 == f2 == b1 + (W - 1) * 2 * 4, sizes   # + the (T_local, n) header
        assert gb1 == gb2 == (W - 1) * n * B * H_kv * (d_k * d_v + 1) * 4, sizes
        assert gf1 == gf2 == gb1 + (W - 1) * 2 * 4, sizes


def _long_segments(W, layout):
    """Segments of 2,100 and 4,200 tokens: several blocks of 16 chunks of 64 and spans of 64 chunks, a block of one
    chunk and a partial chunk, where the kernel's scans carry states across blocks. Reference: the single-device
    torch kernel (checked against the float64 oracle in tests/test_kernels.py) on the whole sequence; the dense
    oracle would need (T, T) matrices on every rank."""
    from lasp.kernels import lightning_attn
    from lasp import lasp2
    from lasp.parallel import shard
    r, T, out = dist.get_rank(), 8400, []
    g = torch.Generator().manual_seed(3)
    shapes = ((6, 4), (3, 4), (3, 5), (6, 5))          # 6 query heads on 3 K/V heads, d_k = 4, d_v = 5
    q, k, v, do = (torch.randn(1, T, h, d, generator=g, dtype=torch.float64) for h, d in shapes)
    for gated in (False, True):
        inputs = [q, k, v] + ([-torch.rand(1, T, 3, generator=g, dtype=torch.float64)] if gated else [])
        full = [x.clone().requires_grad_() for x in inputs]
        per_query_head = [x.repeat_interleave(2, dim=2) for x in full[1:]]
        ref = lightning_attn(*full[:1], *per_query_head[:2], log_decay=DECAY.repeat_interleave(2),
                             log_gate=per_query_head[2] if gated else None, backend="torch")[0]
        ref_grads = torch.autograd.grad(ref, full, do)
        for overlap in (True, False):
            local = [shard(x, layout, r, W).requires_grad_() for x in inputs]
            o = lasp2(*local[:3], log_decay=DECAY, log_gate=local[3] if gated else None, layout=layout,
                      overlap=overlap)
            grads = torch.autograd.grad(o, local, shard(do, layout, r, W))
            errors = [rel_err(a, shard(b, layout, r, W)) for a, b in zip((o, *grads), (ref, *ref_grads))]
            out.append(((gated, overlap), errors))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_lasp2_segments_spanning_blocks(layout):
    for rank, results in enumerate(run_ranks(2, _long_segments, 2, layout)):
        for config, errors in results:
            assert max(errors) < 1e-10, f"rank {rank} {layout} (gated, overlap) = {config}: {errors}"


def _lasp1_ring_counts(W):
    runs = [_case("lasp1", W, "contiguous", causal, None, torch.float64)[1:] for causal in (True, False)]
    return runs + [_case("lasp1", W, "contiguous", True, None, torch.float32, gated=True)[1:]]


def test_lasp1_ring_hops():
    """Causal (gated too): one hop in and one out per pass, none past the ends, each one state (the gate totals stay
    local). Non-causal: a ring each way per pass."""
    W = 4
    for r, ((fwd, bwd), (nc_fwd, nc_bwd), (g_fwd, g_bwd)) in enumerate(run_ranks(W, _lasp1_ring_counts, W)):
        first, last = r == 0, r == W - 1
        for fwd, bwd in ((fwd, bwd), (g_fwd, g_bwd)):
            assert fwd.get("recv", (0,))[0] == (not first) and fwd.get("send", (0,))[0] == (not last), (r, fwd)
            assert bwd.get("recv", (0,))[0] == (not last) and bwd.get("send", (0,))[0] == (not first), (r, bwd)
        assert g_fwd.get("recv", (0, 0))[1] == (not first) * 2 * 3 * 4 * 5 * 4, (r, g_fwd)   # B·H_kv·d_k·d_v·4
        for log in (nc_fwd, nc_bwd):
            assert log.get("recv", (0,))[0] == 2 - first - last == log.get("send", (0,))[0], (r, log)


def _causality(W, layout, engine):
    """Perturb one token; every output before it must be bitwise unchanged, outputs at and after it must move."""
    from lasp import lasp1, lasp2
    from lasp.parallel import local_positions, shard
    r = dist.get_rank()
    T, p = 16 * W, 16 * W - 5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    outs = []
    for bump in (0.0, 1.0):
        k2, v2 = k.clone(), v.clone()
        k2[:, p] += bump
        v2[:, p] += bump
        args = [shard(x, layout, r, W) for x in (q, k2, v2)]
        log_decay = torch.tensor([0.0, -0.1], dtype=torch.float64)
        outs.append(lasp2(*args, log_decay=log_decay, layout=layout) if engine == "lasp2"
                    else lasp1(*args, log_decay=log_decay))
    pos = local_positions(T, layout, r, W)
    before, after = pos < p, pos >= p
    return torch.equal(outs[0][:, before], outs[1][:, before]), bool((outs[0][:, after] != outs[1][:, after]).any()) \
        if after.any() else True


@pytest.mark.parametrize("W,layout,engine", [(1, "contiguous", "lasp2"), (3, "contiguous", "lasp2"),
                                             (4, "zigzag", "lasp2"), (3, "contiguous", "lasp1")])
def test_causality_probe(W, layout, engine):
    for r, (unchanged_before, changed_after) in enumerate(run_ranks(W, _causality, W, layout, engine)):
        assert unchanged_before, f"rank {r}: an output before the perturbed token changed (future leak)"
        assert changed_after, f"rank {r}: outputs after the perturbed token did not change"


def test_bad_input_single_process():
    from lasp import lasp1, lasp2
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match="zigzag.*3.*|local length"):
        lasp2(q[:, :3], q[:, :3], q[:, :3], layout="zigzag")
    with pytest.raises(ValueError, match=r"\(1, 6, 2, 4\).*\(1, 5, 2, 4\)"):
        lasp2(q, q[:, :5], q)
    with pytest.raises(ValueError, match="dtypes"):
        lasp2(q, q.double(), q)
    with pytest.raises(ValueError, match="<= 0"):
        lasp2(q, q, q, log_decay=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        lasp2(q, q, q, log_decay=torch.tensor([-0.1, -0.1, -0.1]))
    with pytest.raises(ValueError, match="causal"):
        lasp2(q, q, q, log_decay=torch.tensor([-0.1, -0.1]), causal=False)
    with pytest.raises(ValueError, match="layout"):
        lasp2(q, q, q, layout="ring")
    with pytest.raises(ValueError, match="causal"):
        lasp1(q, q, q, log_decay=torch.tensor([-0.1, -0.1]), causal=False)


@pytest.mark.parametrize("engine", ["lasp2", "lasp1"])
def test_bad_log_gate_raises_before_any_collective(engine):
    from lasp import lasp1, lasp2
    from lasp.parallel import count_collectives
    fn = lasp2 if engine == "lasp2" else lasp1
    q, kv = torch.randn(1, 6, 4, 3), torch.randn(1, 6, 2, 3)            # 4 query heads on 2 K/V heads
    gate = -torch.rand(1, 6, 2)
    bad = [(gate[:, :5], r"\(1, 6, 2\).*\(1, 5, 2\)"), (gate.repeat(1, 1, 2), r"\(1, 6, 2\).*\(1, 6, 4\)"),
           (gate.double(), "dtype.*float64"), (gate.half(), "dtype.*float16"), (gate.to("meta"), "meta"),
           (gate.abs() + 0.1, "<= 0"), (torch.where(gate < -0.5, float("nan"), gate), "finite"),
           (torch.full_like(gate, float("-inf")), "finite")]
    with count_collectives() as log:
        for log_gate, message in bad:
            with pytest.raises(ValueError, match=message):
                fn(q, kv, kv, log_gate=log_gate)
        with pytest.raises(ValueError, match=r"causal.*|\(1, 6, 2\).*causal"):
            fn(q, kv, kv, log_gate=gate, causal=False)
    assert log.summary() == {}, log.summary()
    assert fn(q, kv, kv, log_gate=gate, log_decay=torch.tensor([-0.1, 0.0])).shape == (1, 6, 4, 3)


def _unequal_lengths():
    from lasp import lasp2
    T = 8 if dist.get_rank() == 0 else 6
    x = torch.randn(1, T, 2, 4)
    try:
        lasp2(x, x, x)
    except ValueError as e:
        return str(e)
    return None


def test_ranks_with_different_lengths_raise_everywhere():
    for message in run_ranks(2, _unequal_lengths):
        assert message is not None and "[8, 6]" in message, message


def test_engines_are_declared_once_in_their_modules():
    """lasp.apply's tables are read from each engine module's ENGINE; names, order and layouts are frozen here,
    and a declared layout set agrees with the function's signature (only multi-layout engines take `layout`)."""
    import inspect

    from lasp import allscan, apply, lasp1, lasp2, ring_linear_attention
    from lasp.parallel import EngineSpec, allgather_attention, ring_attention, ulysses_attention
    assert apply.LINEAR_ENGINES == ("lasp2", "lasp1", "allscan")
    assert apply.SOFTMAX_ENGINES == ("allgather", "ring", "ulysses", "local")
    assert apply.BASELINE_ENGINES == ("ring_linear",)
    functions = dict(lasp2=lasp2, lasp1=lasp1, allscan=allscan, ring_linear=ring_linear_attention,
                     allgather=allgather_attention, ring=ring_attention, ulysses=ulysses_attention)
    assert {name: spec.fn for name, spec in apply.ENGINES.items()} == functions
    for name, spec in apply.ENGINES.items():
        assert isinstance(spec, EngineSpec) and spec.name == name and spec.exchange, name
        assert inspect.getmodule(spec.fn).ENGINE is spec, name                  # declared next to its function
        takes_layout = "layout" in inspect.signature(spec.fn).parameters
        assert takes_layout == (spec.layouts == ("contiguous", "zigzag")), name
        assert spec.kind == ("linear" if name in ("lasp2", "lasp1", "allscan", "ring_linear") else "softmax")


def test_ring_linear_baseline_is_bound_only_when_asked():
    """apply_sequence_parallel refuses the ring_linear baseline unless baselines=True, then binds it from its
    declaration (contiguous only, so no layout argument)."""
    from lasp import models
    from lasp import apply_sequence_parallel, ring_linear_attention
    model = models.build_model(models.get_config("linear-llama3-tiny"), device="meta")
    with pytest.raises(ValueError, match="lasp2', 'lasp1', 'allscan'.*ring_linear"):
        apply_sequence_parallel(model, linear="ring_linear")
    with pytest.raises(ValueError, match="'ring_linear' runs only the 'contiguous' layout"):
        apply_sequence_parallel(model, linear="ring_linear", layout="zigzag", baselines=True)
    apply_sequence_parallel(model, linear="ring_linear", baselines=True)
    bound = [m.linear_attn for m in model.modules() if hasattr(m, "linear_attn")]
    assert bound and all(f.func is ring_linear_attention and f.keywords == {"group": None} for f in bound)


def _model_grads(W, T):
    """A 3-layer pure linear Linear-Llama3 in float64 under LASP-2 (zigzag) on W ranks, T tokens, each of (gated,
    checkpointed per block) in {False, True}² -> {(gated, checkpointed): (loss sum over ranks, full-sequence
    gradient of the embedding, all_gathers issued by this rank)}."""
    import dataclasses
    from lasp import models
    from lasp import parallel
    from lasp import apply_sequence_parallel
    from lasp.parallel import apply_activation_checkpointing, count_collectives
    out = {}
    for gated in (False, True):
        for checkpointed in (False, True):
            cfg = dataclasses.replace(models.get_config("linear-llama3-tiny"), pattern="L", n_layers=3, dim=32,
                                      n_heads=2, n_kv_heads=1, ffn_dim=64,
                                      linear_decay="gated" if gated else "lightning")
            torch.manual_seed(0)
            model = models.build_model(cfg).double()
            tokens = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(1))
            pos = parallel.layout.local_positions(T, "zigzag", dist.get_rank(), W)
            if W > 1:
                apply_sequence_parallel(model, linear="lasp2", layout="zigzag", group=dist.group.WORLD)
            if checkpointed:
                apply_activation_checkpointing(model)
            with count_collectives() as log:
                loss, _ = model.loss(model(tokens[:, pos], pos), tokens[:, pos + 1])
                loss.backward()
            loss, grad = loss.detach(), model.embed.weight.grad
            dist.all_reduce(loss)
            dist.all_reduce(grad)
            out[gated, checkpointed] = loss.item(), grad.numpy(), log.count("all_gather")   # numpy: by value
    return out


@pytest.mark.parametrize("W", [2, 3])
def test_checkpointed_lasp2_gathers_once_forward_and_once_backward(W):
    """With every block recomputed, a LASP-2 layer reuses its forward's prefix P (parallel.checkpointing.replayable)
    instead of gathering again: 2 all-gathers per layer per step, not 3; loss and gradients equal the uncheckpointed
    run bit for bit and one float64 process to 1e-10 (gated and constant decay)."""
    one, ranks = run_ranks(1, _model_grads, 1, 8 * W)[0], run_ranks(W, _model_grads, W, 8 * W)[0]
    for gated in (False, True):
        ref, plain, ckpt = one[gated, True], ranks[gated, False], ranks[gated, True]
        assert plain[2] == 2 * 3 and ckpt[2] == 2 * 3, (gated, plain[2], ckpt[2])
        assert ckpt[0] == plain[0] and (ckpt[1] == plain[1]).all()
        assert abs(ckpt[0] / ref[0] - 1) < 1e-10
        assert rel_err(torch.from_numpy(ckpt[1]), torch.from_numpy(ref[1])) < 1e-10
