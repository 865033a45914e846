"""MiniMax (models/minimax.py) against transformers' MiniMaxForCausalLM, its conversion both ways
(models/hf_minimax.py, `python -m lasp.launch.convert`), recurrent decoding, the engines and expert parallelism in
float64 against one process, the launcher (`--sp 4 --ep 2` in both layouts) against one process,
and the published shape's parameter count.

transformers is the reference here and only here (a test dependency). fp32 logits within 1e-5; float64 within
1e-10 after replacing transformers' float32 casts (RMSNorm, router softmax, rotary tables, the lightning decay
buffers built in float32) by float64 twins inside the test.
"""
import dataclasses
import json

import pytest
import torch

from lasp import models
from lasp.launch import convert
from lasp.launch.config import parse_args
from lasp.models import hf_minimax
from lasp.models.minimax import MiniMaxConfig
from lasp.parallel import count_collectives
from tests.dist import rel_err, run_ranks
from tests.test_compose import _rel, _train  # the launcher-equality helpers (losses, grad norms, a2a count)

transformers = pytest.importorskip("transformers")
from transformers.models.minimax import modeling_minimax as hf_mm  # noqa: E402

# both kinds of layer, a softmax layer between lightning ones, α ≠ 1 and β ≠ 1, GQA, rotary base off the default,
# a lightning width H·d (48) other than D (32), top-2 of 4 experts
CFG = MiniMaxConfig(vocab_size=97, dim=32, n_layers=4, n_heads=3, n_kv_heads=1, head_dim=16, rotary_dim=0,
                    rope_base=5000.0, ffn_dim=40, n_ffn_experts=4, top_k=2, pattern="LLNL", linear_alpha=1.7,
                    linear_beta=0.9, softmax_alpha=2.1, softmax_beta=1.2, mlp_alpha=1.3, mlp_beta=0.8)
T = 45                  # with transformers' block_size 16: two full lightning blocks and a partial one


def _ours(cfg=CFG, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = models.build_model(cfg).to(dtype)
    for p in model.parameters():        # larger than init_std, so that every part moves the logits
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def _hf(model, block_size=16):
    """transformers' model holding `model`'s weights (sdpa attention and the eager expert loop: float64 runs through both)."""
    hf_cfg = hf_minimax.config_to_hf(model.config)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}
    config = transformers.MiniMaxConfig(**dict(hf_cfg, block_size=block_size), attn_implementation="sdpa",
                                        experts_implementation="eager")
    hf = transformers.MiniMaxForCausalLM(config).eval().to(next(model.parameters()).dtype)
    missing, unexpected = hf.load_state_dict(hf_minimax.state_to_hf(model.config, model.state_dict(), fused_experts=True),
                                              strict=False)
    assert not unexpected and all(k.endswith(("slope_rate", "_decay")) for k in missing), (missing, unexpected)
    return hf


def _logits(model, tokens):
    return model.logits(model(tokens, torch.arange(tokens.shape[1])))


@pytest.mark.parametrize("top_k", [2, 1])         # top-1 too: transformers renormalises its one weight to 1
def test_logits_equal_transformers_fp32(top_k):
    model = _ours(dataclasses.replace(CFG, top_k=top_k))
    tokens = torch.randint(0, CFG.vocab_size, (2, T))
    with torch.no_grad():
        ours, theirs = _logits(model, tokens), _hf(model)(tokens).logits
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)


def _float64_twins(monkeypatch, hf):
    """transformers' float32 steps -> float64: norms, router softmax, rotary tables, lightning decay buffers."""
    def norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def router(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, self.hidden_dim), self.weight)
        top, ids = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), ids

    def rotary(self, x, position_ids):
        d = self.config.head_dim
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        freqs = position_ids[..., None].double() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    monkeypatch.setattr(hf_mm.MiniMaxRMSNorm, "forward", norm)
    monkeypatch.setattr(hf_mm.MiniMaxTopKRouter, "forward", router)
    monkeypatch.setattr(hf_mm.MiniMaxRotaryEmbedding, "forward", rotary)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)          # its own get_slope_rate, evaluated in float64
    try:
        for layer in hf.model.layers:
            attn = layer.self_attn
            if isinstance(attn, hf_mm.MiniMaxLightningAttention):
                attn.slope_rate = attn.get_slope_rate()
                attn.query_decay, attn.key_decay, attn.diagonal_decay = attn.decay_factors(attn.slope_rate)
    finally:
        torch.set_default_dtype(default)


