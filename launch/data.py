"""Pretraining data: a token stream (launch/tokens.py) -> packed sequences, for every rank.

Sources, one per run: data.corpus (`.txt` files, one document each, and `.jsonl` files, one document per line under
`text_key`, either optionally gzipped, or folders of them; [] = the embedded corpus launch/corpus/shakespeare.jsonl.gz,
twelve of Shakespeare's works, no network needed), tokenized inline into a cache when it is small; data.prepared, a
folder written by `python -m lasp.launch.prepare_data` for a corpus of any size; data.indexed, Megatron indexed
datasets (<prefix>.bin/.idx) read through megatron-core. docs/data.md describes them.

Cache: <cache_dir>/<key>/ is a prepared folder (launch/tokens.py), key = sha256 of the corpus bytes, the text key,
the vocabulary size and CACHE_VERSION. Rank 0 builds it (BPE, trained in about a second on the default corpus) with
the same code as prepare_data, atomically; the other ranks wait, then load it. A corpus above data.inline_max_mb is
refused with the prepare_data command to run instead, so no training job waits on a long build.

Packing: documents are concatenated, each followed by EOS, into one stream s (boundaries as offsets);
sequence i is s[i·T : i·T + T] with labels s[i·T + 1 : i·T + T + 1]. Segment ids (document numbers counted from 0
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
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lasp.launch.tokens import (CACHE_VERSION, DEFAULT_CORPUS, TokenStream, check_token_ids, corpus_files,
                                corpus_key, is_prepared, load_tokenizer, open_indexed, open_prepared, prepare,
                                read_documents, text_bytes)

__all__ = ["DEFAULT_CORPUS", "CACHE_VERSION", "HELDOUT_FRACTION", "corpus_files", "check_corpus", "read_documents",
           "cache_path", "build_cache", "load_tokenizer", "split_bounds", "PackedDataset", "MQAR_FIELDS", "check_mqar",
           "MQARDataset", "shard_batch", "TrainingData", "check_data", "open_data"]

HELDOUT_FRACTION = 0.05    # the last 5% of the token stream: never trained on
SAMPLE_MB = 32             # the tokenizer trains on at most this much text (launch/tokens.py)


def check_corpus(files, text_key="text"):
    """ValueError unless some document has non-whitespace text (read until the first such document)."""
    if next(iter(read_documents(files, text_key)), None) is None:
        raise ValueError(f"data.corpus: the corpus is empty (no text in {[str(f) for f in files]})")


def cache_path(files, text_key, vocab_size, cache_dir, tokenizer_file=None):
    """<cache_dir>/<key>: the key hashes the corpus bytes and every setting that changes the tokens (with
    tokenizer_file, a given sentencepiece model instead of a trained one: its bytes)."""
    return Path(cache_dir).expanduser() / corpus_key(files, text_key, vocab_size, tokenizer_file, SAMPLE_MB)


def build_cache(files, text_key, vocab_size, path, tokenizer_file=None):
    """Train the tokenizer (or copy `tokenizer_file`) and tokenize the corpus into the prepared folder `path`
    (atomically, one process; a no-op if it is complete; a cache from before manifests is replaced)."""
    path = Path(path)
    if not is_prepared(path) and (path / "doc_ids.npy").is_file():
        stale = path.with_name(f"{path.name}.old-{np.random.randint(1 << 30)}")
        try:
            path.rename(stale)                   # an older cache format: rebuilt (the same tokens)
        except OSError as e:
            if path.exists():                    # not another job's rename: a folder we cannot change
                raise ValueError(f"data.cache_dir: {path} holds an older cache that cannot be replaced ({e}): "
                                 f"delete it, or choose another --data.cache_dir") from None
        shutil.rmtree(stale, ignore_errors=True)
    return prepare(files, path, text_key, vocab_size, tokenizer_file, workers=1, sample_mb=SAMPLE_MB,
                   key=path.name, option="data.cache_dir")


@dataclass
class TrainingData:
    """What a run trains on (open_data)."""
    key: str                  # identifies the token stream (checkpoints record it; a resume must match)
    dataset: object           # PackedDataset or MQARDataset: batch(step, dp_rank, dp, batch_size)
    vocab_size: int           # the model's vocabulary: every id is below it
    tokenizer: object = None  # sentencepiece processor (None: no text samples)
    tokenizer_file: Path = None


PREPARE_HINT = ("python -m lasp.launch.prepare_data --corpus {corpus} --out DIR --workers N --vocab-size {vocab}, "
                "then train with --data.prepared DIR (docs/data.md)")


def check_data(cfg_data):
    """The cheap checks every rank makes before any process group: the source exists, an inline corpus is below
    data.inline_max_mb and has text. ValueError naming the key and file."""
    if cfg_data.mqar:
        return
    if cfg_data.tokenizer and not Path(cfg_data.tokenizer).expanduser().is_file():
        raise ValueError(f"data.tokenizer: no such file {cfg_data.tokenizer!r} (a sentencepiece .model)")
    if cfg_data.prepared:
        open_prepared(cfg_data.prepared)
    elif cfg_data.indexed:
        for prefix in cfg_data.indexed:
            for suffix in (".idx", ".bin"):
                if not Path(f"{prefix}{suffix}").expanduser().is_file():
                    raise ValueError(f"data.indexed: {prefix}{suffix} does not exist (a Megatron indexed dataset is "
                                     f"<prefix>.bin + <prefix>.idx)")
    else:
        files = corpus_files(cfg_data.corpus)
        size = sum(map(text_bytes, files))
        if size > cfg_data.inline_max_mb * 1e6:
            corpus = " ".join(cfg_data.corpus) or str(DEFAULT_CORPUS)
            hint = PREPARE_HINT.format(corpus=corpus, vocab=cfg_data.vocab_size)
            raise ValueError(f"data.corpus: {size / 1e6:.0f} MB of text is more than data.inline_max_mb = "
                             f"{cfg_data.inline_max_mb} (the most a training job tokenizes itself): prepare it once "
                             f"with {hint}")
        check_corpus(files, cfg_data.text_key)


def _stream(cfg_data, build):
    """The run's TokenStream; build (rank 0): tokenize the inline corpus into the cache, check indexed ids."""
    tokenizer = Path(cfg_data.tokenizer).expanduser() if cfg_data.tokenizer else None
    if cfg_data.prepared:
        return open_prepared(cfg_data.prepared)
    if cfg_data.indexed:
        stream = open_indexed(cfg_data.indexed, cfg_data.vocab_size, tokenizer)
        if build:
            check_token_ids(stream, [f"{p}.bin" for p in cfg_data.indexed])
        return stream
    files = corpus_files(cfg_data.corpus)
    path = cache_path(files, cfg_data.text_key, cfg_data.vocab_size, cfg_data.cache_dir, tokenizer)
    if build:
        build_cache(files, cfg_data.text_key, cfg_data.vocab_size, path, tokenizer)
    return open_prepared(path, "data.cache_dir", f"delete {path}; the next run rebuilds it")


