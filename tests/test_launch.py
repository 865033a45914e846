"""The pretraining launcher: config and command line, data packing and sharding, checkpoints, and training on
gloo ranks (SP = 4 equals SP = 1, ZeRO-2 equals DDP, kill + resume equals an uninterrupted run, NaN stops the run
with the last good checkpoint intact), bad input exits with code 2, the Slurm dry run, one torchrun smoke run."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lasp.launch import checkpoint as ckpt
from lasp import models
from lasp.launch.config import TrainConfig, _field_help, build_parser, check_config, merge, model_changes, parse_args
from lasp.launch.data import PackedDataset, build_cache, load_tokenizer, shard_batch
from lasp.launch.engine import lr_at
from lasp.launch.pretrain import main
from lasp.launch.trainer import NonFiniteStep, train
from tests.dist import run_ranks

REPO = Path(__file__).resolve().parents[1]

# The command line is a reviewed interface: a new flag must be added here on purpose.
FROZEN_OPTIONS = {
    "-h", "--help", "--config", "--dry-run", "--world-size", "--nproc", "--model", "--sp", "--tp", "--ep", "--zero",
    "--max-steps", "--run-dir", "--resume", "--model.preset", "--model.init_from",
    "--parallel.sp", "--parallel.tp", "--parallel.layout", "--parallel.linear", "--parallel.softmax", "--parallel.zero",
    "--parallel.activation_checkpointing", "--parallel.ep",
    "--optim.lr", "--optim.min_lr", "--optim.warmup_steps", "--optim.max_steps", "--optim.weight_decay",
    "--optim.beta1", "--optim.beta2", "--optim.eps", "--optim.grad_clip",
    "--data.corpus", "--data.text_key", "--data.vocab_size", "--data.seq_len", "--data.batch_size", "--data.seed",
    "--data.cache_dir", "--data.mqar", "--data.prepared", "--data.indexed", "--data.tokenizer", "--data.inline_max_mb",
    "--checkpoint.every", "--checkpoint.keep", "--checkpoint.resume", "--checkpoint.dir", "--checkpoint.allow_changes",
    "--run.dir", "--run.seed", "--run.dtype", "--run.progress", "--run.peak_flops", "--run.wandb_project",
    "--run.wandb_mode", "--run.sample_tokens", "--run.sample_prompt",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tokenizer cache for the module (each vocabulary is trained once, in about a second)."""
    return str(tmp_path_factory.mktemp("tokenizer-cache"))


def tiny(run_dir, cache_dir, *args):
    """The tiny preset (launch/configs/tiny.toml), fp32 on CPU, no sample, plus command-line overrides."""
    cfg, _ = parse_args(["--config", "tiny", "--run-dir", str(run_dir), "--data.cache_dir", cache_dir,
                         "--run.sample_tokens", "0", *args])
    return cfg


def _train_rank(cfg, hook=None):
    return train(cfg, hook)["losses"]


def _train_curves(cfg):
    """(losses, pre-clip gradient norms): equal losses alone would miss a constant gradient scale (Adam and
    clipping are blind to it), the norms do not."""
    out = train(cfg)
    return list(out["losses"].values()), list(out["grad_norms"].values())