def test_logits_equal_transformers_float64(monkeypatch):
    model = _ours(dtype=torch.float64)
    hf = _hf(model)
    _float64_twins(monkeypatch, hf)
    tokens = torch.randint(0, CFG.vocab_size, (2, T))
    with torch.no_grad():
        ours, theirs = _logits(model, tokens), hf(tokens).logits
    assert theirs.dtype == torch.float64 and rel_err(ours, theirs) < 1e-10, rel_err(ours, theirs)


def test_conversion_round_trips_are_the_identity(tmp_path):
    model = _ours(dataclasses.replace(CFG, loss_chunk_tokens=96, z_loss_weight=0.01))
    models.save_model(tmp_path / "ours.pt", model)
    convert.main(["--family", "minimax", "--to", "hf", str(tmp_path / "ours.pt"), str(tmp_path / "hf")])
    convert.main(["--family", "minimax", "--to", "lasp", str(tmp_path / "hf"), str(tmp_path / "back.pt")])
    back = models.load_model(tmp_path / "back.pt")
    assert back.config == model.config                                   # training-only fields included
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    # transformers reads the folder as the same model, and its own save_pretrained folder converts back
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, CFG.vocab_size, (1, T))
    with torch.no_grad():
        assert rel_err(_logits(model, tokens), hf(tokens).logits) < 1e-5
    hf.save_pretrained(tmp_path / "hf2")
    convert.main(["--family", "minimax", "--to", "lasp", str(tmp_path / "hf2"), str(tmp_path / "again.pt")])
    again = models.load_model(tmp_path / "again.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    hf_state = {k: v for k, v in hf.state_dict().items() if not k.endswith(("slope_rate", "_decay"))}
    ours_as_hf = hf_minimax.state_to_hf(again.config, again.state_dict(), fused_experts=True)
    assert ours_as_hf.keys() == hf_state.keys() and all(torch.equal(ours_as_hf[k], v) for k, v in hf_state.items())


def test_a_fresh_transformers_checkpoint_starts_a_run_here(tmp_path):
    """transformers' save_pretrained of a new model writes the Hub layout (block_sparse_moe.experts.e.w1/w2/w3, as
    MiniMaxAI's -hf checkpoints): it converts to a model file with equal logits, and back to the same tensors."""
    hf_cfg = {k: v for k, v in hf_minimax.config_to_hf(CFG).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    hf = transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(**hf_cfg)).eval()
    hf.save_pretrained(tmp_path / "hub")
    convert.to_lasp("minimax", tmp_path / "hub", tmp_path / "start.pt")
    ours = models.load_model(tmp_path / "start.pt")
    tokens = torch.randint(0, CFG.vocab_size, (1, T))
    with torch.no_grad():
        assert rel_err(_logits(ours, tokens), hf(tokens).logits) < 1e-5
    _, hub = convert.read_hf_folder(tmp_path / "hub")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in hub
    written = hf_minimax.state_to_hf(ours.config, ours.state_dict())
    assert all(torch.equal(written[k], hub[k]) for k in written) and set(hub) - set(written) <= {
        k for k in hub if k.endswith(("slope_rate", "_decay"))}


def test_conversion_refuses_what_transformers_cannot_hold(tmp_path, capsys):
    with pytest.raises(ValueError, match="rotary_dim=64: transformers' MiniMax rotates the whole head"):
        hf_minimax.config_to_hf(models.get_config("minimax-text-01"))
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        hf_minimax.config_from_hf({"model_type": "minimax", "tie_word_embeddings": True})
    models.save_model(tmp_path / "tnl.pt", models.build_model("tnl-tiny"))
    with pytest.raises(SystemExit) as e:
        convert.main(["--family", "minimax", "--to", "hf", str(tmp_path / "tnl.pt"), str(tmp_path / "hf")])
    assert e.value.code == 2 and "holds a 'tnl' model, not 'minimax'" in capsys.readouterr().err
    hf_cfg = hf_minimax.config_to_hf(CFG)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(hf_cfg))
    state = hf_minimax.state_to_hf(CFG, _ours().state_dict())
    state.pop("model.layers.2.self_attn.o_proj.weight")
    convert.write_hf_folder(tmp_path / "bad", hf_cfg, state)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.2.self_attn.o_proj.weight'"):
        convert.to_lasp("minimax", tmp_path / "bad", tmp_path / "x.pt")


