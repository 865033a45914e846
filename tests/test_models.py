"""Models: sequence-parallel equivalence through every engine, recurrent decoding, parameter counts, files, bad input.

The sequence-parallel checks run every case in ONE call of run_ranks (W = 4 gloo ranks): each rank builds the same
float64 model, applies the engines, runs its shard in the case's layout with global positions, and all-reduces the
loss sum, the token count and every parameter gradient; the parent compares with the plain model on one process.
"""
import copy
import dataclasses
import os
import pathlib
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp
import models
from lasp.apply import LINEAR_ENGINES, SOFTMAX_ENGINES, apply_sequence_parallel, resolve_engines
from models import LinearLlamaConfig, TNLConfig
from models.common import alibi_slopes, chunked_cross_entropy, lightning_log_decay
from models.generation import generate
from parallel import comm, layout as layouts
from tests.dist import rel_err, run_ranks

W, B, T = 4, 2, 32
FAMILIES = {  # tiny float64 configs covering every mixer variant
    "pure": LinearLlamaConfig(vocab_size=101, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=96,
                              pattern="LLLL", linear_decay="retention", feature_map="elu+1"),
    "hybrid": LinearLlamaConfig(vocab_size=101, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=96,
                                pattern="LLLN", linear_decay="lightning", feature_map="silu", loss_chunk_tokens=24),
    "basic": LinearLlamaConfig(vocab_size=101, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                               pattern="LN", linear_decay="none", feature_map="identity"),
    "tnl": TNLConfig(vocab_size=101, dim=64, n_layers=3, n_heads=4, glu_dim=96, loss_chunk_tokens=40),
}


def _cases():
    """(family, linear, softmax, layout, dtype) for every engine choice; softmax varies only where it matters."""
    cases = []
    for family, cfg in FAMILIES.items():
        has_softmax = "N" in getattr(cfg, "pattern", "")
        for linear in LINEAR_ENGINES:
            for softmax in (SOFTMAX_ENGINES[:-1] if has_softmax else ("allgather",)):
                for layout in layouts.LAYOUTS:
                    if (family == "basic" and softmax != "allgather") or (linear == "lasp1" and layout == "zigzag"):
                        continue                                        # LASP-1 is a contiguous-only engine
                    cases.append((family, linear, softmax, layout, torch.float64))
    return cases + [("hybrid", "lasp2", "ring", "zigzag", torch.float32)]


def _case_id(case):
    return "-".join(map(str, case[:4])) + ("-f32" if case[4] == torch.float32 else "")


CASES = _cases()


def _runnable(case):
    """None if the engines accept the case, else the reason (e.g. LASP-1 has no zigzag)."""
    try:
        resolve_engines(*case[1:4])
    except ValueError as e:
        return str(e)
    return None


def _inputs():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 101, (B, T), generator=g)
    labels = torch.randint(0, 101, (B, T), generator=g)
    labels[0, 5] = labels[1, 30] = -100                                 # ignored labels
    loss_mask = torch.rand(B, T, generator=g) > 0.2
    segment_ids = torch.stack([(torch.arange(T) >= 11).long() + (torch.arange(T) >= 23).long(),
                               (torch.arange(T) >= 17).long()])         # documents of uneven lengths
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "segment_ids": segment_ids}


def _models():
    out = {}
    for i, (family, cfg) in enumerate(FAMILIES.items()):
        torch.manual_seed(i)
        out[family] = models.build_model(cfg).double()
    return out


def _loss_and_grads(model, batch, positions, reduce):
    """Run forward + loss + backward on `batch` -> (mean loss over all ranks, {name: summed gradient})."""
    hidden = model(batch["tokens"], positions, batch["segment_ids"])
    loss_sum, count = model.loss(hidden, batch["labels"], batch["loss_mask"])
    loss_sum.backward()
    totals = reduce(torch.stack([loss_sum.detach().double(), count.double()]))
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    for g in grads.values():
        reduce(g)
    return (totals[0] / totals[1]).item(), grads


def _rank_cases(cases, family_models, inputs):
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for family, linear, softmax, layout, dtype in cases:
        model = copy.deepcopy(family_models[family]).to(dtype)
        apply_sequence_parallel(model, linear=linear, softmax=softmax, layout=layout)
        batch = {k: layouts.shard(v, layout, rank, world) for k, v in inputs.items()}
        positions = layouts.local_positions(T, layout, rank, world)
        loss, grads = _loss_and_grads(model, batch, positions, comm.all_reduce)
        # numpy, not tensors: the queue would pass tensors as shared-memory handles that die with the rank
        results.append((loss, {n: g.numpy() for n, g in grads.items()}) if rank == 0 else None)
    return results