def _rel(a, b):
    a, b = np.array(a, dtype=np.float64), np.array(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------- config
def _model_flag_help(parser):
    """{--model.<field>: help} of the flags add_model_flags generated (not --model.preset / --model.init_from)."""
    return {a.option_strings[0]: a.help for a in parser._actions if a.option_strings and
            a.option_strings[0].startswith("--model.") and a.option_strings[0] not in FROZEN_OPTIONS}


@pytest.mark.parametrize("preset", ["linear-llama3-tiny", "tnl-tiny", "bam-moe-tiny"])
def test_command_line_options_are_frozen(preset):
    """The hand-made options are frozen; the model's are exactly the fields of the preset family's dataclass (less
    vocab_size, which data.vocab_size sets), each with help."""
    options = {s for a in build_parser(preset)._actions for s in a.option_strings}
    generated = _model_flag_help(build_parser(preset))
    assert options - set(generated) == FROZEN_OPTIONS, f"added {options - set(generated) - FROZEN_OPTIONS}, " \
                                                       f"removed {FROZEN_OPTIONS - options}"
    fields = {f"--model.{f.name}" for f in dataclasses.fields(models.get_config(preset))} - {"--model.vocab_size"}
    assert set(generated) == fields and all(generated.values())


@dataclasses.dataclass
class _WiderConfig(models.LinearLlamaConfig):
    new_knob: int = 3  # a field the parser has never seen


def test_a_new_model_field_is_a_flag_everywhere_without_parser_edits(monkeypatch):
    """A field added to a family's dataclass is a typed, documented flag of pretrain, bench, plan_memory and mqar."""
    from lasp.launch import bench, mqar, plan_memory
    get_config = models.get_config
    monkeypatch.setattr(models, "get_config", lambda name: _WiderConfig() if name == "wider" else get_config(name))
    helps = _model_flag_help(build_parser("wider"))
    assert helps["--model.new_knob"] == "a field the parser has never seen (default: 3)"
    inherited = _field_help(models.LinearLlamaConfig)["pattern"]               # the base's comments stay the help
    assert inherited and helps["--model.pattern"].startswith(inherited)
    cfg, _ = parse_args(["--model", "wider", "--model.new_knob", "5", "--model.n_layers", "4"])
    assert (cfg.model.arch.new_knob, type(cfg.model.arch)) == (5, _WiderConfig)
    assert model_changes(cfg.model) == {"new_knob": 5, "n_layers": 4}
    with pytest.raises(SystemExit):                                       # typed: "five" is not an int
        parse_args(["--model", "wider", "--model.new_knob", "five"])
    monkeypatch.setattr(mqar, "PRESET", "wider")
    for args in (bench.parse_args(["--preset", "wider", "--model.new_knob", "5"]),
                 plan_memory.parse_args(["--preset", "wider", "--seq-len", "64", "--model.new_knob", "5"]),
                 mqar.parse_args(["--model.new_knob", "5"])):
        assert (type(args.model.arch), args.model.arch.new_knob, args.model.preset) == (_WiderConfig, 5, "wider")


def test_config_precedence_and_types(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[optim]\nlr = 1\nmax_steps = 7\n[model]\nn_layers = 8\nn_kv_heads = 2\nrope_base = 10000\n')
    cfg, dry = parse_args(["--config", str(toml), "--max-steps", "9", "--parallel.activation_checkpointing",
                           "false", "--data.corpus", "a.txt", "b.jsonl"])
    assert (cfg.optim.lr, cfg.optim.max_steps, dry) == (1.0, 9, False)     # int -> float; CLI over TOML
    assert model_changes(cfg.model) == {"n_layers": 8, "n_kv_heads": 2, "rope_base": 10000.0}
    assert type(cfg.model.arch.rope_base) is float and cfg.data.corpus == ["a.txt", "b.jsonl"]
    assert cfg.parallel.activation_checkpointing is False and cfg.parallel.sp == TrainConfig().parallel.sp
    cfg, _ = parse_args(["--config", str(toml), "--model.n_layers", "12", "--model", "linear-llama3-tiny-gated"])
    assert model_changes(cfg.model) == {"n_layers": 12, "n_kv_heads": 2, "rope_base": 10000.0}  # TOML fields
    assert cfg.model.arch.linear_decay == "gated" and cfg.model.arch.n_layers == 12       # carried to the CLI's preset
    cfg.model.preset = "tnl-tiny"                                                         # not through merge
    with pytest.raises(ValueError, match="model.arch is a LinearLlamaConfig, preset 'tnl-tiny' is a TNLConfig"):
        check_config(cfg, world_size=1)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        merge(TrainConfig(), {"optim": {"lrr": 1}}, "x.toml")
    with pytest.raises(ValueError, match="'optim.max_steps' must be int"):
        merge(TrainConfig(), {"optim.max_steps": 1.5}, "x.toml")
    with pytest.raises(ValueError, match="model.vocab_size in x.toml: the vocabulary comes from data.vocab_size"):
        merge(TrainConfig(), {"model": {"vocab_size": 64}}, "x.toml")
    with pytest.raises(ValueError, match="'model.n_layers' must be int, got 2.5"):
        merge(TrainConfig(), {"model": {"n_layers": 2.5}}, "x.toml")


def test_lr_warmup_then_cosine():
    o = TrainConfig().optim
    o.lr, o.min_lr, o.warmup_steps, o.max_steps = 1.0, 0.1, 4, 14
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, o) == pytest.approx(0.55) and lr_at(14, o) == pytest.approx(0.1)
    assert lr_at(40, o) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- data
def _synthetic_cache(path, doc_lengths):
    tokens = np.concatenate([np.arange(10 + 100 * d, 10 + 100 * d + n) for d, n in enumerate(doc_lengths)])
    doc_ids = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
    path.mkdir()
    np.save(path / "tokens.npy", tokens.astype(np.int32))
    np.save(path / "doc_ids.npy", doc_ids.astype(np.int32))
    return tokens


def test_packing_keeps_document_boundaries(tmp_path):
    tokens = _synthetic_cache(tmp_path / "c", [5, 9, 3, 20])                # 37 tokens -> 4 sequences of 8
    ds = PackedDataset(tmp_path / "c", seq_len=8)
    assert ds.n_sequences == 4
    s = ds.sequence(0)
    assert s["tokens"].tolist() == tokens[:8].tolist() and s["labels"].tolist() == tokens[1:9].tolist()
    assert s["segment_ids"].tolist() == [0] * 5 + [1] * 3
    assert s["loss_mask"].tolist() == [True] * 4 + [False] + [True] * 3    # token 4 -> first token of doc 1
    a, b = ds.batch(0, 0, 2, 2), ds.batch(0, 1, 2, 2)                       # two dp ranks: 4 distinct sequences
    firsts = {tuple(x) for x in torch.cat([a["tokens"], b["tokens"]]).tolist()}
    assert len(firsts) == 4 and torch.equal(ds.batch(0, 1, 2, 2)["tokens"], b["tokens"])
    assert not torch.equal(ds.batch(1, 0, 2, 2)["tokens"], a["tokens"])    # next epoch: a new permutation


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_batch_moves_labels_masks_positions_with_tokens(tmp_path, layout):
    _synthetic_cache(tmp_path / "c", [7, 30, 40])
    batch = PackedDataset(tmp_path / "c", seq_len=16).batch(0, 0, 1, 2)
    shards = [shard_batch(batch, layout, r, 4) for r in range(4)]
    pos = torch.cat([s["positions"] for s in shards])
    assert sorted(pos.tolist()) == list(range(16))
    for key in ("tokens", "labels", "segment_ids", "loss_mask"):
        assert torch.equal(torch.cat([s[key] for s in shards], 1), batch[key][:, pos]), key


def test_tokenizer_round_trip_and_cache(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Doc {i}: to be, or not to be;\n  that is {i}."})
                                for i in range(200)))
    first = build_cache([corpus], "text", 64, tmp_path / "cache" / "k")
    stamp = (first / "tokens.npy").stat().st_mtime_ns
    assert build_cache([corpus], "text", 64, first) == first and (first / "tokens.npy").stat().st_mtime_ns == stamp
    sp = load_tokenizer(first)
    text = "Doc 7: to be, or not to be;\n  that is 7."
    assert sp.decode(sp.encode(text)) == text                               # newlines and spaces survive
    assert np.load(first / "tokens.npy").tolist().count(sp.eos_id()) == 200  # one EOS per document


