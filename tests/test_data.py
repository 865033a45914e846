"""Pretraining data (launch/tokens.py, launch/data.py, launch/prepare_data.py): the prepared stream equals the cache
format it replaces token for token, the Megatron indexed reader gives the sequences megatron-core's own writer
stored, an interrupted preparation leaves nothing that reads as complete, and bad input is one message naming the
file (on every rank of a job)."""
import contextlib
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lasp.launch import data, prepare_data, tokens
from lasp.launch.config import DataConfig
from lasp.launch.data import PackedDataset, build_cache, cache_path, corpus_files, open_data
from tests.dist import run_ranks

REPO = Path(__file__).resolve().parents[1]

# Today's cache of the default job (embedded corpus, vocabulary 1024), written by the code this replaces (int32
# tokens.npy, int32 doc_ids.npy): sha256 of both arrays' bytes, its key and its document starts.
DEFAULT_KEY = "ac0cfe1395d5bcf8bc77"
DEFAULT_TOKENS_SHA = "7f87d995bfb85c4c1c7255c8f07acda9fadce00de246427accce0b022515f3e4"
DEFAULT_DOC_IDS_SHA = "185a58333d6f10f953e5c62072257d51392929c561a0789ce87b4a45f89c1907"
DEFAULT_OFFSETS = [0, 74152, 119896, 185002, 251112, 310918, 360465, 404060, 446100, 494765, 545395, 596446, 634820]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    files = corpus_files([])
    return build_cache(files, "text", 1024, cache_path(files, "text", 1024, tmp_path_factory.mktemp("cache")))


def _sha(array):
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _old_cache(files, text_key, tokenizer_file):
    """The replaced build_cache's stream: every document read whole in text mode, sp.encode(docs), EOS after each."""
    docs = []
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if ".jsonl" in path.name:
                docs += [json.loads(line)[text_key] for line in f if line.strip()]
            else:
                docs.append(f.read())
    ids = tokens.load_tokenizer(tokenizer_file).encode([d for d in docs if d.strip()])
    stream = np.concatenate([np.asarray(d + [2], np.int32) for d in ids])
    return stream, np.repeat(np.arange(len(ids)), [len(d) + 1 for d in ids])


def _doc_ids(offsets):
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int32), np.diff(offsets))


def test_default_job_stream_is_todays_cache_token_for_token(default_cache):
    assert default_cache.name == DEFAULT_KEY                      # the same key: runs resume across the change
    stream = tokens.open_prepared(default_cache)
    assert stream.tokens.dtype == np.uint16 and stream.offsets.dtype == np.int64
    assert _sha(np.asarray(stream.tokens, np.int32)) == DEFAULT_TOKENS_SHA
    assert stream.offsets.tolist() == DEFAULT_OFFSETS and _sha(_doc_ids(stream.offsets)) == DEFAULT_DOC_IDS_SHA
    assert stream.key == DEFAULT_KEY and stream.vocab_size == 1024


def test_workers_and_formats_equal_the_old_cache(tmp_path, default_cache):
    """txt (CRLF line ends, an empty file), jsonl, gzipped, a folder: 2 worker processes, ordered output."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"Line {i}: what's in a name? {'ÿ' * (i % 3)}" for i in range(400)]
    (corpus / "a.txt").write_bytes("\r\n".join(lines[:50]).encode())
    (corpus / "b.txt").write_text("  \n")
    with gzip.open(corpus / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": "\n".join(lines[i:i + 7])}) for i in range(0, 400, 7)))
    (corpus / "d.jsonl").write_text(json.dumps({"text": "That which we call a rose"}) + "\n\n")
    files = corpus_files([corpus])
    out = tokens.prepare(files, tmp_path / "p", tokenizer_file=default_cache / "tokenizer.model", workers=2)
    stream = tokens.open_prepared(out)
    old_tokens, old_doc_ids = _old_cache(files, "text", default_cache / "tokenizer.model")
    assert np.array_equal(np.asarray(stream.tokens, np.int32), old_tokens)
    assert np.array_equal(_doc_ids(stream.offsets), old_doc_ids) and len(stream.offsets) == 1 + 60


def test_packed_batches_equal_the_per_token_document_ids(tmp_path, default_cache):
    """The offsets reader gives the batches the replaced reader (one document id per token) gave, both splits."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    stream = tokens.open_prepared(default_cache)
    np.save(legacy / "tokens.npy", np.asarray(stream.tokens, np.int32))
    np.save(legacy / "doc_ids.npy", _doc_ids(stream.offsets))
    for split in ("train", "heldout"):
        new, old = PackedDataset(stream, 4096, seed=1, split=split), PackedDataset(legacy, 4096, seed=1, split=split)
        assert new.n_sequences == old.n_sequences > 2
        for step in (0, 1, 7):
            a, b = new.batch(step, 1, 2, 3), old.batch(step, 1, 2, 3)
            assert all(torch.equal(a[k], b[k]) for k in a), (split, step)
        crossing = new.rows(range(new.n_sequences))["segment_ids"].amax(1) > 0
        assert crossing.any() or split == "heldout"               # sequences across a document boundary