def test_recurrent_generation_continues_a_prefill_exactly():
    model = _ours(dtype=torch.float64)
    tokens = torch.randint(0, CFG.vocab_size, (2, 24))
    with torch.no_grad():
        full = _logits(model, tokens)
        cache = model.new_cache()
        steps = [model.logits(model(tokens[:, :17], torch.arange(17), cache=cache))]
        for t in range(17, 24):
            steps.append(model.logits(model(tokens[:, t:t + 1], torch.tensor([t]), cache=cache)))
    assert "state" in cache[0] and "k" in cache[2]          # lightning: a recurrent state; softmax: keys
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-12


def test_published_shape_parameter_count_on_meta():
    cfg = models.get_config("minimax-text-01")
    model = models.build_model(cfg, device="meta")
    total = sum(p.numel() for p in model.parameters())
    D, F, E, L, hd = cfg.dim, cfg.ffn_dim, cfg.n_ffn_experts, cfg.n_layers, cfg.n_heads * cfg.head_dim
    lightning = 5 * D * hd + hd                                  # q, k, v, gate, out; the H·d output norm
    softmax = 2 * D * hd + 2 * D * cfg.n_kv_heads * cfg.head_dim
    moe = 3 * D * F * E + E * D + 2 * D                          # experts, router, the block's two norms
    assert total == 2 * cfg.vocab_size * D + D + 70 * lightning + 10 * softmax + L * moe
    assert abs(total / 456e9 - 1) < 0.001                        # "456B total parameters"
    active = total - L * 3 * D * F * (E - cfg.top_k) - 2 * cfg.vocab_size * D
    assert abs(active / 45.9e9 - 1) < 0.002                      # "45.9B activated" (without the embeddings)


# ---------------------------------------------------------------------------------------------- engines, float64
# (world, linear engine, softmax engine, layout, expert-parallel over the whole group); W = 4 and an odd W = 3
SP_CASES = [(4, "lasp2", "allgather", "contiguous", True), (4, "lasp2", "ring", "zigzag", True),
            (4, "allscan", "allgather", "contiguous", False), (3, "lasp2", "allgather", "zigzag", False),
            (3, "lasp1", "ring", "contiguous", False)]
SP_T = 48


def _sp_inputs():
    g = torch.Generator().manual_seed(3)
    tokens, labels = (torch.randint(0, CFG.vocab_size, (2, SP_T), generator=g) for _ in range(2))
    segment_ids = torch.stack([(torch.arange(SP_T) >= 13).long(), (torch.arange(SP_T) >= 29).long()])
    return {"tokens": tokens, "labels": labels, "segment_ids": segment_ids}