# ---------------------------------------------------------------------------------------------- checkpoints
def _solo_barrier(error=None):
    if error is not None:
        raise error


def test_checkpoint_verify_refuses_corruption(tmp_path):
    def write(folder):
        torch.save({"w": torch.ones(100)}, folder / "a.pt")
    folder = ckpt.save(tmp_path, 3, write, rank=0, barrier=_solo_barrier)
    assert ckpt.latest(tmp_path) == folder and "a.pt" in ckpt.verify(folder)
    data = (folder / "a.pt").read_bytes()
    (folder / "a.pt").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=f"{len(data) - 1} bytes.*truncated"):
        ckpt.verify(folder)
    (folder / "a.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum of a.pt"):
        ckpt.verify(folder)
    (folder / ckpt.MANIFEST).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.verify(folder)


# ---------------------------------------------------------------------------------------------- training
def test_sp4_equals_sp1(tmp_path, cache_dir):
    one = run_ranks(1, _train_curves, tiny(tmp_path / "sp1", cache_dir, "--sp", "1"))[0]
    four = run_ranks(4, _train_curves, tiny(tmp_path / "sp4", cache_dir, "--sp", "4", "--parallel.layout", "zigzag"))
    assert len(one[0]) == 10 and all(f == four[0] for f in four)
    assert _rel(four[0][0], one[0]) < 1e-5 and _rel(four[0][1], one[1]) < 1e-5
    assert one[0][-1] < one[0][0] - 0.1                                     # and it learns


