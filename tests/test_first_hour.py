"""A new user's first hour (issue 24): a run on one's own corpus ends with a summary and samples from that corpus,
evaluate and generate find what belongs to the model (model.json, the tokenizer beside it), --dry-run lists every
problem for the world the run will have, user mistakes print once, `make run ARGS=...` passes flags, and the
entry points keep the error contract (issue 25 item 7). One 3-step run on one rank is shared by the module."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lasp.launch import evaluate, generate, pretrain, upcycle
from tests.dist import run_ranks

REPO = Path(__file__).resolve().parents[1]


def _pretrain(argv):
    """pretrain.main on this rank -> (exit code, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pretrain.main(argv)
    return code, out.getvalue()


def _argv(root, corpus):
    return ["--config", "tiny", "--max-steps", "3", "--run-dir", str(root / "run"), "--data.corpus", str(corpus),
            "--data.cache_dir", str(root / "cache"), "--data.vocab_size", "128", "--run.sample_tokens", "8"]


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """(root, corpus, printed output) of a tiny 3-step run on a corpus of numbered log entries."""
    root = tmp_path_factory.mktemp("first-hour")
    corpus = root / "entries.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Entry {i}: the pump on deck {i % 5} read {i * 3} bar.\n"
                                                    f"Checked twice."}) for i in range(300)) + "\n")
    code, out = run_ranks(1, _pretrain, _argv(root, corpus))[0]
    assert code == 0, out
    return root, corpus, out


def test_a_run_ends_with_a_summary_and_samples_from_its_own_corpus(own_run):
    root, _, out = own_run
    run_dir = root / "run"
    prompt = re.search(r"--- sample \(prompt '(.*)', from a held-out document\) ---", out)
    assert prompt and prompt[1].startswith("Entry 2") and "ROMEO" not in out, out   # held-out: the last entries
    assert "=== summary: linear-llama3-tiny, steps 1-3 of 3 ===" in out
    assert re.search(r"final loss +\d+\.\d+ \(step 3", out) and re.search(r"held-out loss +\d+\.\d+ \(first", out)
    assert re.search(r"tokens/s +[\d,]+\n", out)
    for name in ("metrics.jsonl", "loss.png", "model.pt", "model.json", "tokenizer.model"):
        assert f"{run_dir / name}\n" in out, name
    assert f"checkpoint     {run_dir / 'checkpoints' / 'step_00000003'}" in out


def test_evaluate_scores_the_runs_own_corpus_and_takes_pretrains_data_names(own_run, tmp_path, capsys):
    root, corpus, out = own_run
    model = root / "run" / "model.pt"
    card = json.loads((root / "run" / "model.json").read_text())
    assert card["data"]["corpus"] == [str(corpus)] and card["data"]["seq_len"] == 64 and card["step"] == 3
    assert card["tokenizer"] == "tokenizer.model"
    assert evaluate.main([str(model), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["corpus"] == [str(corpus)] and result["seq_len"] == 64
    assert result["settings_from"]["corpus"] == "model.json"
    assert f"{corpus} (from model.json)" in capsys.readouterr().out
    summary = float(re.search(r"held-out loss +(\d+\.\d+)", out)[1])      # the run's own end-of-run score
    assert abs(result["loss"] - summary) < 1e-3, (result["loss"], summary)
    other = tmp_path / "other.txt"
    other.write_text("Entry 9000: a different log.\n" * 300)
    args = evaluate.parse_args([str(model), "--data.corpus", str(other), "--data.seq_len", "32"])
    result = evaluate.evaluate(args)                                       # an explicit other corpus still works
    assert result["corpus"] == [str(other)] and result["seq_len"] == 32
    assert result["settings_from"]["seq_len"] == "--data.seq_len"


def test_generate_finds_the_tokenizer_beside_the_model(own_run, capsys):
    root, _, _ = own_run
    assert generate.main([str(root / "run" / "model.pt"), "--prompt", "Entry 7", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Entry 7") and "tokenizer.model (beside the model)" in captured.err


@pytest.mark.parametrize("tool", ["generate", "evaluate", "upcycle"])
def test_entry_points_print_one_line_and_exit_2(tool, tmp_path, capsys):
    """Issue 25 item 7: a text file where a model belongs -> one line, exit 2, no traceback (was KeyError: 101)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    argv = {"generate": [str(notes)], "evaluate": [str(notes)],
            "upcycle": ["--seed", str(notes), "--experts", str(notes), str(notes), "--out", str(tmp_path / "o.pt")]}
    assert {"generate": generate, "evaluate": evaluate, "upcycle": upcycle}[tool].main(argv[tool]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{tool}: error: ") and "is not a model file" in err, err


def test_a_second_run_in_the_folder_names_all_three_ways_out(own_run, capsys):
    root, corpus, _ = own_run
    assert pretrain.main(_argv(root, corpus)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "another --run-dir" in err and f"rm -r {root / 'run'}" in err, err


def test_make_run_passes_args(tmp_path):
    out = subprocess.run(["make", "-n", "run", "ARGS=--resume --max-steps 5"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert re.search(r"launch/pretrain.py --resume --max-steps 5$", out.stdout, re.M), out.stdout + out.stderr


def test_dry_run_lists_every_problem_for_the_world_it_will_have(monkeypatch, tmp_path, capsys):
    run_dir = ["--run-dir", str(tmp_path / "run")]
    assert pretrain.main(["--dry-run", "--world-size", "4", *run_dir]) == 0          # the default run, 4 ranks
    assert "world 4 = dp 2 x sp 2" in capsys.readouterr().out
    assert pretrain.main(["--dry-run", "--world-size", "3", "--data.corpus", str(tmp_path / "none.txt"),
                          "--optim.lr", "5", "--zero", "7", *run_dir]) == 2
    err = capsys.readouterr().err
    assert "found 4 problem(s) for world size 3" in err and "not divisible by sp=2" in err
    assert "optim.lr must be" in err and "parallel.zero must be" in err and "no such file or folder" in err
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)                           # under torchrun: its world, no flag needed
    assert pretrain.main(["--dry-run", *run_dir]) == 0 and "world 4 = dp 2 x sp 2" in capsys.readouterr().out
    assert pretrain.main(["--dry-run", "--world-size", "2", *run_dir]) == 2
    assert "--world-size 2: torchrun started 4 ranks" in capsys.readouterr().err


def test_user_mistakes_print_once_under_torchrun(tmp_path):
    """A flag typo under torchrun: one usage block and one message for 2 ranks (rank 1's argparse is silent)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "launch/pretrain.py",
           "--optim.lrr", "1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = out.stdout + out.stderr
    assert out.returncode != 0 and text.count("usage: launch/pretrain.py") == 1, text[-3000:]
    assert text.count("unrecognized arguments: --optim.lrr") == 1, text[-3000:]