def test_long_txt_document_is_read_in_pieces_at_line_ends(tmp_path):
    path = tmp_path / "long.txt"
    text = "".join(f"line {i} é\r\n" for i in range(3000))
    path.write_bytes(text.encode())
    pieces = list(tokens.read_pieces([path], piece_bytes=4096))
    assert len(pieces) > 5 and all(p.endswith("\n") for p, _, _ in pieces)
    assert [end for _, end, _ in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p for p, _, _ in pieces) == text.replace("\r\n", "\n")


# ---------------------------------------------------------------------------------------------- Megatron
@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two datasets written by megatron-core's IndexedDatasetBuilder: documents of 1-3 items of random ids."""
    with warnings.catch_warnings():                               # megatron-core warns that Apex is missing
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    root, rng, docs = tmp_path_factory.mktemp("indexed"), np.random.default_rng(0), {}
    for name, dtype, n_docs in (("a", np.uint16, 30), ("b", np.int32, 9)):
        builder, docs[name] = IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=dtype), []
        for _ in range(n_docs):
            items = [rng.integers(0, 500, rng.integers(1, 40)) for _ in range(rng.integers(1, 4))]
            for item in items:
                builder.add_item(torch.from_numpy(item))
            builder.end_document()
            docs[name].append(np.concatenate(items))
        builder.finalize(str(root / f"{name}.idx"))
    return root, docs


def test_indexed_reader_gives_the_stored_sequences(indexed):
    root, docs = indexed
    prefixes = [str(root / "a"), str(root / "b")]
    stream = tokens.open_indexed(prefixes, vocab_size=512)
    everything = docs["a"] + docs["b"]
    expect = np.concatenate(everything)
    assert len(stream.tokens) == len(expect) and np.array_equal(np.asarray(stream.tokens[:]), expect)
    assert stream.offsets.tolist() == np.cumsum([0] + [len(d) for d in everything]).tolist()
    ds = PackedDataset(stream, 16, split="train")
    doc_of = _doc_ids(stream.offsets)
    for i in range(ds.n_sequences):                               # across the a -> b seam too
        seq, span = ds.sequence(i), slice(i * 16, i * 16 + 17)
        assert seq["tokens"].tolist() == expect[span][:-1].tolist()
        assert seq["labels"].tolist() == expect[span][1:].tolist()
        assert seq["segment_ids"].tolist() == (doc_of[span][:-1] - doc_of[span][0]).tolist()
        assert seq["loss_mask"].tolist() == (doc_of[span][1:] == doc_of[span][:-1]).tolist()
    tokens.check_token_ids(stream, prefixes)
    small = tokens.open_indexed(prefixes, vocab_size=int(docs["a"][0].max()))
    with pytest.raises(ValueError, match=rf"{root}/a.bin holds token id \d+, outside data.vocab_size"):
        tokens.check_token_ids(small, [p + ".bin" for p in prefixes])


