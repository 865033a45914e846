"""Pretraining data: corpus files -> a sentencepiece tokenizer and a token stream (cached) -> packed sequences.

Corpus: `.txt` files (one document per file) and `.jsonl` files (one document per line, under `text_key`), either
optionally gzipped, or folders of them. The default is the embedded corpus launch/corpus/shakespeare.jsonl.gz
(twelve of Shakespeare's works, one document each; no network needed).

Cache: <cache_dir>/<key>/{tokenizer.model, tokens.npy, doc_ids.npy}, key = sha256 of the corpus bytes, the text
key, the vocabulary size and CACHE_VERSION. Rank 0 builds it (BPE, trained in about a second on the default
corpus) into a temporary folder and renames it into place; the other ranks wait, then load it.

Packing: documents are concatenated, each followed by EOS, into one stream s (with its document id per token);
sequence i is s[i·T : i·T + T] with labels s[i·T + 1 : i·T + T + 1]. Segment ids (document ids renumbered from 0
inside the sequence) keep softmax attention inside a document; the loss mask drops the one label per boundary
that belongs to the next document. Sequences are visited in a fresh permutation per epoch; batch b of data-parallel
rank d at step k is samples (k·dp + d)·B ... + B − 1 of that order, so the data position is just the step.
"""
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["DEFAULT_CORPUS", "CACHE_VERSION", "corpus_files", "check_corpus", "read_documents", "cache_path",
           "build_cache", "load_tokenizer", "PackedDataset", "shard_batch"]

DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.jsonl.gz"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
CACHE_VERSION = 1


def _kind(path):
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return "jsonl" if name.endswith(".jsonl") else "txt"


def corpus_files(paths):
    """Paths (files or folders) -> sorted list of corpus files; [] = the embedded corpus. ValueError if missing."""
    if not paths:
        return [DEFAULT_CORPUS]
    files = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise ValueError(f"data.corpus: folder {p} holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"data.corpus: no such file or folder: {p}")
    return files


def _open_text(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def read_documents(files, text_key="text"):
    """Yield each document's text. ValueError naming file and line for bad jsonl."""
    for path in files:
        with _open_text(path) as f:
            if _kind(path) == "txt":
                yield f.read()
                continue
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data.corpus: {path}:{n} is not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"data.corpus: {path}:{n} has no string field {text_key!r} (data.text_key)")
                yield record[text_key]


def check_corpus(files, text_key="text"):
    """ValueError unless some document has non-whitespace text (read until the first such document)."""
    try:
        if any(doc.strip() for doc in read_documents(files, text_key)):
            return
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"data.corpus: cannot read the corpus: {e}") from None
    raise ValueError(f"data.corpus: the corpus is empty (no text in {[str(f) for f in files]})")


def cache_path(files, text_key, vocab_size, cache_dir):
    """<cache_dir>/<key>: the key hashes the corpus bytes and every setting that changes the tokens."""
    h = hashlib.sha256(f"v{CACHE_VERSION} vocab={vocab_size} key={text_key}".encode())
    for path in files:
        h.update(f"\0{_kind(path)}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return Path(cache_dir).expanduser() / h.hexdigest()[:20]


def _train_tokenizer(docs, vocab_size, model_file):
    """BPE over the non-empty lines; newlines kept as a symbol and text not normalised, so decode ∘ encode = id."""
    import sentencepiece as spm
    lines = (line for doc in docs for line in doc.split("\n") if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(model_file.with_suffix("")), vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"data: sentencepiece could not train a {vocab_size}-token vocabulary: {e}") from None


def build_cache(files, text_key, vocab_size, path):
    """Train the tokenizer and tokenize the corpus into `path` (atomically; a no-op if it exists)."""
    path = Path(path)
    if (path / "tokens.npy").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        docs = [d for d in read_documents(files, text_key) if d.strip()]
        if not docs:
            raise ValueError(f"data.corpus: the corpus is empty (no text in {[str(f) for f in files]})")
        _train_tokenizer(docs, vocab_size, tmp / "tokenizer.model")
        sp = load_tokenizer(tmp)
        ids = sp.encode(docs)
        tokens = np.concatenate([np.asarray(d + [sp.eos_id()], dtype=np.int32) for d in ids])
        doc_ids = np.repeat(np.arange(len(ids), dtype=np.int32), [len(d) + 1 for d in ids])
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "doc_ids.npy", doc_ids)
        os.rename(tmp, path)                    # atomic; fails if another job got there first, which is fine
    except OSError:
        if not (path / "tokens.npy").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_tokenizer(path):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(Path(path) / "tokenizer.model"))


class PackedDataset:
    """Fixed-length sequences over the cached token stream (memory-mapped); batches addressed by (step, dp rank)."""

    def __init__(self, path, seq_len, seed=0):
        self.tokens = np.load(Path(path) / "tokens.npy", mmap_mode="r")
        self.doc_ids = np.load(Path(path) / "doc_ids.npy", mmap_mode="r")
        self.seq_len, self.seed = seq_len, seed
        self.n_sequences = (len(self.tokens) - 1) // seq_len
        if self.n_sequences < 1:
            raise ValueError(f"data: the corpus has {len(self.tokens)} tokens, fewer than one sequence of "
                             f"data.seq_len + 1 = {seq_len + 1}")
        self._order = {}

    def _permutation(self, epoch):
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(self.n_sequences,
                                                 generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return self._order[epoch]

    def sequence(self, i):
        """Packed sequence i -> dict of (T,) tensors: tokens, labels, segment_ids, loss_mask."""
        s = slice(i * self.seq_len, (i + 1) * self.seq_len + 1)
        tok, doc = (torch.from_numpy(np.asarray(a[s], dtype=np.int64)) for a in (self.tokens, self.doc_ids))
        return {"tokens": tok[:-1], "labels": tok[1:], "segment_ids": doc[:-1] - doc[0],
                "loss_mask": doc[1:] == doc[:-1]}

    def batch(self, step, dp_rank, dp, batch_size):
        """The (B, T) batch of data-parallel rank `dp_rank` at `step` (deterministic: resume needs only step)."""
        first = (step * dp + dp_rank) * batch_size
        rows = []
        for sample in range(first, first + batch_size):
            epoch, within = divmod(sample, self.n_sequences)
            rows.append(self.sequence(int(self._permutation(epoch)[within])))
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def shard_batch(batch, layout, rank, world):
    """This sequence-parallel rank's shard: every (B, T) tensor cut by the same layout, plus global positions."""
    from parallel.layout import local_positions, shard
    local = {k: shard(v, layout, rank, world, dim=1) for k, v in batch.items()}
    local["positions"] = local_positions(batch["tokens"].shape[1], layout, rank, world)
    return local
