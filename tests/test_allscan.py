"""All-Scan against the float64 dense oracles on 1, 2, 3, 4 and 8 gloo ranks: forward, every input gradient (the
gate's too), and the exact messages (one state in per segment with a predecessor on another rank, K blocks each,
with gates as without)."""
import pytest
import torch
import torch.distributed as dist

from tests.dist import rel_err, run_ranks
from tests.oracles import gated_linear_attention, linear_attention_dense

DECAY = torch.tensor([0.0, -0.05, -60.0])   # λ = 1, a mild decay, and one whose λ^c underflows to 0
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
B, H_KV, D_K, D_V = 2, 3, 4, 5


def _inputs(T, q_heads, seed=0):
    """q, k, v, do and a log_gate (B, T, H_KV): weak (−1e−4 at most), logsigmoid-like, strong (down to −20)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, d, generator=g, dtype=torch.float64) for h, d in
               ((q_heads, D_K), (H_KV, D_K), (H_KV, D_V)))
    do = torch.randn(B, T, q_heads, D_V, generator=g, dtype=torch.float64)
    u = torch.rand(B, T, H_KV, generator=g, dtype=torch.float64)
    gate = torch.stack([-1e-4 * u[..., 0], torch.nn.functional.logsigmoid(4 * u[..., 1] - 1), -20 * u[..., 2]], -1)
    return q, k, v, do, gate


def _case(W, layout, causal, log_decay, dtype, q_heads, blocks, gated=False, T=None, engine="allscan"):
    """One engine call on this rank's shard -> (errors o, dq, dk, dv (, d log_gate) vs the oracle shard, fwd and
    bwd comm logs)."""
    from lasp import allscan, lasp2
    from lasp.parallel import count_collectives, shard
    r, T = dist.get_rank(), T or 8 * W
    q, k, v, do, gate = _inputs(T, q_heads)
    full = [x.clone().requires_grad_() for x in ((q, k, v, gate) if gated else (q, k, v))]
    G = q_heads // H_KV
    kv = [x.repeat_interleave(G, dim=2) for x in full[1:]]
    ld = None if log_decay is None else log_decay.repeat_interleave(G)
    ref = gated_linear_attention(full[0], *kv, log_decay=ld)[0] if gated else linear_attention_dense(
        full[0], *kv, ld, causal)
    ref_grads = torch.autograd.grad(ref, full, do)
    local = [shard(x, layout, r, W).to(dtype).requires_grad_() for x in full]
    kw = dict(log_decay=None if log_decay is None else log_decay.to(dtype), causal=causal, layout=layout,
              log_gate=local[3] if gated else None)
    with count_collectives() as fwd:
        o = allscan(*local[:3], blocks=blocks, **kw) if engine == "allscan" else lasp2(*local[:3], **kw)
    with count_collectives() as bwd:
        grads = torch.autograd.grad(o, local, shard(do, layout, r, W).to(dtype))
    errors = [rel_err(o, shard(ref, layout, r, W))] + [rel_err(a, shard(b, layout, r, W))
                                                       for a, b in zip(grads, ref_grads)]
    return errors, fwd.summary(), bwd.summary()


CONFIGS = [  # (layout, causal, decay, dtype, query heads, blocks K, gated); d_v = 5: divisible by neither 2 nor 3
    (layout, *rest) for layout in ("contiguous", "zigzag") for rest in (
        (True, DECAY, torch.float64, 3, 1, False), (True, DECAY, torch.float64, 6, 3, False),
        (True, None, torch.float32, 3, 2, False), (True, DECAY, torch.float64, 3, None, False),
        (False, None, torch.float64, 3, 2, False), (False, None, torch.float64, 6, 3, False),
        (True, DECAY, torch.float64, 6, 2, True), (True, None, torch.float32, 3, 3, True))]


def _all_cases(W):
    return [_case(W, *config) for config in CONFIGS]


def _expected_states_in(W, r, layout, causal, backward):
    """States received by rank r in one pass: one per segment whose chain predecessor is on another rank."""
    if causal and layout == "contiguous":
        return int(r < W - 1) if backward else int(r > 0)
    return int(r > 0) + int(r < W - 1)          # zigzag: one per segment but the chain ends; non-causal: each side


@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_allscan_matches_float64_oracle_and_sends_one_state_per_segment(W):
    from lasp.allscan import choose_blocks
    for r, results in enumerate(run_ranks(W, _all_cases, W)):
        for (layout, causal, decay, dtype, q_heads, blocks, gated), (errors, fwd, bwd) in zip(CONFIGS, results):
            config = (layout, causal, decay is not None, str(dtype), q_heads, blocks, gated)
            assert max(errors) < TOL[dtype], f"W={W} rank {r} {config}: errors o,dq,dk,dv(,dg) = {errors}"
            elem = torch.finfo(dtype).bits // 8
            state = B * H_KV * D_K * D_V * elem
            hops = (W - 1) * (2 if causal and layout == "zigzag" else 1)
            K = blocks or choose_blocks(state, hops, D_V)
            assert fwd.pop("all_gather") == (1, (W - 1) * 2 * elem), (config, fwd)   # the (T_local, n) check
            for log, backward in ((fwd, False), (bwd, True)):
                n_in = _expected_states_in(W, r, layout, causal, backward)
                n_out = _expected_states_in(W, r, layout, causal, not backward)
                want = {k: v for k, v in (("recv", (K * n_in, n_in * state)), ("send", (K * n_out, 0))) if v[0]}
                assert log == want, (W, r, config, backward, log)


def _payloads(W):
    out = []
    for layout in ("contiguous", "zigzag"):
        for T in (8 * W, 32 * W):
            _, fwd, bwd = _case(W, layout, True, DECAY, torch.float32, 3, 2, gated=T > 8 * W, T=T)
            _, fwd2, _ = _case(W, layout, True, DECAY, torch.float32, 3, None, T=T, engine="lasp2")
            out.append((layout, T, fwd.get("recv", (0, 0))[1], bwd.get("recv", (0, 0))[1],
                        fwd2["all_gather"][1] - (W - 1) * 8))
    return out


def test_bytes_per_rank_one_state_per_segment_independent_of_T():
    """All-Scan receives n states per rank at most (the most loaded rank), whatever T, gated (the longer T) or
    not (each rank folds with its own segment's gate total: none travel); LASP-2 (W−1)·n in the same run.
    Independence of W: the oracle test asserts the same exact count on every W."""
    W = 4
    state = B * H_KV * D_K * D_V * 4
    per_rank = run_ranks(W, _payloads, W)
    for layout in ("contiguous", "zigzag"):
        n = 1 if layout == "contiguous" else 2
        rows = [row for rank in per_rank for row in rank if row[0] == layout]
        assert max(row[2] for row in rows) == max(row[3] for row in rows) == n * state, rows
        assert {row[4] for row in rows} == {(W - 1) * n * state}, rows                 # LASP-2, same run


def _unequal_lengths():
    from lasp import allscan
    T = 8 if dist.get_rank() == 0 else 6
    x = torch.randn(1, T, 2, 4)
    try:
        allscan(x, x, x, blocks=2)
    except ValueError as e:
        return str(e)
    return None


def test_ranks_with_different_lengths_raise_everywhere():
    for message in run_ranks(3, _unequal_lengths):
        assert message is not None and "[8, 6, 6]" in message, message


def test_bad_input_single_process():
    from lasp import allscan
    q = torch.randn(1, 6, 2, 4)
    with pytest.raises(ValueError, match=r"\(1, 6, 2, 4\).*\(1, 5, 2, 4\)"):
        allscan(q, q[:, :5], q)
    with pytest.raises(ValueError, match="blocks.*d_v = 4"):
        allscan(q, q, q, blocks=5)
    with pytest.raises(ValueError, match="causal"):
        allscan(q, q, q, log_decay=torch.tensor([-0.1, -0.1]), causal=False)
    with pytest.raises(ValueError, match="zigzag.*3.*|local length"):
        allscan(q[:, :3], q[:, :3], q[:, :3], layout="zigzag")


def test_choose_blocks_rule():
    from lasp.allscan import choose_blocks
    from lasp.parallel.comm import NetworkModel
    slow = NetworkModel(latency_s=10e-6, bytes_per_s=1e8)                 # bandwidth-bound: split finely
    assert choose_blocks(2 ** 20, 7, 128, slow) == 8
    assert choose_blocks(2 ** 20, 7, 3, slow) == 3                         # never more blocks than columns
    assert choose_blocks(2 ** 20, 7, 128, NetworkModel(latency_s=20e-3, bytes_per_s=1e9)) == 1  # latency-bound
    assert choose_blocks(2 ** 20, 1, 128, slow) == 1                       # one hop: nothing to pipeline
    k = choose_blocks(4096, 7, 128, NetworkModel(latency_s=10e-6, bytes_per_s=1e8))   # sqrt(6·4096/1000) ≈ 5
    assert k == 5, k


def _model_loss_and_grads(W, layouts_):
    """Loss and every parameter gradient (summed over ranks) of a tiny 2-layer Linear-Llama, per layout."""
    from lasp import models
    from lasp import apply_sequence_parallel
    from lasp.parallel import comm, layout as layouts
    out = []
    for layout in layouts_:
        torch.manual_seed(0)
        cfg = models.LinearLlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                       pattern="LL", linear_decay="lightning")
        model = models.build_model(cfg).double()
        g = torch.Generator().manual_seed(3)
        tokens, labels = torch.randint(0, 61, (2, 32), generator=g), torch.randint(0, 61, (2, 32), generator=g)
        if W > 1:
            apply_sequence_parallel(model, linear="allscan", layout=layout)
        pos = layouts.local_positions(32, layout, comm.group_rank(), W)
        loss_sum, _ = model.loss(model(tokens[:, pos], pos), labels[:, pos])
        loss_sum.backward()
        flat = torch.cat([loss_sum.detach()[None]] + [p.grad.flatten() for p in model.parameters()])
        out.append((comm.all_reduce(flat) if W > 1 else flat).numpy())
    return out


def test_model_loss_and_grads_at_W4_equal_W1():
    """Through apply_sequence_parallel(linear="allscan"), both layouts, one run of 4 ranks."""
    layouts_ = ("contiguous", "zigzag")
    ref = torch.from_numpy(_model_loss_and_grads(1, layouts_[:1])[0])
    for layout, got in zip(layouts_, run_ranks(4, _model_loss_and_grads, 4, layouts_)[0]):
        got = torch.from_numpy(got)
        assert abs(got[0] - ref[0]) <= 1e-10 * abs(ref[0]), (layout, got[0], ref[0])
        assert rel_err(got[1:], ref[1:]) < 1e-10, (layout, rel_err(got[1:], ref[1:]))