def test_indexed_through_the_launcher_and_bad_prefixes(indexed, tmp_path):
    root, docs = indexed
    cfg = DataConfig(indexed=[str(root / "a")], vocab_size=600, seq_len=8, batch_size=2)
    loaded = open_data(cfg, 0, _raise)
    assert loaded.vocab_size == 600 and loaded.tokenizer is None and loaded.key.startswith("indexed-")
    assert loaded.dataset.batch(0, 0, 1, 2)["tokens"].shape == (2, 8)
    (tmp_path / "x.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=rf"data.indexed: {tmp_path}/x.idx does not exist"):
        data.check_data(DataConfig(indexed=[str(tmp_path / "x")]))
    (tmp_path / "x.idx").write_bytes(b"not an index")
    with pytest.raises(ValueError, match=rf"data.indexed: {tmp_path}/x.idx / .bin cannot be read by megatron-core"):
        open_data(DataConfig(indexed=[str(tmp_path / "x")]), 0, _raise)
    with pytest.raises(ValueError, match=rf"{root}/a.bin holds token id 4\d\d, outside data.vocab_size = 100"):
        open_data(DataConfig(indexed=[str(root / "a")], vocab_size=100), 0, _raise)


def _raise(error):
    if error is not None:
        raise error


# ---------------------------------------------------------------------------------------------- interruption
def test_killed_preparation_leaves_nothing_complete(tmp_path, default_cache):
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"Doc {i}: " + "to be or not to be, " * 40}) for i in range(3000)))
    out, model = tmp_path / "out", default_cache / "tokenizer.model"
    code = (f"from lasp.launch.tokens import prepare; prepare([{str(corpus)!r}], {str(out)!r}, "
            f"tokenizer_file={str(model)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 128 for p in tmp_path.glob("out.tmp-*/tokens.npy")):  # mid-way: tokens written
        assert proc.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(tmp_path.glob("out.tmp-*"))) == 1
    with pytest.raises(ValueError, match=rf"data.prepared: {out} does not exist: prepare it again"):
        data.check_data(DataConfig(prepared=str(out)))
    with pytest.raises(ValueError, match="holds no manifest.json"):
        tokens.open_prepared(next(tmp_path.glob("out.tmp-*")))
    tokens.prepare([corpus], out, tokenizer_file=model)           # a new run: the dead run's folder is removed
    assert not list(tmp_path.glob("out.tmp-*")) and tokens.open_prepared(out).offsets[-1] > 0


def test_truncated_cache_and_unwritable_folder_are_named(tmp_path, default_cache):
    cfg = DataConfig(corpus=[str(corpus_files([])[0])], cache_dir=str(default_cache.parent))
    assert open_data(cfg, 0, _raise).key == DEFAULT_KEY
    copy = tmp_path / DEFAULT_KEY
    copy.mkdir()
    for name in ("tokenizer.model", "tokens.npy", "doc_offsets.npy", "manifest.json"):
        (copy / name).write_bytes((default_cache / name).read_bytes())
    os.truncate(copy / "tokens.npy", 1000)
    with pytest.raises(ValueError, match=rf"{copy}/tokens.npy is 1000 bytes, its manifest says 1269768 .*delete "
                                         rf"{copy}; the next run rebuilds it"):
        open_data(DataConfig(cache_dir=str(tmp_path)), 0, _raise)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=rf"data.cache_dir: cannot write into {tmp_path}/file/c .*choose a writable"):
        open_data(DataConfig(cache_dir=str(tmp_path / "file" / "c")), 0, _raise)


# ---------------------------------------------------------------------------------------------- bad input
def _gz(path, text, damage=None):
    raw = gzip.compress(text.encode())
    path.write_bytes(damage(raw) if damage else raw)
    return path