def test_sp4_zigzag_equals_sp1_with_short_conv(tmp_path, cache_dir):
    """--model.short_conv 4 (a generated flag) through the launcher: SP = 4 zigzag equals SP = 1 for 3 steps."""
    assert "--model.short_conv" in {s for a in build_parser("linear-llama3-tiny")._actions for s in a.option_strings}
    flags = ("--model.short_conv", "4", "--max-steps", "3")
    one = run_ranks(1, _train_curves, tiny(tmp_path / "sp1", cache_dir, "--sp", "1", *flags))[0]
    four = run_ranks(4, _train_curves, tiny(tmp_path / "sp4", cache_dir, "--sp", "4", "--parallel.layout", "zigzag",
                                            *flags))
    assert len(one[0]) == 3 and all(f == four[0] for f in four)
    assert _rel(four[0][0], one[0]) < 1e-5 and _rel(four[0][1], one[1]) < 1e-5
    saved = models.load_model(tmp_path / "sp4" / "model.pt")               # the convolutions are in the model
    assert saved.config.short_conv == 4 and "layers.0.mixer.qkv_conv.weight" in saved.state_dict()


def _first_loss_from(cfg, path):
    """Save a freshly built model (seed 7) to `path`, then train one step starting from it."""
    from lasp import models
    from lasp.launch.engine import build_model
    torch.manual_seed(7)
    model = build_model(cfg.model, cfg.data.vocab_size, seed=7)
    models.save_model(path, model)
    cfg.model.init_from = str(path)
    return train(cfg)["losses"]


def test_init_from_starts_from_the_saved_weights(tmp_path, cache_dir):
    """--model.init_from loads the file's weights: the first loss differs from the seed-0 init and equals a run
    whose own init is that file's (seed 7)."""
    steps = ("--max-steps", "1")
    from_file = run_ranks(2, _first_loss_from, tiny(tmp_path / "a", cache_dir, "--sp", "2", *steps), tmp_path / "m.pt")
    fresh = run_ranks(1, _train_rank, tiny(tmp_path / "b", cache_dir, *steps))[0]
    seeded = run_ranks(1, _train_rank, tiny(tmp_path / "c", cache_dir, "--run.seed", "7", *steps))[0]
    assert from_file[0] == from_file[1]
    assert abs(from_file[0][1] - seeded[1]) < 1e-5 * abs(seeded[1]) and from_file[0][1] != fresh[1]


def test_zero_equals_ddp_and_dp_averages(tmp_path, cache_dir):
    import deepspeed  # noqa: F401 - imported once here, before the ranks fork
    args = ("--max-steps", "3")
    dp2 = run_ranks(2, _train_curves, tiny(tmp_path / "dp2", cache_dir, "--sp", "1", *args))[0]
    ddp = run_ranks(4, _train_curves, tiny(tmp_path / "ddp", cache_dir, "--sp", "2", *args))[0]
    assert _rel(ddp[0], dp2[0]) < 1e-5 and _rel(ddp[1], dp2[1]) < 1e-5     # dp 2 x sp 2 = dp 2 x sp 1
    for stage in ("2", "3"):
        zero = run_ranks(4, _train_curves, tiny(tmp_path / f"z{stage}", cache_dir, "--sp", "2", "--zero", stage,
                                                *args))[0]
        assert _rel(zero[0], ddp[0]) < 1e-5 and _rel(zero[1], ddp[1]) < 1e-5, stage


