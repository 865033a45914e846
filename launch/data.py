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

Held-out split: the last HELDOUT_FRACTION of the token stream (split="heldout"). Training (split="train") reads only
tokens before that boundary, labels included, for every seq_len, so launch/evaluate.py's perplexity is on text no
run trained on. The boundary depends only on the stream length: the same for any seq_len, batch or parallel layout.

MQAR (Zoology's multi-query associative recall), `MQARDataset`: synthetic sequences with the same `batch` interface,
chosen by data.mqar (launch/mqar.py sweeps it). Token 0 is filler, keys come from [1, 1 + n_keys), values from the
rest of the vocabulary. A sequence: K pairs k_1 v_1 ... k_K v_K (keys distinct), then the K keys again in a random
order, each followed by its value, at random pair slots of the rest (filler elsewhere). The label of a query key is
its value; loss_mask is True exactly there, so the loss and the accuracy count only the recall.
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

__all__ = ["DEFAULT_CORPUS", "CACHE_VERSION", "HELDOUT_FRACTION", "corpus_files", "check_corpus", "read_documents",
           "cache_path", "build_cache", "load_tokenizer", "split_bounds", "PackedDataset", "MQAR_FIELDS", "check_mqar",
           "MQARDataset", "shard_batch"]

DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.jsonl.gz"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
CACHE_VERSION = 2          # 2: the held-out split (a new data key, so a version-1 run does not resume on it)
HELDOUT_FRACTION = 0.05    # the last 5% of the token stream: never trained on


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


def cache_path(files, text_key, vocab_size, cache_dir, tokenizer_file=None):
    """<cache_dir>/<key>: the key hashes the corpus bytes and every setting that changes the tokens (with
    tokenizer_file, a given sentencepiece model instead of a trained one: its bytes)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} vocab={vocab_size} key={text_key}".encode())
    if tokenizer_file is not None:
        h.update(b"\0tokenizer\0" + Path(tokenizer_file).read_bytes())
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


def build_cache(files, text_key, vocab_size, path, tokenizer_file=None):
    """Train the tokenizer (or copy `tokenizer_file`) and tokenize the corpus into `path` (atomically; a no-op if it
    exists)."""
    path = Path(path)
    if (path / "tokens.npy").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        docs = [d for d in read_documents(files, text_key) if d.strip()]
        if not docs:
            raise ValueError(f"data.corpus: the corpus is empty (no text in {[str(f) for f in files]})")
        if tokenizer_file is None:
            _train_tokenizer(docs, vocab_size, tmp / "tokenizer.model")
        else:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
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


def split_bounds(n_tokens, split):
    """(start, stop) token indices of `split` ("train" | "heldout") in a stream of n_tokens; disjoint, and the
    held-out part is the last floor(HELDOUT_FRACTION · n_tokens) tokens whatever the sequence length."""
    boundary = n_tokens - int(n_tokens * HELDOUT_FRACTION)
    if split == "train":
        return 0, boundary
    if split == "heldout":
        return boundary, n_tokens
    raise ValueError(f"data: split must be 'train' or 'heldout', got {split!r}")


class PackedDataset:
    """Fixed-length sequences over one split of the cached token stream (memory-mapped); batches addressed by
    (step, dp rank). A sequence reads seq_len + 1 tokens (the labels), all inside the split."""

    def __init__(self, path, seq_len, seed=0, split="train"):
        tokens = np.load(Path(path) / "tokens.npy", mmap_mode="r")
        start, stop = split_bounds(len(tokens), split)
        self.tokens = tokens[start:stop]
        self.doc_ids = np.load(Path(path) / "doc_ids.npy", mmap_mode="r")[start:stop]
        self.seq_len, self.seed, self.split, self.start = seq_len, seed, split, start
        self.n_sequences = (len(self.tokens) - 1) // seq_len
        if self.n_sequences < 1:
            raise ValueError(f"data: the {split} split has {len(self.tokens)} tokens (of {len(tokens)}), fewer than "
                             f"one sequence of data.seq_len + 1 = {seq_len + 1}")
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

    def rows(self, indices):
        """Sequences `indices` stacked -> dict of (len(indices), T) tensors (evaluation reads them in order)."""
        rows = [self.sequence(int(i)) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def batch(self, step, dp_rank, dp, batch_size):
        """The (B, T) batch of data-parallel rank `dp_rank` at `step` (deterministic: resume needs only step)."""
        first = (step * dp + dp_rank) * batch_size
        samples = (divmod(sample, self.n_sequences) for sample in range(first, first + batch_size))
        return self.rows([self._permutation(epoch)[within] for epoch, within in samples])


# data.mqar keys: pairs per sequence; fewest pairs (a sequence draws K uniformly from [min_kv_pairs, kv_pairs]:
# a mix of easy and hard sequences; 0 = always kv_pairs); the generator's seed offset (evaluation uses another)
MQAR_FIELDS = {"kv_pairs": int, "min_kv_pairs": int, "seed": int}


def check_mqar(spec, seq_len, vocab_size):
    """A data.mqar table -> (kv_pairs, min_kv_pairs, seed). ValueError naming the numbers when K pairs and their K
    queries (4K tokens) do not fit seq_len, or K distinct keys and their values do not fit the vocabulary."""
    unknown = sorted(set(spec) - set(MQAR_FIELDS))
    if unknown or "kv_pairs" not in spec:
        raise ValueError(f"data.mqar: expected keys {sorted(MQAR_FIELDS)} (kv_pairs required), got {sorted(spec)}")
    for key, kind in MQAR_FIELDS.items():
        if key in spec and (not isinstance(spec[key], kind) or isinstance(spec[key], bool)):
            raise ValueError(f"data.mqar.{key} must be an integer, got {spec[key]!r}")
    pairs, low = spec["kv_pairs"], spec.get("min_kv_pairs", 0) or spec["kv_pairs"]
    n_keys = (vocab_size - 1) // 2
    if not 1 <= low <= pairs:
        raise ValueError(f"data.mqar: need 1 <= min_kv_pairs={low} <= kv_pairs={pairs}")
    if 4 * pairs > seq_len:
        raise ValueError(f"data.mqar: kv_pairs={pairs} needs seq_len >= 4·{pairs} = {4 * pairs} ({pairs} pairs and "
                         f"{pairs} queries of 2 tokens), got data.seq_len={seq_len}")
    if pairs > n_keys:
        raise ValueError(f"data.mqar: kv_pairs={pairs} distinct keys need vocab_size >= {2 * pairs + 1} (filler, "
                         f"{pairs} keys, values), got data.vocab_size={vocab_size} ({n_keys} keys)")
    return pairs, low, spec.get("seed", 0)


class MQARDataset:
    """Synthetic multi-query associative recall (module docstring); the same `batch` interface as PackedDataset.
    Sequence i is a pure function of (seed, i): resume, dp ranks and evaluation need no state."""

    def __init__(self, spec, seq_len, vocab_size, seed=0):
        self.kv_pairs, self.min_kv_pairs, offset = check_mqar(spec, seq_len, vocab_size)
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed + 7919 * offset
        self.n_keys = (vocab_size - 1) // 2
        self.key = f"mqar-K{self.kv_pairs}-{self.min_kv_pairs}-T{seq_len}-V{vocab_size}-s{self.seed}"

    def sequence(self, i):
        """Sequence i -> dict of (T,) tensors: tokens, labels, segment_ids (all 0), loss_mask (query keys only)."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + i)
        T, K = self.seq_len, self.kv_pairs
        if self.min_kv_pairs < K:
            K = int(torch.randint(self.min_kv_pairs, K + 1, (), generator=g))
        keys = 1 + torch.randperm(self.n_keys, generator=g)[:K]
        values = torch.randint(1 + self.n_keys, self.vocab_size, (K,), generator=g)
        seq = torch.zeros(T + 1, dtype=torch.int64)                   # one more: the last label
        seq[0:2 * K:2], seq[1:2 * K:2] = keys, values
        slots = (T + 1 - 2 * K) // 2                                  # pair slots after the context
        where = 2 * K + 2 * torch.randperm(slots, generator=g)[:K].sort().values
        order = torch.randperm(K, generator=g)
        seq[where], seq[where + 1] = keys[order], values[order]
        mask = torch.zeros(T, dtype=torch.bool)
        mask[where] = True                                            # label of a query key = its value
        return {"tokens": seq[:-1], "labels": seq[1:], "segment_ids": torch.zeros(T, dtype=torch.int64),
                "loss_mask": mask}

    def rows(self, indices):
        rows = [self.sequence(int(i)) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def batch(self, step, dp_rank, dp, batch_size):
        """The (B, T) batch of data-parallel rank `dp_rank` at `step`: sequences (step·dp + dp_rank)·B ..."""
        first = (step * dp + dp_rank) * batch_size
        return self.rows(range(first, first + batch_size))


def shard_batch(batch, layout, rank, world):
    """This sequence-parallel rank's shard: every (B, T) tensor cut by the same layout, plus global positions."""
    from lasp.parallel.layout import local_positions, shard
    local = {k: shard(v, layout, rank, world, dim=1) for k, v in batch.items()}
    local["positions"] = local_positions(batch["tokens"].shape[1], layout, rank, world)
    return local
