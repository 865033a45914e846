"""Token streams: corpus files -> (validated text) -> a sentencepiece tokenizer -> token ids on disk, and back.

One code path prepares every stream: the inline cache of a small corpus (launch/data.py build_cache, one process)
and `python -m lasp.launch.prepare_data` for a large one (N worker processes). Both write a prepared folder:

    tokenizer.model    the sentencepiece model (trained on a bounded sample of the corpus, or the one given)
    tokens.npy         (N,) uint16 when every id < 65,536, else uint32: each document's ids, then EOS, in order
    doc_offsets.npy    (D + 1,) int64: document d is tokens[offsets[d] : offsets[d + 1]]; offsets[D] = N
    manifest.json      written last: counts, dtype, key, and each file's size (checked when read)

Writing is atomic: everything goes to <out>.tmp-<host>-<pid>-* beside <out>, is fsynced, and the folder is renamed
into place with its manifest; a killed preparation leaves only a .tmp folder (removed by the next run on the same
host once its process is gone), never a folder that reads as complete. Memory does not grow with the corpus:
documents stream through in chunks of CHUNK_BYTES, at most two per worker in flight; a document longer than
PIECE_BYTES (a big .txt) is encoded in pieces cut at line ends; the tokenizer trains on at most `sample_mb` MB.

Reading validates every file as it goes: a .gz that is truncated, fails its CRC or is not gzip, bytes that are not
UTF-8 (file and byte offset), a jsonl line that is not JSON or lacks the text field (file and line) -> ValueError
naming the file. Megatron indexed datasets (<prefix>.bin + <prefix>.idx) are read through megatron-core's own
IndexedDataset; the .bin of a dataset written by IndexedDatasetBuilder is one contiguous token array.
"""
import codecs
import gzip
import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SUFFIXES", "DEFAULT_CORPUS", "CACHE_VERSION", "TokenStream", "corpus_files", "read_pieces",
           "read_documents", "text_bytes", "corpus_key", "prepare", "load_tokenizer", "open_prepared",
           "open_indexed", "check_token_ids", "is_prepared", "prepare_settings"]

DEFAULT_CORPUS = Path(__file__).resolve().parent / "corpus" / "shakespeare.jsonl.gz"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
CACHE_VERSION = 2          # 2: the held-out split (a new data key, so a version-1 run does not resume on it)
PIECE_BYTES = 16 << 20     # a longer document is encoded in pieces cut at line ends
CHUNK_BYTES = 1 << 20      # text per unit of work sent to a worker
FORMAT = "lasp-tokens/1"


# ---------------------------------------------------------------------------------------------- reading
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