def _loss_and_grads(model, batch, positions):
    """Summed LM loss over these tokens (the router losses are the launcher test's) and {name: gradient}."""
    loss, _ = model.loss(model(batch["tokens"], positions, batch["segment_ids"]), batch["labels"], with_aux=False)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _sp_rank(model, inputs, linear, softmax, layout, ep):
    from lasp.apply import apply_sequence_parallel
    from lasp.parallel import comm, experts, layout as layouts
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    apply_sequence_parallel(model, linear=linear, softmax=softmax, layout=layout)
    if ep:
        experts.apply_expert_parallel(model)
    batch = {k: layouts.shard(v, layout, rank, world) for k, v in inputs.items()}
    with count_collectives() as log:
        loss, grads = _loss_and_grads(model, batch, layouts.local_positions(SP_T, layout, rank, world))
    sharded = experts.expert_parameters(model)           # already summed over the group by the all-to-all
    grads = {n: (g if n in sharded else comm.all_reduce(g.clone())) for n, g in grads.items()}
    grads = experts.full_state_dict(model, grads)
    return comm.all_reduce(loss.clone()).item(), {n: g.numpy() for n, g in grads.items()}, log.count("all_to_all_v")


@pytest.mark.parametrize("case", SP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_engines_and_experts_equal_one_process_float64(case):
    world, linear, softmax, layout, ep = case
    model = _ours(dtype=torch.float64)
    ref_loss, ref_grads = _loss_and_grads(_ours(dtype=torch.float64), _sp_inputs(), torch.arange(SP_T))
    loss, grads, a2a = run_ranks(world, _sp_rank, model, _sp_inputs(), linear, softmax, layout, ep)[0]
    assert abs(loss - ref_loss.item()) < 1e-10 * abs(ref_loss.item()) and (a2a > 0) == ep
    for name, ref in ref_grads.items():
        assert ref.norm() > 0 and rel_err(torch.from_numpy(grads[name]), ref) < 1e-10, name


# ---------------------------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def _cfg(run_dir, cache_dir, *args):
    return parse_args(["--config", "tiny", "--model", "minimax-tiny", "--model.n_layers", "2", "--model.pattern",
                       "LN", "--run-dir", str(run_dir), "--max-steps", "3", "--data.cache_dir", cache_dir,
                       "--run.sample_tokens", "0", "--run.dtype", "fp32", *args])[0]


@pytest.fixture(scope="module")
def one(tmp_path_factory, cache_dir):
    return run_ranks(1, _train, _cfg(tmp_path_factory.mktemp("one"), cache_dir))[0]


# dp 1, so every run reads the one process's sequences. (--tp 2, --zero 1-3 and their compositions also equal
# one process, docs/models.md; not here: each tp rank imports megatron.core, ~15 s on this machine.)
@pytest.mark.parametrize("args", [("--sp", "4", "--ep", "2"), ("--sp", "4", "--ep", "2", "--parallel.layout", "zigzag")],
                         ids=" ".join)
def test_launcher_runs_equal_one_process(tmp_path, cache_dir, one, args):
    ranks = run_ranks(4, _train, _cfg(tmp_path, cache_dir, *args))
    assert all(r[:2] == ranks[0][:2] for r in ranks) and one[2] == 0
    assert all(r[2] > 0 for r in ranks) == ("--ep" in args)              # the expert all-to-all ran
    assert _rel(ranks[0][0], one[0]) < 1e-5 and _rel(ranks[0][1], one[1]) < 1e-5, (ranks[0][:2], one[:2])


def test_planner_splits_routed_experts_over_ep():
    from lasp.parallel.memory import plan
    cfg = models.get_config("minimax-tiny")
    one, four = plan(cfg, 4096, sp=4), plan(cfg, 4096, sp=4, ep=4)     # MoE layers probed on meta (raised before)
    experts = cfg.n_layers * 3 * cfg.dim * cfg.ffn_dim * cfg.n_ffn_experts
    assert one["params_per_rank"] - four["params_per_rank"] == experts * 3 / 4 and four["params"] == one["params"]
    assert four["optimizer_states"] == 8 * four["params_per_rank"]
    zero1 = plan(cfg, 4096, sp=4, ep=4, zero=1)                          # experts' replicas: dp·sp/ep = 1
    assert zero1["optimizer_states"] == 8 * ((one["params"] - experts) / 4 + experts / 4)
    with pytest.raises(ValueError, match="ep=3 must divide dp x sp = 4"):
        plan(cfg, 4096, sp=4, ep=3)
