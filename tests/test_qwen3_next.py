"""Qwen3-Next (models/qwen3_next.py) against transformers' Qwen3NextForCausalLM with converted weights, conversion
round trips, packed documents, recurrent decoding."""
import dataclasses

import pytest
import torch

from lasp import models
from lasp.models import hf_qwen3_next as hf
from lasp.models.generation import generate
from tests.dist import run_ranks
from tests.test_launch import _rel, _train_curves, cache_dir, tiny  # noqa: F401  (cache_dir: a fixture)

TINY = dict(vocab_size=97, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, linear_key_heads=2,
            linear_value_heads=4, linear_key_dim=16, linear_value_dim=8, ffn_dim=96)


def _model(dtype=torch.float32, seed=0, **fields):
    torch.manual_seed(seed)
    cfg = models.Qwen3NextConfig(**{**TINY, **fields})
    model = models.build_model(cfg).to(dtype)
    with torch.no_grad():                   # norms start at 0 / 1: perturb them so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _transformers_model(model):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3NextConfig(**hf.config_to_hf(model.config))
    cfg._attn_implementation = "eager"
    theirs = transformers.Qwen3NextForCausalLM(cfg).to(next(model.parameters()).dtype).eval()
    missing, unexpected = theirs.load_state_dict(hf.state_to_hf(model.config, model.state_dict()), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return theirs


@pytest.mark.parametrize("fields", [{}, dict(n_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48)],
                         ids=["dense", "moe"])
def test_logits_equal_transformers(fields):
    model = _model(**fields).eval()
    theirs = _transformers_model(model)
    tokens = torch.randint(0, 97, (2, 70))                                  # > one 64-token chunk of theirs
    with torch.no_grad():
        ours = model.logits(model(tokens, torch.arange(70)))
        ref = theirs(input_ids=tokens).logits
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err


def test_conversion_round_trip_is_identity():
    model = _model(n_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48)
    state = model.state_dict()
    back = hf.state_from_hf(model.config, hf.state_to_hf(model.config, state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert hf.config_from_hf(hf.config_to_hf(model.config)) == model.config


def test_config_from_hf_refuses_what_it_cannot_build():
    d = hf.config_to_hf(models.Qwen3NextConfig(**TINY, n_experts=4, top_k=2))
    with pytest.raises(ValueError, match="mlp_only_layers"):
        hf.config_from_hf({**d, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="layer_types"):
        hf.config_from_hf({**d, "layer_types": ["full_attention"] + d["layer_types"][1:]})
    with pytest.raises(ValueError, match="model_type"):
        hf.config_from_hf({**d, "model_type": "llama"})


def test_packed_documents_equal_each_document_alone():
    model = _model(torch.float64)
    lengths = [5, 1, 13, 9]
    tokens = torch.randint(0, 97, (1, sum(lengths)))
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    pos = torch.cat([torch.arange(n) for n in lengths])
    with torch.no_grad():
        packed = model(tokens, pos, seg)
        alone = torch.cat([model(t, torch.arange(t.shape[1])) for t in tokens.split(lengths, dim=1)], dim=1)
    assert ((packed - alone).norm() / alone.norm()).item() < 1e-10


def test_recurrent_decoding_continues_the_prefill():
    model = _model(torch.float64).eval()
    prompt = torch.randint(0, 97, (2, 7))
    out = generate(model, prompt, 6, temperature=0)
    with torch.no_grad():
        full = model.logits(model(out[:, :-1], torch.arange(out.shape[1] - 1)))
    assert torch.equal(full[:, 6:].argmax(-1), out[:, 7:])                 # greedy picks agree
    cache = model.new_cache()
    with torch.no_grad():
        model(out[:, :7], torch.arange(7), cache=cache)
        step = model(out[:, 7:8], torch.tensor([7]), cache=cache)
        ref = model(out[:, :8], torch.arange(8))[:, 7:]
    assert ((step - ref).norm() / ref.norm()).item() < 1e-12


def test_published_shape_parameter_count():
    transformers = pytest.importorskip("transformers")
    ours = models.build_model("qwen3-next-80b-a3b", device="meta")
    cfg = transformers.Qwen3NextConfig(**hf.config_to_hf(ours.config))
    with torch.device("meta"):
        theirs = transformers.Qwen3NextForCausalLM(cfg)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters())
    assert 79e9 < n < 81e9, n


def test_sp4_zigzag_equals_sp1_through_the_launcher(tmp_path, cache_dir):
    """qwen3-next-tiny (Gated DeltaNet under LASP-2 with beta=, its convolution's halo, gated softmax layers
    under the all-gather engine) at SP = 4 zigzag equals SP = 1 for 3 steps, fp32."""
    flags = ("--model", "qwen3-next-tiny", "--max-steps", "3")
    one = run_ranks(1, _train_curves, tiny(tmp_path / "sp1", cache_dir, "--sp", "1", *flags))[0]
    four = run_ranks(4, _train_curves, tiny(tmp_path / "sp4", cache_dir, "--sp", "4", "--parallel.layout", "zigzag",
                                            *flags))
    assert len(one[0]) == 3 and all(f == four[0] for f in four)
    assert _rel(four[0][0], one[0]) < 1e-5 and _rel(four[0][1], one[1]) < 1e-5
    assert type(models.load_model(tmp_path / "sp4" / "model.pt")).__name__ == "Qwen3Next"


def test_tensor_parallel_refuses_layers_it_does_not_split():
    from lasp.parallel.tensor import check_tensor_parallel
    with pytest.raises(ValueError, match="delta-rule .* tp=1"):
        check_tensor_parallel(models.build_model("qwen3-next-tiny", device="meta"), 2)
    with pytest.raises(ValueError, match="short convolution"):
        check_tensor_parallel(models.build_model(models.LinearLlamaConfig(**{**dataclasses.asdict(
            models.get_config("linear-llama3-tiny")), "short_conv": 4}), device="meta"), 2)
    assert check_tensor_parallel(models.build_model("qwen3-next-tiny", device="meta"), 1) >= 0


def test_convert_command_both_ways_through_transformers(tmp_path):
    """model.pt -> `python -m lasp.launch.convert --family qwen3-next --to hf` -> transformers' from_pretrained:
    equal logits; and the folder back (`--to lasp`) is the same model (what --model.init_from reads)."""
    transformers = pytest.importorskip("transformers")
    from lasp.launch.convert import main as convert
    model = _model(n_experts=4, top_k=2, expert_dim=32, shared_expert_dim=48).eval()
    models.save_model(tmp_path / "model.pt", model)
    convert(["--family", "qwen3-next", "--to", "hf", str(tmp_path / "model.pt"), str(tmp_path / "hf")])
    theirs = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    convert(["--family", "qwen3-next", "--to", "lasp", str(tmp_path / "hf"), str(tmp_path / "back.pt")])
    back = models.load_model(tmp_path / "back.pt").eval()
    tokens = torch.randint(0, 97, (1, 33))
    with torch.no_grad():
        ours = model.logits(model(tokens, torch.arange(33)))
        again = back.logits(back(tokens, torch.arange(33)))
        ref = theirs(input_ids=tokens).logits
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.equal(ours, again)
