"""Atomic, verified training checkpoints.

Layout: <root>/step_00000120/{manifest.json, trainer.json, model.pt, optim.pt, rng-rank<r>.pt, ...}, and
<root>/latest naming the newest complete one. Writing (every rank calls `save`, in step):

    rank 0 makes <root>/.tmp-step_00000120/          barrier
    every rank writes its files into it and fsyncs   agree (a rank that failed, e.g. disk full, stops every rank)
    rank 0 writes manifest.json (size + sha256 of every file), fsyncs, renames the folder to step_00000120,
    fsyncs <root>, rewrites `latest` (temp file + rename), prunes old checkpoints   barrier

A crash at any point leaves either the previous checkpoints untouched or a `.tmp-*` folder that nothing reads.
Pruning keeps the `keep` newest checkpoints at or below the step just written; it never removes the one `latest`
names (the one just written) and never touches checkpoints of higher steps (left by a run that was rewound to an
earlier checkpoint: kept, not shadowed; `latest` says which one continues). A fresh run refuses a folder that
holds checkpoints already (`check_fresh`), so two runs never mix in one folder.
Loading first verifies the manifest (every file present, sizes and checksums equal) and only then reads
anything: a corrupt or truncated checkpoint is refused with a ValueError naming the file, never loaded half.

The manifest proves integrity, not authenticity (anyone who can write a file can recompute its sha256), so nothing
in a checkpoint may be able to run code when read: every .pt file is read by `load_tensors` (torch's weights-only
unpickler: tensors, numbers, strings and plain containers, plus an explicit allow-list of data classes), the RNG
states are stored as tensors and numbers, and everything else is JSON.
"""
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

__all__ = ["MANIFEST", "step_dir", "save", "latest", "check_fresh", "verify", "load_tensors", "rng_state",
           "set_rng_state", "write_json", "read_json"]

MANIFEST = "manifest.json"


def step_dir(root, step):
    return Path(root) / f"step_{step:08d}"


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path):
    """fsync every file and folder under path. Ranks run this concurrently while another rank may still rename a
    temp file of its own (write_json fsyncs those itself), so a file that vanished is skipped."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                _fsync(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass
        _fsync(dirpath)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj):
    """Write JSON atomically (temp file, fsync, rename)."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def read_json(path):
    """The JSON in `path`; ValueError naming the file when it is not readable JSON (truncated, binary)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): truncated or overwritten?") from None


def _manifest(folder):
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def _step_of(folder):
    return int(folder.name.split("_")[-1])


def _complete(root):
    """The complete checkpoint folders under root (a manifest written), oldest step first."""
    return sorted((p for p in Path(root).glob("step_*") if (p / MANIFEST).is_file()
                   and p.name.split("_")[-1].isdigit()), key=_step_of)


def _prune(root, keep, written):
    """Remove all but the `keep` newest complete checkpoints with steps <= written's; never `written` itself."""
    older = [p for p in _complete(root) if _step_of(p) <= _step_of(written) and p != written]
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _failure(tmp, root, e):
    """The ValueError for a failed write: what failed and the free space (ENOSPC reads as 'basic_ios::clear')."""
    free = shutil.disk_usage(root if Path(root).exists() else Path(root).parent).free / 2**30
    return ValueError(f"checkpoint: writing {tmp} failed ({str(e).splitlines()[0]}); {free:.2f} GiB free under "
                      f"{root}: free space or choose another --checkpoint.dir")


def _publish(root, step, tmp, final, keep):
    """Rank 0: manifest, rename into place, `latest`, prune."""
    write_json(tmp / MANIFEST, _manifest(tmp))
    _fsync(tmp)
    if final.exists():                         # the same step saved again (e.g. SIGTERM right after `every`)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    write_json(root / "latest", {"step": step, "dir": final.name})
    _prune(root, keep, final)


