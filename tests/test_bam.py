"""BAM: upcycling maps seed weights to the right experts, FFN experts agree with DeepSpeed's MoE layer, expert and
sequence parallelism match one process, router counts are global, bad upcycling input fails before writing.

The parallel checks run all their cases in one run_ranks call each (W = 2 for expert parallelism, W = 4 for
LASP-2): every rank builds the same model from the same seed, runs its own tokens, and returns the loss, every
gradient (all-reduced; sharded experts all-gathered) and the router counts; the parent compares with one process.
"""
import copy
import dataclasses
import os
import re

import pytest
import torch
import torch.distributed as dist

from lasp import models
from lasp.apply import apply_sequence_parallel
from lasp.launch.upcycle import main as upcycle_main
from lasp.models import LinearLlamaConfig
from lasp.models.bam import upcycle
from lasp.models.common import SwiGLU
from lasp.models.moe import MoEFeedForward
from lasp.parallel import apply_expert_parallel, apply_global_router_counts, comm, count_collectives, layout as layouts
from tests.dist import rel_err, run_ranks

SEED = LinearLlamaConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, pattern="LN",
                         linear_decay="lightning", loss_chunk_tokens=40, parallel_block=True)


def _model(cfg, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return models.build_model(cfg).to(dtype)


def _tokens(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 101, (B, T), generator=g), torch.randint(0, 101, (B, T), generator=g)


# ------------------------------------------------------------------------------------------------ upcycling
@pytest.mark.parametrize("attention,top_k,normalize_top1",
                         [("experts", 3, False), ("kv-sharing", 1, True), ("average", 2, False)])
def test_identical_copies_with_uniform_gates_reproduce_the_seed(attention, top_k, normalize_top1):
    seed = _model(SEED)
    moe = upcycle(SEED, [seed.state_dict()] * 3, attention=attention, top_k=top_k, normalize_top1=normalize_top1)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".router." in name:
                p.zero_()                                       # uniform soft gates and FFN router probabilities
    tokens, _ = _tokens(2, 24)
    with torch.no_grad():
        dense, mixed = (m.logits(m(tokens, torch.arange(24))) for m in (seed, moe))
    assert moe.layers[1].mixer.n_experts == (1 if attention == "average" else 3) and moe.layers[0].mlp.n_experts == 3
    assert rel_err(mixed, dense) < 1e-12


@pytest.mark.parametrize("attention", ["experts", "kv-sharing", "average"])
def test_upcycled_layers_mix_the_matching_expert_layers(attention):
    """Distinct experts (weights the mode averages kept equal, norms equal), random routers, all FFN experts
    chosen: each MoE layer's attention is Σ_j g_j A_j(u) with g = softmax(u W_rᵀ), and its FFN Σ_j p_j F_j(u)."""
    seed, experts = _model(SEED), []
    for j in range(3):
        expert = copy.deepcopy(seed)
        with torch.no_grad():
            for name, p in expert.named_parameters():
                averaged = ".mixer." in name and (attention == "average" or
                                                 (attention == "kv-sharing" and ("k_proj" in name or "v_proj" in name)))
                if "norm" not in name and not averaged:
                    p.add_(0.05 * torch.randn_like(p))
        experts.append(expert)
    moe = upcycle(SEED, [e.state_dict() for e in experts], attention=attention, top_k=3)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".router." in name:
                p.mul_(20)                                      # gates far from uniform
    u, positions = torch.randn(2, 12, SEED.dim, dtype=torch.float64), torch.arange(12).expand(2, -1)
    with torch.no_grad():
        for i, layer in enumerate(moe.layers):
            attn = [e.layers[i].mixer(u, positions) for e in experts]
            if attention == "average":
                want = attn[0]
            else:
                g = (u @ layer.mixer.router.weight.t()).softmax(-1)
                want = sum(g[..., j, None] * a for j, a in enumerate(attn))
                assert (g.max(-1).values - g.min(-1).values).min() > 0.05
            assert rel_err(layer.mixer(u, positions), want) < 1e-12, f"layer {i} attention"
            p = (u @ layer.mlp.router.weight.t()).softmax(-1)
            want = sum(p[..., j, None] * e.layers[i].mlp(u) for j, e in enumerate(experts))
            assert rel_err(layer.mlp(u), want) < 1e-12, f"layer {i} FFN"


def test_upcycle_command_writes_one_loadable_file(tmp_path, capsys):
    paths = []
    for j in range(3):
        paths.append(tmp_path / f"e{j}.pt")
        models.save_model(paths[-1], _model(SEED, seed=j, dtype=torch.float32))
    out = tmp_path / "moe" / "bam.pt"
    assert upcycle_main(["--seed", str(paths[0]), "--experts", *map(str, paths), "--out", str(out),
                         "--kv-sharing", "--top-k", "2"]) == 0
    assert os.listdir(out.parent) == ["bam.pt"] and "3 experts" in capsys.readouterr().out
    moe = models.load_model(out)
    assert (moe.config.n_attn_experts, moe.config.kv_sharing, moe.config.n_ffn_experts, moe.config.top_k) == \
        (3, True, 3, 2)
    expert1 = models.load_model(paths[1]).state_dict()
    assert torch.equal(moe.state_dict()["layers.0.mlp.up_proj"][1], expert1["layers.0.mlp.up_proj.weight"])


def _bad_inputs(tmp_path):
    """{case: (argv tail, expected message)} over files written here."""
    good = [tmp_path / f"e{j}.pt" for j in range(2)]
    for j, path in enumerate(good):
        models.save_model(path, _model(SEED, seed=j, dtype=torch.float32))
    other = dataclasses.replace(SEED, linear_decay="none")
    models.save_model(tmp_path / "other_config.pt", _model(other, dtype=torch.float32))
    models.save_model(tmp_path / "sequential.pt", _model(dataclasses.replace(SEED, parallel_block=False)))
    models.save_model(tmp_path / "llama.pt", models.build_model(models.LinearLlamaConfig(
        vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)))
    models.save_model(tmp_path / "tnl.pt", models.build_model(models.TNLConfig(
        vocab_size=101, dim=32, n_layers=2, n_heads=4, glu_dim=48)))
    payload = torch.load(good[1], weights_only=True)
    payload["model"]["layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)             # same config, other shape
    torch.save(payload, tmp_path / "other_shape.pt")
    g0, g1, seq, llama = str(good[0]), str(good[1]), str(tmp_path / "sequential.pt"), str(tmp_path / "llama.pt")
    tnl = str(tmp_path / "tnl.pt")
    return {
        "other config": (["--seed", g0, "--experts", g0, str(tmp_path / "other_config.pt")],
                         r"expert 1 .* another config .*linear_decay='none' \(seed: 'lightning'\)"),
        "other shape": (["--seed", g0, "--experts", g0, str(tmp_path / "other_shape.pt")],
                        r"expert 1: weights do not fit.*layers\.0\.mlp\.up_proj"),
        "sequential seed": (["--seed", seq, "--experts", seq, seq], "sequential blocks \\(parallel_block=False\\)"),
        "llama seed": (["--seed", llama, "--experts", llama, llama],
                       "LinearLlamaConfig model with sequential blocks"),
        "tnl seed": (["--seed", tnl, "--experts", tnl, tnl], "TNLConfig model; BAM upcycles Linear-Llama3 seeds"),
        "top-k > N": (["--seed", g0, "--experts", g0, g1, "--top-k", "3"], "top_k=3 .* n_ffn_experts=2"),
        "one expert": (["--seed", g0, "--experts", g0], "at least 2 expert checkpoints"),
        "missing file": (["--seed", g0, "--experts", g0, str(tmp_path / "nope.pt")], "expert 1 .*nope.pt"),
    }


def test_bad_upcycling_input_fails_before_writing(tmp_path, capsys):
    for case, (argv, message) in _bad_inputs(tmp_path).items():
        out = tmp_path / "out" / "moe.pt"
        assert upcycle_main(argv + ["--out", str(out)]) == 2, case
        err = capsys.readouterr().err
        assert re.search(message, err), f"{case}: {err}"
        assert not out.parent.exists(), case                 # nothing written, not even the folder


def test_config_rejects_top_k_above_the_experts():
    with pytest.raises(ValueError, match="top_k=2 must be between 1 and n_ffn_experts=1"):
        LinearLlamaConfig(top_k=2)


# ------------------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ffn_experts_match_deepspeed_moe(k, monkeypatch):
    """Same router and expert weights, dropless (drop_tokens=False), no noise, no random token selection."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.moe.layer import MoE
    D, F_, E = 16, 24, 4
    torch.manual_seed(0)
    ours = MoEFeedForward(D, F_, E, top_k=k)
    ours.init_weights()
    with torch.no_grad():
        ours.router.weight.normal_(std=1.0)
    ds = MoE(D, SwiGLU(D, F_), num_experts=E, ep_size=1, k=k, min_capacity=0, drop_tokens=False, use_rts=False,
             noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(expert, name).weight.copy_(getattr(ours, name)[e])
    x = torch.randn(3, 11, D, requires_grad=True)
    y = ours(x)
    y_ds, l_aux, counts = ds(x)
    assert rel_err(y, y_ds) < 1e-6
    assert torch.equal(ours.route_counts, counts.long())
    probe = torch.randn_like(y)
    # DeepSpeed's top-2 gate counts only first choices in f; top-1 and top-k (k > 2) count every route, as we do
    aux = ours.aux["balance"] if k != 2 else torch.zeros(())
    aux_ds = l_aux if k != 2 else torch.zeros(())
    assert abs(aux.item() - aux_ds.item()) < 1e-6
    ours_params = [x, ours.router.weight, ours.gate_proj, ours.up_proj, ours.down_proj]
    grads = torch.autograd.grad((y * probe).sum() + aux, ours_params)
    ds_experts = ds.deepspeed_moe.experts.deepspeed_experts
    ds_params = [x, ds.deepspeed_moe.gate.wg.weight] + [[getattr(e, n).weight for e in ds_experts]
                                                       for n in ("gate_proj", "up_proj", "down_proj")]
    flat = [p for group in ds_params for p in (group if isinstance(group, list) else [group])]
    ds_grads = list(torch.autograd.grad((y_ds * probe).sum() + aux_ds, flat))
    ds_grads = ds_grads[:2] + [torch.stack(ds_grads[2 + i * E:2 + (i + 1) * E]) for i in range(3)]
    for name, a, b in zip(["x", "router", "gate_proj", "up_proj", "down_proj"], grads, ds_grads):
        assert rel_err(a, b) < 1e-5, f"{name}: {rel_err(a, b):.2e}"


# ------------------------------------------------------------------------------------------------ parallel
def _reduced_grads(model, sharded):
    """{name: gradient of the whole step}: replicated weights all-reduced, sharded experts all-gathered."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        out[name] = (comm.all_gather(g) if name in sharded else comm.all_reduce(g)).numpy()
    return out


def _loss_and_grads(model, tokens, labels, positions):
    """Mean loss of the step over all ranks (aux included) and its gradients on this rank's replica."""
    hidden = model(tokens, positions)
    loss_sum, count = model.loss(hidden, labels)
    total = comm.all_reduce(count.double().reshape(1))
    (loss_sum / total).backward()
    return (comm.all_reduce(loss_sum.detach().reshape(1)) / total).item()


def _counts(model):
    return [layer.mlp.route_counts.tolist() for layer in model.layers]


EP_CFG = dataclasses.replace(SEED, n_attn_experts=2, n_ffn_experts=4, top_k=2)
EP_B, EP_T = 2, 16


def _ep_model():
    model = _model(EP_CFG, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.weight.mul_(30)                    # well-separated routing decisions in fp32
    return model


def _ep_rank(model, tokens, labels):
    rank, W = dist.get_rank(), dist.get_world_size()
    sharded = {n for n, _ in model.named_parameters() if ".mlp." in n and "router" not in n}
    apply_global_router_counts(model)
    apply_expert_parallel(model)
    mine = slice(rank * EP_B, (rank + 1) * EP_B)
    with count_collectives() as log:
        loss = _loss_and_grads(model, tokens[mine], labels[mine], torch.arange(EP_T))
    return loss, _reduced_grads(model, sharded), _counts(model), log.summary()


def test_expert_parallel_two_ranks_match_one_process():
    tokens, labels = _tokens(2 * EP_B, EP_T)
    loss, grads, counts, comms = run_ranks(2, _ep_rank, _ep_model(), tokens, labels)[0]
    ref = _ep_model()
    ref_loss = _loss_and_grads(ref, tokens, labels, torch.arange(EP_T))
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and counts == _counts(ref)
    for name, p in ref.named_parameters():
        assert p.grad.norm() > 0, name
        err = rel_err(torch.from_numpy(grads[name]), p.grad)
        assert err < 1e-5, f"{name}: {err:.2e}"
    L = EP_CFG.n_layers                                         # per layer: counts a2a, 2 row a2a fwd + 2 bwd
    assert comms["all_to_all"][0] == L and comms["all_to_all_v"][0] == 4 * L
    # only routed rows travel: each rank receives at most its 2·B·T·k routes' rows, never a capacity-padded buffer
    assert comms["all_to_all_v"][1] <= 4 * L * EP_B * EP_T * EP_CFG.top_k * EP_CFG.dim * 4


SP_W, SP_B, SP_T = 4, 2, 32
SP_CASES = {  # name: (config, layout)
    "linear-kv-experts": (dataclasses.replace(SEED, pattern="L", n_attn_experts=3, n_ffn_experts=3), "contiguous"),
    "hybrid-kv-sharing": (dataclasses.replace(SEED, linear_decay="none", n_attn_experts=2, kv_sharing=True,
                                              n_ffn_experts=4, top_k=2), "zigzag"),
}


def _sp_rank(cases, tokens, labels):
    rank, W = dist.get_rank(), dist.get_world_size()
    out = {}
    for name, (cfg, layout) in cases.items():
        model = _model(cfg)
        apply_sequence_parallel(model, linear="lasp2", softmax="allgather", layout=layout)
        apply_global_router_counts(model)
        tok, lab = (layouts.shard(x, layout, rank, W) for x in (tokens, labels))
        with count_collectives() as log:
            model(tok, layouts.local_positions(SP_T, layout, rank, W))
        loss = _loss_and_grads(model, tok, lab, layouts.local_positions(SP_T, layout, rank, W))
        out[name] = (loss, _reduced_grads(model, set()), _counts(model), log.summary())
    return out


def test_lasp2_four_ranks_match_one_process_and_router_counts_are_global():
    tokens, labels = _tokens(SP_B, SP_T)
    per_rank = run_ranks(SP_W, _sp_rank, SP_CASES, tokens, labels)
    for name, (cfg, _) in SP_CASES.items():
        ref = _model(cfg)
        ref_loss = _loss_and_grads(ref, tokens, labels, torch.arange(SP_T))
        loss, grads, counts, comms = per_rank[0][name]
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss), name
        for rank in range(SP_W):                                 # every rank saw the same global counts
            assert per_rank[rank][name][2] == counts == _counts(ref), (name, rank)
        for pname, p in ref.named_parameters():
            assert p.grad.norm() > 0, pname
            assert rel_err(torch.from_numpy(grads[pname]), p.grad) < 1e-10, f"{name} {pname}"
        # one wide attention: one state/KV all-gather per layer whatever N is; one count all-reduce per layer
        assert comms["all_gather"][0] == cfg.n_layers and comms["all_reduce"][0] == cfg.n_layers, comms


def test_moa_gathers_the_distinct_kv_of_one_wide_attention():
    """Bytes of the forward all-gathers on 2 ranks relative to the dense seed: a KV-experts mixture gathers N× the
    LASP-2 states and softmax K/V; KV sharing gathers the seed's softmax K/V and LASP-2 states once (grouped
    heads: the N experts' queries share the H K/V heads and their states)."""
    variants = {"dense": SEED, "experts": dataclasses.replace(SEED, n_attn_experts=3),
                "sharing": dataclasses.replace(SEED, n_attn_experts=3, kv_sharing=True)}
    per_rank = run_ranks(2, _gather_bytes, variants)
    dense = per_rank[0]["dense"]
    lin, soft = (per_rank[0][v] for v in ("experts", "sharing"))
    assert lin["L"] / dense["L"] == pytest.approx(3, rel=0.01) and lin["N"] == 3 * dense["N"]
    assert soft["N"] == dense["N"] and soft["L"] == dense["L"]


def _gather_bytes(variants):
    rank, W = dist.get_rank(), dist.get_world_size()
    tokens, _ = _tokens(1, 16)
    out = {}
    for name, cfg in variants.items():
        model = _model(cfg)
        apply_sequence_parallel(model)
        out[name] = {}
        for layer in model.layers:
            u = torch.randn(1, 8, cfg.dim, dtype=torch.float64)
            with count_collectives() as log:
                layer.mixer(u, layouts.local_positions(16, "contiguous", rank, W).expand(1, -1))
            out[name][layer.kind] = log.bytes("all_gather")
    return out


# ------------------------------------------------------------------------------------------------ misc
def test_recurrent_decoding_continues_parallel_prefill():
    moe = _model(dataclasses.replace(SEED, n_attn_experts=2, kv_sharing=True, n_ffn_experts=3, top_k=2)).eval()
    tokens, _ = _tokens(2, 12)
    with torch.no_grad():
        full = moe.logits(moe(tokens, torch.arange(12)))
        cache = moe.new_cache()
        steps = [moe.logits(moe(tokens[:, :6], torch.arange(6), cache=cache))]
        steps += [moe.logits(moe(tokens[:, t:t + 1], torch.tensor([t]), cache=cache)) for t in range(6, 12)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-10


def _closed_form_params(cfg):
    """Parameter count from the config alone (independent of the model code)."""
    D, N, E, d = cfg.dim, cfg.n_attn_experts, cfg.n_ffn_experts, cfg.dim // cfg.n_heads
    n_kv = 1 if cfg.kv_sharing else N
    attn = {"L": 3 * N * D * D + 2 * n_kv * D * D + N * d,
            "N": 2 * N * D * D + 2 * n_kv * cfg.n_kv_heads * d * D}
    router = (N * D if N > 1 else 0) + (E * D if E > 1 else 0)
    norms = D if cfg.parallel_block else 2 * D
    per_layer = sum(attn[k] + router + norms + 3 * E * D * cfg.ffn_dim for k in cfg.layer_types())
    return 2 * cfg.vocab_size * D + D + per_layer


@pytest.mark.parametrize("name", sorted(models.BAM_PRESETS))
def test_meta_parameter_counts(name):
    for cfg in (models.get_config(name),
                dataclasses.replace(models.get_config(name), n_attn_experts=3, n_ffn_experts=4, top_k=2),
                dataclasses.replace(models.get_config(name), n_attn_experts=3, kv_sharing=True, parallel_block=False)):
        model = models.build_model(cfg, device="meta")
        assert sum(p.numel() for p in model.parameters()) == _closed_form_params(cfg), cfg


def test_bam_presets_are_linear_llama_configurations():
    """bam-moe-tiny (and the seeds) build from the Linear-Llama3 family: same classes, the dense mixers and SwiGLU
    where N = E = 1, parallel blocks, mixtures of 2 attention experts and 4 top-2 FFN experts in the MoE."""
    from lasp.models.common import LinearAttention, SoftmaxAttention
    for name in models.BAM_PRESETS:
        cfg = models.get_config(name)
        model = models.build_model(cfg, device="meta")
        assert type(cfg) is LinearLlamaConfig and type(model) is models.LinearLlama and cfg.parallel_block
        assert models.config_to_dict(model)["family"] == "linear-llama3"
        for layer in model.layers:
            assert layer.mlp_norm is None
            assert isinstance(layer.mixer, LinearAttention if layer.kind == "L" else SoftmaxAttention)
            assert layer.mixer.n_experts == cfg.n_attn_experts
            assert isinstance(layer.mlp, SwiGLU if cfg.n_ffn_experts == 1 else MoEFeedForward)
    moe = models.build_model("bam-moe-tiny")
    assert [l.kind for l in moe.layers] == list("LLLN") and moe.layers[0].mlp.top_k == 2
    assert moe.layers[0].mlp.gate_proj.shape == (4, 192, 64) and moe.layers[3].mixer.q_proj.weight.shape == (128, 64)
    tokens, labels = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    loss_sum, count = moe.loss(moe(tokens, torch.arange(16)), labels)
    ce, _ = moe.loss(moe(tokens, torch.arange(16)), labels, with_aux=False)
    assert torch.isfinite(loss_sum) and loss_sum > ce                 # the router losses are added


@pytest.mark.parametrize("name", ["seed", "moe", "moe-kv-sharing"])
def test_former_bam_family_files_load_as_linear_llama(name):
    """Files written by the former "bam" family (its own classes; tests/data/README.md) load as Linear-Llama3
    models with the same config fields, and give the logits that code computed (float64)."""
    from lasp.models.serialization import read_payload
    data = os.path.join(os.path.dirname(__file__), "data")
    path = os.path.join(data, f"bam-family-{name}.pt")
    loaded = models.load_model(path)                                 # float32: load_model's default
    assert type(loaded.config) is LinearLlamaConfig and loaded.config.parallel_block
    model = models.build_model(loaded.config).double()
    model.load_state_dict(read_payload(path)["model"])              # the file's float64 weights, renamed
    expected = torch.load(os.path.join(data, "bam-family-logits.pt"), weights_only=True)[name]
    with torch.no_grad():
        logits = model.logits(model(expected["tokens"], torch.arange(expected["tokens"].shape[1])))
    assert rel_err(logits, expected["logits"]) < 1e-13     # not bitwise (other CPUs round float64 sums apart);
    # 1e-13 as tests/test_models.py's FIXTURE_RTOL: one weight moved by 1e-9 moves these logits by >= 4.5e-13


def test_upcycle_command_reads_former_bam_family_seeds(tmp_path):
    seed = os.path.join(os.path.dirname(__file__), "data", "bam-family-seed.pt")
    out = tmp_path / "moe.pt"
    assert upcycle_main(["--seed", seed, "--experts", seed, seed, "--out", str(out), "--top-k", "2"]) == 0
    moe = models.load_model(out)
    assert type(moe.config) is LinearLlamaConfig and (moe.config.n_attn_experts, moe.config.n_ffn_experts) == (2, 2)