def _sigterm_at(step):
    def hook(s, model):
        if s == step and torch.distributed.get_rank() == 1:                # one rank gets it; all must stop
            os.kill(os.getpid(), signal.SIGTERM)
    return hook


def test_kill_and_resume_matches_uninterrupted(tmp_path, cache_dir):
    args = ("--sp", "2", "--max-steps", "6", "--checkpoint.every", "2")
    full = run_ranks(2, _train_rank, tiny(tmp_path / "full", cache_dir, *args))[0]
    cut = tiny(tmp_path / "cut", cache_dir, *args)
    first = run_ranks(2, _train_rank, cut, _sigterm_at(3))[0]
    assert sorted(first) == [1, 2, 3]
    assert ckpt.latest(tmp_path / "cut" / "checkpoints").name == "step_00000003"
    cut.checkpoint.resume = True
    rest = run_ranks(2, _train_rank, cut)[0]
    assert sorted(rest) == [4, 5, 6]
    assert {**first, **rest} == full                                        # bitwise
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and (tmp_path / "cut" / "loss.png").exists()


def test_corrupt_checkpoint_is_refused(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    run_ranks(1, _train_rank, tiny(run_dir, cache_dir, "--max-steps", "2"))
    model_file = run_dir / "checkpoints" / "step_00000002" / "model.pt"
    data = model_file.read_bytes()
    model_file.write_bytes(data[:-10])
    argv = ["--config", "tiny", "--run-dir", str(run_dir), "--data.cache_dir", cache_dir, "--max-steps", "4",
            "--resume"]
    assert main(argv) == 2
    assert "truncated" in capsys.readouterr().err
    model_file.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert main(argv) == 2
    assert "checksum of model.pt does not match" in capsys.readouterr().err
    assert not (run_dir / "checkpoints" / "step_00000004").exists()


def _train_until_nan(cfg):
    def poison(step, model):
        if step == 5:
            with torch.no_grad():
                model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    try:
        train(cfg, poison)
    except NonFiniteStep as e:
        return str(e)
    return None


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, cache_dir):
    cfg = tiny(tmp_path / "run", cache_dir, "--sp", "2", "--checkpoint.every", "2")
    messages = run_ranks(2, _train_until_nan, cfg)
    assert all(m and "non-finite loss" in m and "at step 5" in m and "step_00000004" in m for m in messages)
    root = tmp_path / "run" / "checkpoints"
    assert ckpt.latest(root).name == "step_00000004" and ckpt.verify(ckpt.latest(root))
    assert not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, env, message", [
    (["--data.corpus", "/no/such/corpus.txt"], {}, "no such file or folder"),
    (["--data.corpus", "EMPTY"], {}, "corpus is empty"),
    (["--sp", "3"], {"RANK": "0", "WORLD_SIZE": "4"}, "not divisible by sp=3"),
    (["--sp", "4", "--data.seq_len", "100", "--parallel.layout", "zigzag"], {"RANK": "0", "WORLD_SIZE": "4"},
     "does not split into 8 equal chunks"),
    (["--model", "no-such-model"], {}, "model.preset: unknown model preset 'no-such-model'"),
    (["--config", "BADKEY"], {}, "unknown config key 'optim.lrr' in .*bad.toml"),
    (["--model.overrides", '{"n_layers": 2}'], {}, "write the model's fields directly, e.g. --model.n_layers 8"),
    (["--config", "OVERRIDES"], {}, "model.overrides in .*overrides.toml: there is no overrides table"),
    (["--model.vocab_size", "64"], {}, "--model.vocab_size: the vocabulary comes from data.vocab_size"),
    (["--config", "FIELDZ"], {}, "unknown model fields \\['n_layerz'\\] .*LinearLlamaConfig has \\[.*'n_layers'"),
    (["--model.n_heads", "3"], {}, "model.n_heads=3 .*do not fit preset 'linear-llama3-tiny': n_heads=3 must divide"),
    (["--model", "tnl-tiny"], {}, "unknown model fields \\['ffn_dim', 'n_kv_heads'\\] for preset 'tnl-tiny'"),
    (["--optim.lr", "inf"], {}, "optim.lr must be a finite number in \\[0, 1\\], got inf"),
    (["--optim.lr", "1e9"], {}, "optim.lr must be a finite number in \\[0, 1\\], got 1000000000.0"),
    (["--optim.min_lr", "nan"], {}, "optim.min_lr must be a finite number .*got nan"),
    (["--optim.eps", "0"], {}, "optim.eps must be a finite number"),
    (["--optim.beta2", "1"], {}, "optim.beta2 must be a finite number"),
    (["--optim.grad_clip", "1e7"], {}, "optim.grad_clip must be a finite number"),
])
def test_bad_input_exits_2_before_any_group(tmp_path, monkeypatch, capsys, argv, env, message):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "bad.toml").write_text("[optim]\nlrr = 1\n")
    (tmp_path / "overrides.toml").write_text("[model]\noverrides = { n_layers = 2 }\n")
    (tmp_path / "fieldz.toml").write_text("[model]\nn_layerz = 2\n")
    files = {"EMPTY": "empty.txt", "BADKEY": "bad.toml", "OVERRIDES": "overrides.toml", "FIELDZ": "fieldz.toml"}
    argv = [str(tmp_path / files[a]) if a in files else a for a in argv]
    for k, v in env.items():                          # a world of 4 with no rendezvous: any group work would hang
        monkeypatch.setenv(k, v)
    assert main(["--config", "tiny", "--run-dir", str(tmp_path / "run"), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not torch.distributed.is_initialized()


def test_unknown_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--optim.lrr", "1"])
    assert e.value.code == 2 and "--optim.lrr" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- launchers
def test_dry_run_prints_mesh(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert main(["--dry-run", "--sp", "4"]) == 2                           # no MASTER_ADDR / MASTER_PORT
    assert "MASTER_ADDR and MASTER_PORT" in capsys.readouterr().err
    monkeypatch.setenv("MASTER_ADDR", "node01")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert main(["--dry-run", "--sp", "4"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = dp 2 x sp 4; 2 node(s) x 4 rank(s)" in out
    assert "sp groups: [[0, 1, 2, 3], [4, 5, 6, 7]]" in out and "dp groups: [[0, 4], [1, 5], [2, 6], [3, 7]]" in out


def test_sbatch_dry_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_SUBMIT_DIR=str(REPO), NPROC_PER_NODE="4", DRY_RUN="1", PYTHON=sys.executable)
    out = subprocess.run(["bash", str(REPO / "launch/slurm/pretrain.sbatch"), "--sp", "4"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rendezvous gpu07:" in out.stdout and f":{20000 + 4242 % 20000}" in out.stdout
    assert "world 8 = dp 2 x sp 4; 2 node(s) x 4 rank(s)" in out.stdout and "dry run OK" in out.stdout


def test_torchrun_smoke(tmp_path, cache_dir):
    """The real entry point: 2 ranks, sp 2, 3 steps, wandb offline; metrics, plot, model.pt, a sample and the
    summary. Then the
    same command again refuses the folder (no --resume): one message, worker exit code 2 in torchrun's summary."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "launch/pretrain.py",
           "--config", "tiny", "--sp", "2", "--max-steps", "3", "--run-dir", str(run_dir),
           "--data.cache_dir", cache_dir, "--run.wandb_project", "lasp-test", "--run.wandb_mode", "offline"]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(rows[0])
    assert (run_dir / "loss.png").stat().st_size > 1000 and list((run_dir / "wandb").glob("offline-run-*"))
    assert "--- sample (prompt " in out.stdout and "=== summary: linear-llama3-tiny, steps 1-3 of 3" in out.stdout
    from lasp import models
    assert models.load_model(run_dir / "model.pt").config.dim == 64
    # the same command again, without --resume: a user error, printed once, workers exit 2, no worker traceback
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    text = again.stdout + again.stderr
    assert again.returncode != 0 and text.count("already holds checkpoints of another run") == 1, text[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", text) and "launch/pretrain.py\", line" not in text, text[-3000:]
    assert [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