def save(root, step, write_files, *, rank, barrier, keep=2):
    """Write checkpoint `step` under `root`; write_files(folder) writes this rank's files. Returns the folder.

    barrier(error=None): every rank calls it after each phase; with an error on any rank it raises on all
    (pretrain's agreement), so a write that failed on one rank (read-only, disk full) stops every rank with one
    clear ValueError instead of a hang, and the `.tmp-*` folder is removed."""
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    def start():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # left by a crash during an earlier save of this step
        tmp.mkdir()

    def write():
        write_files(tmp)
        _fsync_tree(tmp)
    for mine, phase in ((rank == 0, start), (True, write), (rank == 0, lambda: _publish(root, step, tmp, final, keep))):
        error = None
        try:
            if mine:
                phase()
        except (OSError, RuntimeError) as e:   # torch.save reports ENOSPC as RuntimeError("basic_ios::clear")
            error = _failure(tmp, root, e)
        try:
            barrier(error)
        except ValueError:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def latest(root):
    """The newest complete checkpoint folder under root, or None. ValueError naming `latest` if it is unreadable or
    names a folder that is missing or incomplete (listing the intact checkpoints that are there)."""
    root = Path(root)
    done = _complete(root)
    if not (root / "latest").exists():
        return done[-1] if done else None
    intact = f"intact checkpoints here: {[p.name for p in done]}" if done else "no intact checkpoint here"
    try:
        name = read_json(root / "latest")["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint: {root / 'latest'} is unreadable ({e}); {intact}: write "
                         f'{{"dir": "<one of them>"}} into it, or remove it to resume from the newest') from None
    if not (root / str(name) / MANIFEST).is_file():
        raise ValueError(f"checkpoint: {root / 'latest'} names {name}, which does not exist or is incomplete; "
                         f"{intact}")
    return root / name


def check_fresh(root):
    """ValueError if `root` holds checkpoints already: a run started without --resume must not mix with (prune,
    shadow, overwrite) another run's checkpoints."""
    root = Path(root)
    found = sorted(p.name for p in root.glob("step_*")) + (["latest"] if (root / "latest").exists() else [])
    if found:
        old_run = root.parent if root.name == "checkpoints" else root      # <run dir>/checkpoints by default
        raise ValueError(f"{root} already holds checkpoints of another run ({', '.join(found[-3:])}); nothing was "
                         f"changed. Continue that run with --resume, start a new one with another --run-dir "
                         f"(or --checkpoint.dir), or delete the old one: rm -r {old_run}")


def verify(folder, allow=()):
    """ValueError unless every file of the manifest is there with its size and checksum, and every file that is
    not JSON is a torch file of tensors and plain containers (`allow`: further data classes; read memory-mapped,
    so this costs no tensor reads). Returns the manifest's files."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"checkpoint {folder} is incomplete: it has no {MANIFEST}; refusing to load it")
    try:
        files = read_json(folder / MANIFEST)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {folder}: {MANIFEST} is unreadable ({e}); refusing to load it") from None
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"checkpoint {folder} is corrupt: {name} is missing; refusing to load it")
        size = path.stat().st_size
        if size != want["size"]:
            raise ValueError(f"checkpoint {folder} is corrupt: {name} has {size} bytes, the manifest says "
                             f"{want['size']} (truncated?); refusing to load it")
        if _sha256(path) != want["sha256"]:
            raise ValueError(f"checkpoint {folder} is corrupt: the checksum of {name} does not match the manifest; "
                             f"refusing to load it")
    for name in files:
        if name.endswith(".json"):
            read_json(folder / name)
        else:
            load_tensors(folder / name, allow, mmap=True)
    return files


def load_tensors(path, allow=(), mmap=False):
    """torch.load that cannot run code -> the object. weights_only=True admits tensors, numbers, strings, None and
    plain containers; `allow` names further classes (data only, e.g. DeepSpeed's loss scaler) to rebuild. A file
    naming any other global (os.system, builtins.open, a numpy reconstructor) is refused with a ValueError naming
    the file and the global, before anything in it runs."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it names {found[1]}" if found else str(e).splitlines()[0]
        raise ValueError(f"{path} holds more than tensors and plain containers ({what}); refusing to unpickle it: "
                         f"a checkpoint is data, never code") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch file ({str(e).splitlines()[0]})") from None


def rng_state():
    """Every random generator this process uses (python, numpy, torch CPU and CUDA), as tensors and numbers so
    that `load_tensors` reads it back (no numpy arrays or tuples that need unpickling)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state, source="rng state"):
    """Inverse of `rng_state`; ValueError naming `source` when the entries are not those rng_state writes."""
    try:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
        np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                             npy["cached"]))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{source} is not an RNG state written by launch/checkpoint.py ({e!r})") from None
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