def open_data(cfg_data, rank, agree):
    """Rank 0 builds or checks the data (cache, indexed ids), agree(error), then every rank opens it, agree(error)
    (agree raises on every rank when any rank failed) -> TrainingData. data.mqar: synthetic, no tokenizer."""
    if cfg_data.mqar:
        dataset = MQARDataset(cfg_data.mqar, cfg_data.seq_len, cfg_data.vocab_size, cfg_data.seed)
        return TrainingData(dataset.key, dataset, cfg_data.vocab_size)
    error = None
    if rank == 0:
        try:
            _stream(cfg_data, build=True)
        except ValueError as e:
            error = e
    agree(error)
    data, error = None, None
    try:
        stream = _stream(cfg_data, build=False)
        tokenizer = load_tokenizer(stream.tokenizer_file) if stream.tokenizer_file else None
        if tokenizer is not None and tokenizer.get_piece_size() > stream.vocab_size:
            raise ValueError(f"data.tokenizer: {stream.tokenizer_file} has {tokenizer.get_piece_size()} pieces, "
                             f"more than data.vocab_size = {stream.vocab_size}")
        dataset = PackedDataset(stream, cfg_data.seq_len, cfg_data.seed)
        data = TrainingData(stream.key, dataset, stream.vocab_size, tokenizer, stream.tokenizer_file)
    except (ValueError, OSError, RuntimeError) as e:
        error = e if isinstance(e, ValueError) else ValueError(f"data: {e}")
    agree(error)
    return data


def _documents(offsets, start, stop):
    """(stop - start,) int64: the document of each position in [start, stop), counted from 0 at start (offsets:
    the sorted document starts, as in TokenStream)."""
    first, last = np.searchsorted(offsets, (start, stop - 1), "right")
    doc = np.zeros(stop - start, np.int64)
    doc[offsets[first:last] - start] = 1                      # offsets strictly increase: one mark per start
    return np.cumsum(doc, out=doc)


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
    """Fixed-length sequences over one split of a token stream (memory-mapped); batches addressed by (step, dp
    rank). A sequence reads seq_len + 1 tokens (the labels), all inside the split. `source`: a TokenStream, or a
    prepared / cache folder."""

    def __init__(self, source, seq_len, seed=0, split="train"):
        stream = source if isinstance(source, TokenStream) else open_prepared(source)
        start, stop = split_bounds(len(stream.tokens), split)
        self.stream = stream                 # keeps the owners of the memory maps alive (megatron-core's readers)
        plain = (lambda a: a.view(np.ndarray) if isinstance(a, np.memmap) else a)   # memmap slices cost µs each
        self.tokens, self.offsets = plain(stream.tokens)[start:stop], plain(stream.offsets)
        self.seq_len, self.seed, self.split, self.start = seq_len, seed, split, start
        self.n_sequences = (len(self.tokens) - 1) // seq_len
        if self.n_sequences < 1:
            raise ValueError(f"data: the {split} split has {len(self.tokens)} tokens (of {len(stream.tokens)}), "
                             f"fewer than one sequence of data.seq_len + 1 = {seq_len + 1}")
        self._order = {}

    def _permutation(self, epoch):
        if epoch not in self._order:
            self._order = {epoch: torch.randperm(self.n_sequences,
                                                 generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return self._order[epoch]

    def sequence(self, i):
        """Packed sequence i -> dict of (T,) tensors: tokens, labels, segment_ids, loss_mask."""
        first = i * self.seq_len
        tok = torch.from_numpy(np.asarray(self.tokens[first:first + self.seq_len + 1], dtype=np.int64))
        doc = torch.from_numpy(_documents(self.offsets, self.start + first, self.start + first + self.seq_len + 1))
        return {"tokens": tok[:-1], "labels": tok[1:], "segment_ids": doc[:-1], "loss_mask": doc[1:] == doc[:-1]}

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