def _open_binary(path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _decode(raw, path, offset, where=""):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data.corpus: {path} is not UTF-8 text: byte {offset + e.start}{where} ({e.reason}, "
                         f"{raw[e.start:e.end]!r}); convert it, e.g. iconv -f <its encoding> -t utf-8") from None


def _jsonl_pieces(path, text_key):
    """(text, True, bytes) per document: one JSON object per line, the text under text_key."""
    offset = 0
    with _open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            if raw.strip():
                line = _decode(raw, path, offset, f" (line {n})")
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"data.corpus: {path}:{n} is not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(f"data.corpus: {path}:{n} has no string field {text_key!r} (data.text_key)")
                if record[text_key].strip():
                    yield record[text_key], True, len(raw)
            offset += len(raw)


def _newlines(text):
    return text.replace("\r\n", "\n").replace("\r", "\n")       # what text-mode reading (universal newlines) did


def _txt_pieces(path, piece_bytes):
    """One document per file: (text, ends_document, bytes) pieces cut at line ends once past piece_bytes (a file
    below that is one piece, exactly its text); whitespace-only documents yield nothing."""
    decoder, pending, pending_bytes, offset, started = codecs.getincrementaldecoder("utf-8")(), "", 0, 0, False
    with _open_binary(path) as f:
        while True:
            block = f.read(piece_bytes)
            final = not block
            try:
                pending += decoder.decode(block, final=final)
            except UnicodeDecodeError as e:            # e.object: the decoder's held-back bytes, then block
                at = offset + len(block) - len(e.object) + e.start
                raise ValueError(f"data.corpus: {path} is not UTF-8 text: byte {at} ({e.reason}); convert it, e.g. "
                                 f"iconv -f <its encoding> -t utf-8") from None
            offset, pending_bytes = offset + len(block), pending_bytes + len(block)
            if not final and pending_bytes < piece_bytes:
                continue
            cut = len(pending) if final else (pending.rfind("\n") + 1 or len(pending) - pending.endswith("\r"))
            piece, pending, nbytes, pending_bytes = pending[:cut], pending[cut:], pending_bytes, 0
            if piece.strip():
                started = True
                yield _newlines(piece), final, nbytes
            elif final and started:
                yield "", True, nbytes                 # ends the document whose text came in earlier pieces
            if final:
                return


def _read_error(path, e):
    if path.name.endswith(".gz"):
        return ValueError(f"data.corpus: {path} is not a valid gzip file ({type(e).__name__}: {e}): truncated, "
                          f"corrupt or not gzip-compressed; check it with gzip -t and re-create it")
    return ValueError(f"data.corpus: cannot read {path} ({e})")


def read_pieces(files, text_key="text", piece_bytes=PIECE_BYTES):
    """Yield (text, ends_document, n_bytes) over the corpus, validating each file (module docstring); documents
    with no non-whitespace text are skipped. ValueError naming the file (and line / byte) on bad input."""
    for path in map(Path, files):
        try:
            if _kind(path) == "jsonl":
                yield from _jsonl_pieces(path, text_key)
            else:
                yield from _txt_pieces(path, piece_bytes)
        except (OSError, EOFError, zlib.error) as e:
            raise _read_error(path, e) from None


def read_documents(files, text_key="text"):
    """Yield each non-empty document's text (a document past PIECE_BYTES: its pieces). ValueError on bad input."""
    return (text for text, _, _ in read_pieces(files, text_key))


def text_bytes(path):
    """Estimated bytes of text in a corpus file: its size, or for .gz the size in its trailer (mod 2^32)."""
    size = Path(path).stat().st_size
    if not str(path).endswith(".gz") or size < 18:
        return size
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        estimate = int.from_bytes(f.read(4), "little")
    while estimate < size:                         # a file above 4 GiB of text: its trailer wrapped around
        estimate += 1 << 32
    return estimate if estimate <= 1000 * size else 4 * size   # no trailer (a damaged file): a guess


def corpus_key(files, text_key, vocab_size, tokenizer_file=None, sample_mb=None):
    """A 20-hex key of the corpus bytes and every setting that changes the tokens (with tokenizer_file, a given
    sentencepiece model: its bytes; the tokenizer sample size only when it is smaller than the corpus)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} vocab={vocab_size} key={text_key}".encode())
    if tokenizer_file is not None:
        h.update(b"\0tokenizer\0" + Path(tokenizer_file).read_bytes())
    elif sample_mb is not None and sum(map(text_bytes, files)) > sample_mb * 1e6:
        h.update(f"\0sample={sample_mb}".encode())
    for path in files:
        h.update(f"\0{_kind(Path(path))}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path):
    """The sentencepiece model: a file, or tokenizer.model in a folder."""
    import sentencepiece as spm
    path = Path(path)
    return spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model" if path.is_dir() else path))


def _sample_lines(files, text_key, sample_mb):
    """The non-empty lines of a uniform sample of documents holding about sample_mb MB (all of a smaller corpus,
    in order); stops at the budget."""
    budget = sample_mb * 1e6
    keep, rng, used = min(1.0, budget / max(1, sum(map(text_bytes, files)))), random.Random(0), 0
    for text, _, _ in read_pieces(files, text_key):
        if keep < 1 and rng.random() >= keep:
            continue
        for line in text.split("\n"):
            if line.strip():
                used += len(line)
                if used > budget:
                    return
                yield line


def _train_tokenizer(lines, vocab_size, model_file):
    """BPE; newlines kept as a symbol and text not normalised, so decode ∘ encode = id."""
    import sentencepiece as spm
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(model_file.with_suffix("")), vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"data: sentencepiece could not train a {vocab_size}-token vocabulary: {e}") from None
    model_file.with_suffix(".vocab").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- tokenizing
_WORKER = {}


def _init_worker(model_file, dtype):
    _WORKER.update(sp=load_tokenizer(model_file), dtype=dtype)


def _encode_chunk(chunk):
    """[(text, ends_document)] -> (ids with EOS after each ended document, (n,) tokens per piece, (n,) ends)."""
    sp, texts = _WORKER["sp"], [text for text, _ in chunk]
    ends = np.fromiter((end for _, end in chunk), bool, len(chunk))
    ids = sp.encode(texts, num_threads=1)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + ends
    eos = [sp.eos_id()]
    flat = np.fromiter((t for piece, end in zip(ids, ends) for t in (piece + eos if end else piece)),
                       _WORKER["dtype"], int(lengths.sum()))
    return flat, lengths, ends


def _chunks(pieces, chunk_bytes):
    """Group (text, ends, bytes) pieces into ([(text, ends)], bytes) chunks of about chunk_bytes."""
    chunk, size = [], 0
    for text, end, n in pieces:
        chunk.append((text, end))
        size += n
        if size >= chunk_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def _encoded(chunks, workers, model_file, dtype):
    """Yield (_encode_chunk(chunk), bytes) in corpus order: in this process (workers=1) or N forked processes
    with at most 2·N chunks in flight (the memory bound). Forked, not spawned: importing lasp.launch imports torch,
    seconds and ~200 MB per spawned worker; a forked one shares the parent's pages and never touches torch.
    A worker that dies ends the run with a message (a multiprocessing.Pool would wait for its result forever)."""
    if workers == 1:
        _init_worker(model_file, dtype)
        yield from ((_encode_chunk(chunk), size) for chunk, size in chunks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    pending, context = deque(), multiprocessing.get_context("fork")
    try:
        with ProcessPoolExecutor(workers, context, _init_worker, (str(model_file), dtype)) as pool:
            for chunk, size in chunks:
                pending.append((pool.submit(_encode_chunk, chunk), size))
                if len(pending) >= 2 * workers:
                    future, size = pending.popleft()
                    yield future.result(), size
            while pending:
                future, size = pending.popleft()
                yield future.result(), size
    except BrokenProcessPool:
        raise ValueError(f"data: a tokenizing worker process died (killed, or out of memory with {workers} "
                         f"workers): run again, with fewer --workers if memory is short") from None


class _NpyWriter:
    """A 1-D .npy written in pieces: a fixed 128-byte header, rewritten with the final length by close()."""
    HEADER = 128

    def __init__(self, path, dtype):
        self.file, self.dtype, self.n = open(path, "wb"), np.dtype(dtype), 0
        self.file.write(b"\0" * self.HEADER)

    def write(self, array):
        self.file.write(np.ascontiguousarray(array, self.dtype).tobytes())
        self.n += len(array)

    def close(self):
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                       "shape": (self.n,)})
        header = header.ljust(self.HEADER - 10 - 1) + "\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1"))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def _tokenize(files, text_key, tmp, workers, dtype, progress):
    """Write tokens.npy and doc_offsets.npy in tmp -> (n_tokens, n_documents)."""
    tokens, offsets = _NpyWriter(tmp / "tokens.npy", dtype), _NpyWriter(tmp / "doc_offsets.npy", np.int64)
    offsets.write(np.zeros(1, np.int64))
    chunks = _chunks(read_pieces(files, text_key), CHUNK_BYTES)
    for (flat, lengths, ends), size in _encoded(chunks, workers, tmp / "tokenizer.model", dtype):
        offsets.write((tokens.n + np.cumsum(lengths))[ends])
        tokens.write(flat)
        if progress is not None:
            progress(size, len(flat))
    tokens.close()
    offsets.close()
    return tokens.n, offsets.n - 1


# ---------------------------------------------------------------------------------------------- the folder
def is_prepared(path):
    return (Path(path) / "manifest.json").is_file()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(out):
    """Remove <out>.tmp-<this host>-<pid>-* folders whose process is gone (a killed preparation)."""
    prefix = f"{out.name}.tmp-{socket.gethostname()}-"
    for tmp in out.parent.glob(f"{out.name}.tmp-*"):
        pid = tmp.name[len(prefix):].partition("-")[0]
        if tmp.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_manifest(tmp, manifest):
    manifest["files"] = {name: (tmp / name).stat().st_size for name in ("tokenizer.model", "tokens.npy",
                                                                        "doc_offsets.npy")}
    with open(tmp / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def prepare(files, out, text_key="text", vocab_size=1024, tokenizer_file=None, workers=1, sample_mb=32,
            key=None, progress=None, option="--out"):
    """Tokenize the corpus `files` into the prepared folder `out` (module docstring) -> out; a no-op if out is
    already complete. ValueError (naming the file, or `option` for an unwritable folder) on bad input or a failed
    write; nothing is left that reads as complete. progress(bytes, tokens): (0, 0) once the tokenizer is ready,
    then per chunk."""
    out = Path(out).expanduser()
    if is_prepared(out):
        return out
    if out.exists():
        raise ValueError(f"{option}: {out} exists and is not a prepared dataset (no manifest.json): remove it or "
                         f"choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=out.parent))
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)            # mkdtemp's 0700 would keep a shared dataset from its readers
    except OSError as e:
        raise ValueError(f"{option}: cannot write into {out.parent} ({e.strerror or e}): choose a writable "
                         f"folder") from None
    try:
        return _prepare_into(tmp, out, files, text_key, vocab_size, tokenizer_file, workers, sample_mb, key,
                             progress)
    except OSError as e:
        free = shutil.disk_usage(out.parent).free / 2**30 if out.parent.exists() else 0
        raise ValueError(f"{option}: writing {out} failed ({e.strerror or e}; {free:.2f} GiB free in "
                         f"{out.parent}): free space or choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_settings(files, text_key, vocab_size, tokenizer_file, sample_mb):
    """What a preparation was asked for (the manifest's "settings"; prepare_data compares them before reusing)."""
    return {"corpus": [str(Path(f).resolve()) for f in files], "text_key": text_key,
            "tokenizer": str(Path(tokenizer_file).resolve()) if tokenizer_file else None,
            "vocab_size": None if tokenizer_file else vocab_size, "sample_mb": None if tokenizer_file else sample_mb}


def _prepare_into(tmp, out, files, text_key, vocab_size, tokenizer_file, workers, sample_mb, key, progress):
    if tokenizer_file is None:
        _train_tokenizer(_sample_lines(files, text_key, sample_mb), vocab_size, tmp / "tokenizer.model")
    else:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
    sp = load_tokenizer(tmp)
    dtype = np.uint16 if sp.get_piece_size() <= 1 << 16 else np.uint32
    if progress is not None:
        progress(0, 0)                           # the tokenizer is ready: tokenizing starts
    n_tokens, n_docs = _tokenize(files, text_key, tmp, workers, dtype, progress)
    if n_docs == 0:
        raise ValueError(f"data.corpus: the corpus is empty (no text in {[str(f) for f in files]})")
    _write_manifest(tmp, {
        "format": FORMAT, "key": key or corpus_key(files, text_key, vocab_size, tokenizer_file, sample_mb),
        "n_tokens": n_tokens, "n_documents": n_docs, "dtype": np.dtype(dtype).name,
        "vocab_size": sp.get_piece_size(), "eos_id": sp.eos_id(), "text_key": text_key,
        "corpus": [{"path": str(f), "bytes": Path(f).stat().st_size} for f in files],
        "settings": prepare_settings(files, text_key, vocab_size, tokenizer_file, sample_mb)})
    try:
        os.rename(tmp, out)                     # atomic; fails if another job got there first, which is fine
    except OSError:
        if not is_prepared(out):
            raise
    _fsync_dir(out.parent)
    return out


# ---------------------------------------------------------------------------------------------- reading back
@dataclass
class TokenStream:
    """A token stream as training reads it: ids (1-D, memory-mapped), document boundaries, what identifies it."""
    tokens: object            # (N,) ids: a memory-mapped np.ndarray, or _Concat of several (len and [a:b] slices)
    offsets: np.ndarray       # (D + 1,) int64, strictly increasing: document d is tokens[offsets[d]:offsets[d + 1]]
    key: str                  # identifies the stream: checkpoints record it, resume compares it
    vocab_size: int           # every id is below it (the model's vocabulary)
    tokenizer_file: Path = None   # the sentencepiece model, if known (samples, launch/generate.py)
    owners: tuple = ()        # objects that own the memory maps (megatron-core readers)


class _Concat:
    """Several 1-D arrays read as one: len(), contiguous [a:b] slices (lazy views), np.asarray."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.n = sum(map(len, self.parts))

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        start, stop, step = index.indices(self.n)
        assert step == 1, "contiguous slices only"
        views, pos = [], 0
        for part in self.parts:
            lo, hi = max(start - pos, 0), min(stop - pos, len(part))
            if lo < hi:
                views.append(part[lo:hi])
            pos += len(part)
        if len(views) <= 1:
            return views[0] if views else self.parts[0][0:0]
        return _Concat(views)

    def __array__(self, dtype=None, copy=None):
        joined = np.concatenate(self.parts)
        return joined if dtype is None else joined.astype(dtype)


def _load_npy(path, remedy):
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}): {remedy}") from None


def _open_legacy(path):
    """A token cache written before manifests (tokens.npy int32 + doc_ids.npy, one id per token)."""
    remedy = f"delete {path} and run again"
    tokens, doc_ids = _load_npy(path / "tokens.npy", remedy), _load_npy(path / "doc_ids.npy", remedy)
    starts = np.flatnonzero(np.diff(doc_ids)) + 1
    offsets = np.concatenate([[0], starts, [len(tokens)]]).astype(np.int64)
    return TokenStream(tokens, offsets, path.name, int(tokens.max(initial=0)) + 1, path / "tokenizer.model")


def open_prepared(path, option="data.prepared", remedy=None):
    """A prepared folder (module docstring) -> TokenStream, its files checked against the manifest. ValueError
    naming the path and what to do when it is incomplete, truncated or not one."""
    path = Path(path).expanduser()
    remedy = remedy or f"prepare it again (python -m lasp.launch.prepare_data --out {path} ...)"
    if not is_prepared(path):
        if (path / "tokens.npy").is_file() and (path / "doc_ids.npy").is_file():
            return _open_legacy(path)
        what = "does not exist" if not path.exists() else "holds no manifest.json (unfinished or not prepared)"
        raise ValueError(f"{option}: {path} {what}: {remedy}")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        sizes, n_tokens = dict(manifest["files"]), int(manifest["n_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{option}: {path / 'manifest.json'} is not a valid manifest ({e}): {remedy}") from None
    for name, size in sizes.items():
        found = (path / name).stat().st_size if (path / name).is_file() else None
        if found != size:
            raise ValueError(f"{option}: {path / name} is {found} bytes, its manifest says {size} (truncated or "
                             f"changed since it was prepared): {remedy}")
    tokens, offsets = _load_npy(path / "tokens.npy", remedy), _load_npy(path / "doc_offsets.npy", remedy)
    if len(tokens) != n_tokens or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n_tokens:
        raise ValueError(f"{option}: {path} holds {len(tokens)} tokens and offsets ending at "
                         f"{offsets[-1] if len(offsets) else None}, its manifest says {n_tokens}: {remedy}")
    return TokenStream(tokens, offsets, str(manifest.get("key", path.name)), int(manifest["vocab_size"]),
                       path / "tokenizer.model")


def _megatron_dataset(prefix):
    """megatron-core's IndexedDataset on <prefix>.idx/.bin (imported here: it takes seconds and warns about
    Transformer Engine / Apex, which reading needs neither of)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    for suffix in (".idx", ".bin"):
        if not Path(prefix + suffix).is_file():
            raise ValueError(f"data.indexed: {prefix}{suffix} does not exist (a Megatron indexed dataset is "
                             f"<prefix>.bin + <prefix>.idx, as tools/preprocess_data.py writes them)")
    with open(prefix + ".idx", "rb") as f:
        if f.read(9) != b"MMIDIDX\x00\x00":          # megatron-core's header; its reader asserts on it
            raise ValueError(f"data.indexed: {prefix}.idx / .bin cannot be read by megatron-core (no MMIDIDX header): "
                             f"not an indexed dataset")
    try:
        return IndexedDataset(prefix)
    except (AssertionError, ValueError, OSError, IndexError, TypeError) as e:
        raise ValueError(f"data.indexed: {prefix}.idx / .bin cannot be read by megatron-core ({e}): not an indexed "
                         f"dataset, or truncated") from None


def _indexed_part(prefix):
    """One prefix -> (ids (N,), document starts (D,) int64, dataset): the .bin read as one array."""
    ds = _megatron_dataset(prefix)
    lengths, pointers, docs = ds.sequence_lengths, ds.index.sequence_pointers, ds.document_indices
    itemsize, size = np.dtype(ds.index.dtype).itemsize, Path(prefix + ".bin").stat().st_size
    end = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    if len(lengths) and (pointers[0] != 0 or end != size):
        raise ValueError(f"data.indexed: {prefix}.bin is {size} bytes, its .idx describes {end} (truncated, or "
                         f"not one contiguous array as IndexedDatasetBuilder writes)")
    tokens = ds.bin_reader.read(dtype=ds.index.dtype, count=size // itemsize, offset=0)
    starts = np.asarray(pointers[np.asarray(docs[:-1])], np.int64) // itemsize
    return tokens, starts[starts < len(tokens)], ds


def open_indexed(prefixes, vocab_size, tokenizer_file=None):
    """Megatron indexed datasets, concatenated in the given order -> TokenStream (ids < vocab_size, checked by
    check_token_ids). ValueError naming the prefix."""
    parts = [_indexed_part(str(Path(p).expanduser())) for p in prefixes]
    sizes = np.cumsum([0] + [len(t) for t, _, _ in parts])
    offsets = np.concatenate([starts + base for (_, starts, _), base in zip(parts, sizes)] + [sizes[-1:]])
    tokens = parts[0][0] if len(parts) == 1 else _Concat([t for t, _, _ in parts])
    if sizes[-1] == 0:
        raise ValueError(f"data.indexed: {list(prefixes)} hold no tokens")
    h = hashlib.sha256(b"indexed")
    for prefix in prefixes:
        h.update(Path(str(prefix) + ".idx").read_bytes() + str(Path(str(prefix) + ".bin").stat().st_size).encode())
    return TokenStream(tokens, np.unique(offsets), "indexed-" + h.hexdigest()[:20], vocab_size,
                       Path(tokenizer_file) if tokenizer_file else None, tuple(ds for _, _, ds in parts))


def check_token_ids(stream, names, block=1 << 26):
    """ValueError naming the file when an id is negative or >= stream.vocab_size (one pass over the ids)."""
    parts = stream.tokens.parts if isinstance(stream.tokens, _Concat) else [stream.tokens]
    for part, name in zip(parts, names):
        for start in range(0, len(part), block):
            piece = part[start:start + block]
            low, high = int(piece.min()), int(piece.max())
            if low < 0 or high >= stream.vocab_size:
                raise ValueError(f"data.indexed: {name} holds token id {high if high >= stream.vocab_size else low},"
                                 f" outside data.vocab_size = {stream.vocab_size}: set --data.vocab_size to the "
                                 f"tokenizer's vocabulary (at least {high + 1})")