BAD_FILES = [
    ("truncated.jsonl.gz", lambda p: _gz(p, '{"text": "a b c"}\n' * 500, lambda r: r[:len(r) // 2]),
     r"truncated.jsonl.gz is not a valid gzip file \(EOFError"),
    ("crc.jsonl.gz", lambda p: _gz(p, '{"text": "a b c"}\n', lambda r: r[:-8] + bytes([r[-8] ^ 1]) + r[-7:]),
     r"crc.jsonl.gz is not a valid gzip file \(BadGzipFile: CRC check failed"),
    ("plain.txt.gz", lambda p: p.write_text("not gzip at all"), r"plain.txt.gz is not a valid gzip file"),
    ("latin1.txt", lambda p: p.write_bytes("fine\nna\xefve".encode("latin-1")),
     r"latin1.txt is not UTF-8 text: byte 7 \(invalid continuation byte"),
    ("latin1.jsonl", lambda p: p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
     r"latin1.jsonl is not UTF-8 text: byte 28 \(line 2\)"),
    ("broken.jsonl", lambda p: p.write_text('{"text": "ok"}\n\n{"text": "no end}\n'),
     r"broken.jsonl:3 is not valid JSON"),
]


@pytest.mark.parametrize("name, write, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_after_the_first_is_one_message(tmp_path, name, write, message):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "to be or not to be"}) + "\n")
    write(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        tokens.prepare([good, tmp_path / name], tmp_path / "out", vocab_size=40)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert prepare_data.main(["--corpus", str(good), str(tmp_path / name), "--out", str(tmp_path / "o"),
                              "--vocab-size", "40", "--no-progress"]) == 2


def _pretrain_main(argv):
    from lasp.launch import pretrain
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain.main(argv)
    return code, err.getvalue()


def test_bad_corpus_stops_every_rank_with_one_message(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"text": "to be or not to be"}) + "\n")
    bad = _gz(tmp_path / "b.jsonl.gz", '{"text": "x"}\n' * 100, lambda r: r[:20])
    argv = ["--config", "tiny", "--sp", "2", "--run-dir", str(tmp_path / "run"), "--data.cache_dir",
            str(tmp_path / "cache"), "--data.corpus", str(good), str(bad), "--run.sample_tokens", "0"]
    (code0, err0), (code1, err1) = run_ranks(2, _pretrain_main, argv)
    assert code0 == code1 == 2 and err1 == ""
    assert err0.count("error:") == 1 and "b.jsonl.gz is not a valid gzip file" in err0 and "Traceback" not in err0


def test_big_inline_corpus_is_refused_with_the_command(tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text("x" * 2_000_001)
    with pytest.raises(ValueError, match=rf"2 MB of text is more than data.inline_max_mb = 1 \(the most .*python -m "
                                         rf"lasp.launch.prepare_data --corpus {corpus} --out DIR"):
        data.check_data(DataConfig(corpus=[str(corpus)], inline_max_mb=1))


@pytest.mark.parametrize("changes, message", [
    ({"prepared": "p", "indexed": ["x"]}, r"choose one of .*\(got data.prepared, data.indexed\)"),
    ({"corpus": ["a.txt"], "mqar": {"kv_pairs": 2}}, r"choose one of .*\(got data.corpus, data.mqar\)"),
    ({"indexed": ["x"]}, r"data.indexed has no tokenizer .*run.sample_tokens = 0 \(got 48\)"),
    ({"prepared": "p", "tokenizer": "t.model"}, r"a prepared folder has its own tokenizer.model"),
])
def test_one_data_source(changes, message):
    from lasp.launch.config import TrainConfig, _check_data_source
    cfg = TrainConfig()
    for key, value in changes.items():
        setattr(cfg.data, key, value)
    with pytest.raises(ValueError, match=message):
        _check_data_source(cfg)


def test_prepare_data_command_reuses_only_the_same_settings(tmp_path, capsys):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"to be or not to be {i}"}) for i in range(50)))
    argv = ["--corpus", str(corpus), "--out", str(tmp_path / "p"), "--vocab-size", "40", "--no-progress"]
    assert prepare_data.main(argv) == 0 and "train with --data.prepared" in capsys.readouterr().out
    assert prepare_data.main(argv + ["--workers", "2"]) == 0 and "already prepared" in capsys.readouterr().out
    assert prepare_data.main(argv[:-3] + ["--vocab-size", "48"]) == 2
    assert "was prepared with other settings (vocab_size was 40, now 48)" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int64])
def test_npy_written_in_pieces_is_a_plain_npy(tmp_path, dtype):
    writer, parts = tokens._NpyWriter(tmp_path / "a.npy", dtype), [np.arange(n) * 7 for n in (0, 5, 1000, 3)]
    for part in parts:
        writer.write(part)
    writer.close()
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.dtype == dtype and np.array_equal(loaded, np.concatenate(parts).astype(dtype))


def test_old_format_cache_is_rebuilt_with_the_same_tokens(tmp_path):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"to be or not to be {i}"}) for i in range(50)))
    path = build_cache([corpus], "text", 40, tmp_path / "cache" / "k")
    stream = tokens.open_prepared(path)
    stream.tokens, stream.offsets = np.array(stream.tokens), np.array(stream.offsets)   # off the files rewritten next
    for name in ("doc_offsets.npy", "manifest.json"):            # what the replaced code left in a cache folder
        (path / name).unlink()
    np.save(path / "tokens.npy", np.asarray(stream.tokens, np.int32))
    np.save(path / "doc_ids.npy", _doc_ids(stream.offsets))
    assert tokens.open_prepared(path).tokens.dtype == np.int32  # still readable as it is
    rebuilt = tokens.open_prepared(build_cache([corpus], "text", 40, path))
    assert rebuilt.tokens.dtype == np.uint16 and np.array_equal(rebuilt.tokens, stream.tokens)
    assert np.array_equal(rebuilt.offsets, stream.offsets) and sorted(p.name for p in path.parent.iterdir()) == ["k"]