@pytest.fixture(scope="module")
def sp_results():
    """{case: (loss, grads)} at W = 4 for every runnable case, all in one run_ranks call."""
    runnable = [c for c in CASES if _runnable(c) is None]
    per_rank = run_ranks(W, _rank_cases, runnable, _models(), _inputs())
    return dict(zip(runnable, per_rank[0]))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sequence_parallel_matches_one_process(case, sp_results):
    family, linear, softmax, layout, dtype = case
    reason = _runnable(case)
    if reason is not None:
        pytest.skip(reason)                                             # an engine not in this checkout
    model = _models()[family].to(dtype)
    ref_loss, ref_grads = _loss_and_grads(model, _inputs(), torch.arange(T), lambda x: x)
    loss, grads = sp_results[case]
    grads = {n: torch.from_numpy(g) for n, g in grads.items()}
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert abs(loss - ref_loss) <= tol * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, f"{name} got no gradient"
        assert rel_err(grads[name], ref) < tol, f"{name}: rel err {rel_err(grads[name], ref):.2e}"


@pytest.mark.parametrize("family", FAMILIES)
def test_recurrent_decoding_continues_parallel_prefill(family):
    model = _models()[family].eval()
    tokens = _inputs()["tokens"]
    with torch.no_grad():
        full = model.logits(model(tokens, torch.arange(T)))
        cache = model.new_cache()
        steps = [model.logits(model(tokens[:, :T // 2], torch.arange(T // 2), cache=cache))]
        for t in range(T // 2, T):
            steps.append(model.logits(model(tokens[:, t:t + 1], torch.tensor([t]), cache=cache)))
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-10
    linear_states = [c["state"] for c in cache if "state" in c]
    assert linear_states and all(s.dtype == torch.float64 and s.dim() == 4 for s in linear_states)


def test_greedy_generation_follows_full_forward_argmax():
    model = _models()["hybrid"].eval()
    out = generate(model, _inputs()["tokens"][:, :5], 6, temperature=0)
    with torch.no_grad():
        logits = model.logits(model(out[:, :-1], torch.arange(out.shape[1] - 1)))
    assert torch.equal(out[:, 5:], logits[:, 4:].argmax(-1))


def test_chunked_cross_entropy_matches_dense_loss():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 13), generator=g)
    labels[0, 2] = -100
    loss_mask = torch.rand(2, 13, generator=g) > 0.3
    loss, count = chunked_cross_entropy(hidden, weight, labels, loss_mask, chunk_tokens=5)
    valid = (labels >= 0) & loss_mask
    dense = F.cross_entropy((hidden @ weight.t())[valid], labels[valid], reduction="sum")
    assert count.item() == valid.sum().item() and rel_err(loss, dense) < 1e-13
    for a, b in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(dense, (hidden, weight))):
        assert rel_err(a, b) < 1e-13


def _expected_params(cfg):
    """Closed-form parameter counts, independent of the model code."""
    D = cfg.dim
    if isinstance(cfg, TNLConfig):
        return cfg.vocab_size * D + cfg.n_layers * (5 * D * D + 3 * D * cfg.glu_dim) + D  # + LRPE θ (H·d = D)
    d = D // cfg.n_heads
    mixer = {"L": 5 * D * D + d, "N": 2 * D * D + 2 * D * cfg.n_kv_heads * d}
    per_layer = sum(mixer[k] + 2 * D + 3 * D * cfg.ffn_dim for k in cfg.layer_types())
    return 2 * cfg.vocab_size * D + D + per_layer


def _count(name_or_cfg):
    model = models.build_model(name_or_cfg, device="meta")
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_meta_parameter_counts(name):
    assert _count(name) == _expected_params(models.get_config(name))


def test_parameter_counts_match_the_papers():
    assert abs(_count("tnl-1b") / 1.0e9 - 1) < 0.03
    assert abs(_count("tnl-7b") / 6.8e9 - 1) < 0.03
    # the Linear-Llama3-8B backbone is Llama-3-8B (8.03B); its linear layers add 2.5·D² each (q, k, v, gate, out)
    llama3_8b = dataclasses.replace(models.get_config("linear-llama3-8b"), pattern="N")
    assert abs(_count(llama3_8b) / 8.03e9 - 1) < 0.01
    assert _count("linear-llama3-8b") == _count(llama3_8b) + 32 * (5 * 4096 ** 2 + 128 - 2.5 * 4096 ** 2)


def test_tnl_decay_follows_the_release():
    assert alibi_slopes(8) == [2.0 ** (-(h + 1)) for h in range(8)]
    assert alibi_slopes(20)[:16] == alibi_slopes(16) and alibi_slopes(20)[16:] == alibi_slopes(32)[0:8:2]
    ld = lightning_log_decay(4, 1, 3)
    assert torch.allclose(ld, -torch.tensor(alibi_slopes(4)) * (0.5 + 1e-5))
    model = models.build_model(FAMILIES["tnl"])
    assert model.layers[0].mixer.lrpe is not None and all(l.mixer.lrpe is None for l in model.layers[1:])
    assert not any("norm" in n for n, _ in model.named_parameters())    # SRMSNorm has no weight


def test_save_and_load_round_trip(tmp_path):
    model = _models()["tnl"]
    path = tmp_path / "model.pt"
    models.save_model(path, model)
    assert os.listdir(tmp_path) == ["model.pt"]                         # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["model_config"]["family"] == "tnl" and payload["model_config"]["dim"] == 64
    loaded = models.load_model(path, config=FAMILIES["tnl"])
    assert models.build_model(models.config_to_dict(model), device="meta").config == FAMILIES["tnl"]
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_generate_command_line(tmp_path, capsys):
    from launch.generate import main
    models.save_model(tmp_path / "model.pt", _models()["hybrid"].float())
    text = main([str(tmp_path), "--prompt", "1, 2, 3", "--max-new-tokens", "4", "--temperature", "0"])
    ids = [int(t) for t in text.split()]
    assert ids[:3] == [1, 2, 3] and len(ids) == 7 and capsys.readouterr().out.strip() == text
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        main([str(tmp_path / "model.pt"), "--prompt", "5 500"])


def test_generate_with_a_sentencepiece_tokenizer(tmp_path):
    import sentencepiece
    from launch.generate import main
    lines = ["to be or not to be that is the question whether tis nobler in the mind to suffer"] * 20
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=40, model_type="bpe", minloglevel=2)
    models.save_model(tmp_path / "model.pt", _models()["tnl"])         # vocab 101 covers the 40 pieces
    text = main([str(tmp_path / "model.pt"), "--tokenizer", str(tmp_path / "sp.model"), "--prompt", "to be",
                 "--max-new-tokens", "5", "--top-k", "5"])
    assert isinstance(text, str) and text.startswith("to be")


# ------------------------------------------------------------------------------------------------ bad input
def test_unknown_names_raise():
    with pytest.raises(ValueError, match="tnl-1b"):
        models.get_config("tnl-13b")
    with pytest.raises(ValueError, match="linear-llama3-1b"):
        models.build_model("llama-1b", device="meta")
    model = models.build_model(FAMILIES["hybrid"])
    with pytest.raises(ValueError, match=r"\('lasp2', 'lasp1'\)"):
        apply_sequence_parallel(model, linear="lasp3")
    with pytest.raises(ValueError, match=r"\('allgather', 'ring', 'ulysses', 'local'\)"):
        apply_sequence_parallel(model, softmax="flash")
    with pytest.raises(ValueError, match="contiguous"):
        apply_sequence_parallel(model, linear="lasp1", layout="zigzag")
    with pytest.raises(ValueError, match="feature_map"):
        LinearLlamaConfig(feature_map="relu")
    with pytest.raises(ValueError, match="linear_decay"):
        LinearLlamaConfig(linear_decay="gla")


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="'L'.*'N'"):
        LinearLlamaConfig(pattern="LLXN")
    with pytest.raises(ValueError, match="tile n_layers=16"):
        LinearLlamaConfig(pattern="LLN")
    with pytest.raises(ValueError, match="n_heads=7 must divide dim=64"):
        LinearLlamaConfig(dim=64, n_heads=7)
    with pytest.raises(ValueError, match="n_heads=6 must divide dim=64"):
        TNLConfig(dim=64, n_heads=6)
    with pytest.raises(ValueError, match="n_kv_heads=3"):
        LinearLlamaConfig(n_kv_heads=3)
    model = models.build_model(FAMILIES["tnl"])
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(2, 8, dtype=torch.long), torch.arange(7))
    apply_sequence_parallel(model, layout="zigzag")                     # one process: lasp2 with no group
    with pytest.raises(ValueError, match="zigzag"):
        model(torch.zeros(1, 7, dtype=torch.long), torch.arange(7))


def test_checkpoint_from_another_config_raises(tmp_path):
    path = tmp_path / "model.pt"
    models.save_model(path, models.build_model(FAMILIES["tnl"]))
    with pytest.raises(ValueError, match=r"dim=64 \(expected 128\)"):
        models.load_model(path, config="tnl-tiny")
    with pytest.raises(ValueError, match="family"):
        models.load_model(path, config="linear-llama3-tiny")
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["glu_dim"] = 80                             # weights no longer fit the config
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not fit"):
        models.load_model(path)


def test_models_never_import_distributed_code():
    pattern = re.compile(r"torch\.distributed\.|^\s*(from|import)\s+(torch\.distributed|parallel|lasp)\b",
                         re.MULTILINE)
    files = sorted((pathlib.Path(models.__file__).parent).glob("*.py"))
    assert files and not [str(f) for f in files if pattern.search(f.read_text())]


def test_lasp_exports_apply():
    assert lasp.apply_sequence_parallel is apply_sequence_parallel and hasattr(lasp, "lasp2")
