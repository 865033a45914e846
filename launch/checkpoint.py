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
earlier checkpoint: kept, not shadowed; `latest` says which one continues). A folder is pruned by renaming it to
`.del-*` first, so a kill while it is deleted leaves a `.del-*` folder that the next pruning finishes (with any
stale `.tmp-*` and any step folder without a manifest), never a half-deleted step folder.
A run folder belongs to one live job: `lock_run` takes an exclusive flock on <folder>/run.lock for the life of the
process (the kernel drops it when the process ends, kill -9 included, so a dead holder never blocks a resume) and
writes who holds it into the file; a second job is refused naming that holder. A fresh run also refuses a folder
that holds checkpoints already (`check_fresh`), so two runs never mix in one folder.
Loading first verifies the folder and only then reads anything: every name in `latest` and the manifest inside the
folder (no absolute path, no `..`, no link), the manifest listing exactly the files there, sizes and checksums
equal, JSON files small, every torch file weights-only with tensors that hold the bytes their shapes declare: a
corrupt, truncated, tampered or crafted checkpoint is refused with a ValueError naming the file, never loaded half.

The manifest proves integrity, not authenticity (anyone who can write a file can recompute its sha256), so nothing
in a checkpoint may be able to run code when read: every .pt file is read by `load_tensors` (torch's weights-only
unpickler: tensors, numbers, strings and plain containers, plus an explicit allow-list of data classes), the RNG
states are stored as tensors and numbers, and everything else is JSON.
"""
import errno
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lasp.models.serialization import check_storage

__all__ = ["MANIFEST", "LOCK", "step_dir", "lock_run", "unlock_run", "save", "latest", "check_fresh", "verify",
           "verify_manifest", "verify_tensors", "read_trainer_state", "load_tensors", "rng_state", "set_rng_state",
           "write_json", "read_json", "write_failure"]

MANIFEST = "manifest.json"
LOCK = "run.lock"
STEP_NAME = re.compile(r"step_\d{8,}")
JSON_LIMIT = 1 << 24          # bytes: manifest.json, trainer.json and latest are small; a larger one is not ours
_held = {}                    # folder -> fd of the lock this process holds (re-entrant within one process)


# ---------------------------------------------------------------------------------------------- the run lock
def _holder_text(fd):
    """'host H, pid P, started T: command' from a lock file's JSON, or why it cannot be said."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return (f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}: "
                f"{str(holder['command'])[:300]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a job that has not written its name yet (it is starting)"


def lock_run(folder):
    """Hold <folder>/run.lock (exclusive flock) for the life of this process -> None, or a note when the file system
    offers no flock (then nothing is locked). ValueError naming the holder when another live process holds it.
    Taking it again in the same process is a no-op."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _held:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)                             # ENOLCK / EOPNOTSUPP: e.g. Lustre mounted with noflock
            return (f"{folder / LOCK}: this file system offers no flock ({e.strerror}); nothing stops a second "
                    f"job from writing into {folder}")
        holder = _holder_text(fd)
        os.close(fd)
        raise ValueError(f"{folder} is in use by another job ({holder}); it holds {folder / LOCK}. Wait for it to "
                         f"end, stop it, or choose another --run-dir (the lock is released when its process ends, "
                         f"kill -9 included: a job that is gone never blocks a resume)") from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join([sys.executable, *sys.argv]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError:                                  # a full disk: the lock holds, only the holder's name is lost
        pass
    _held[key] = fd
    return None


def unlock_run(folder):
    """Release lock_run(folder) if this process holds it (the file stays: removing it would race a new holder)."""
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- writing


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
    """Write JSON atomically (temp file, fsync, rename); the temp file is removed when the write fails."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path, limit=JSON_LIMIT):
    """The JSON in `path`; ValueError naming the file when it is larger than `limit` bytes or not readable JSON
    (truncated, binary)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path} is not a plain file (a link or missing)")
    if path.stat().st_size > limit:
        raise ValueError(f"{path} has {path.stat().st_size} bytes, more than the {limit} a file of ours has")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): truncated or overwritten?") from None


def write_failure(path, e, where=None, hint="free space or choose another folder"):
    """The ValueError for a failed write: the path, what failed (ENOSPC reads as 'basic_ios::clear' from torch) and
    the free space of the file system holding it (`where`, default the path's nearest existing folder)."""
    where = Path(where) if where else Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free / 2**30
    return ValueError(f"writing {path} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                      f"{free:.2f} GiB free under {where}: {hint}")


def _manifest(folder):
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)
    return {"files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}


def _step_of(folder):
    return int(folder.name.split("_")[-1])


def _complete(root):
    """The complete checkpoint folders under root (a manifest written), oldest step first."""
    return sorted((p for p in Path(root).glob("step_*") if (p / MANIFEST).is_file() and not p.is_symlink()
                   and STEP_NAME.fullmatch(p.name)), key=_step_of)


def _remove(folder):
    """Rename to .del-<name> (atomic), then delete: a kill leaves a .del-* folder, never a half step folder."""
    doomed = folder.with_name(f".del-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(root, keep, written):
    """Remove all but the `keep` newest complete checkpoints with steps <= written's, never `written` itself; and
    what a kill left: .del-* folders (an interrupted prune), .tmp-* folders (an interrupted save), step folders
    without a manifest (a prune interrupted by an older version)."""
    root = Path(root)
    older = [p for p in _complete(root) if _step_of(p) <= _step_of(written) and p != written]
    for old in older[:max(0, len(older) - (keep - 1))]:
        _remove(old)
    for left in [*root.glob(".del-*"), *root.glob(".tmp-*"),
                 *(p for p in root.glob("step_*") if p.is_dir() and not (p / MANIFEST).exists())]:
        shutil.rmtree(left, ignore_errors=True)


def _failure(tmp, root, e):
    """The ValueError for a failed checkpoint write, naming the folder and the free space."""
    return ValueError(f"checkpoint: {write_failure(tmp, e, root, 'free space or choose another --checkpoint.dir')}")


def _publish(root, step, tmp, final, keep):
    """Rank 0: manifest, rename into place, `latest`, prune."""
    write_json(tmp / MANIFEST, _manifest(tmp))
    _fsync(tmp)
    if final.exists():                         # the same step saved again (e.g. SIGTERM right after `every`)
        _remove(final)
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
        name = read_json(root / "latest", limit=4096)["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint: {root / 'latest'} is unreadable ({e}); {intact}: write "
                         f'{{"dir": "<one of them>"}} into it, or remove it to resume from the newest') from None
    if not isinstance(name, str) or not STEP_NAME.fullmatch(name) or (root / name).is_symlink():
        raise ValueError(f"checkpoint: {root / 'latest'} names {str(name)[:200]!r}, not a step folder of this run "
                         f"(step_<8 digits> inside {root}, not a link); {intact}")
    if not (root / name / MANIFEST).is_file():
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


def _inside(folder, name):
    """ValueError unless `name` is a relative path of plain parts inside folder (no absolute path, no '..')."""
    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or any(p in ("..", ".", "") for p in parts) or "\\" in name:
        raise ValueError(f"checkpoint {folder}: {MANIFEST} names {str(name)[:200]!r}, which is not a file inside "
                         f"the checkpoint folder; refusing to load it")


def verify_manifest(folder):
    """Check the manifest before any file is read -> its {name: {size, sha256}}. ValueError unless every name is
    inside the folder, the manifest lists exactly the files there (none missing, none extra: every file a resume
    reads is checked), none is a link, and sizes and checksums are equal (names and sizes are checked for every
    file before any file is hashed)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"checkpoint {folder} is incomplete: it has no {MANIFEST}; refusing to load it")
    try:
        files = read_json(folder / MANIFEST)["files"]
        assert isinstance(files, dict) and all(isinstance(w, dict) and type(w.get("size")) is int
                                               and isinstance(w.get("sha256"), str) for w in files.values())
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"checkpoint {folder}: {MANIFEST} is unreadable or malformed ({e!r}); refusing to load "
                         f"it") from None
    for name in files:
        _inside(folder, name)
    there = {str(p.relative_to(folder)) for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
             and p.name != MANIFEST}
    extra = sorted(there - set(files))
    if extra:
        raise ValueError(f"checkpoint {folder}: {extra[:5]} are not in its {MANIFEST} (planted or left over); "
                         f"refusing to load it")
    for name, want in files.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"checkpoint {folder} is corrupt: {name} is missing (or a link); refusing to load it")
        size = path.stat().st_size
        if size != want["size"]:
            raise ValueError(f"checkpoint {folder} is corrupt: {name} has {size} bytes, the manifest says "
                             f"{want['size']} (truncated?); refusing to load it")
    for name, want in files.items():
        if _sha256(folder / name) != want["sha256"]:
            raise ValueError(f"checkpoint {folder} is corrupt: the checksum of {name} does not match the manifest; "
                             f"refusing to load it")
    return files


def verify_tensors(folder, files, allow=()):
    """Open every listed file that is not JSON as a torch file of tensors and plain containers, memory-mapped (no
    tensor bytes read; `allow`: further data classes), every tensor holding the bytes its shape declares; read every
    JSON file. ValueError naming the file otherwise."""
    folder = Path(folder)
    for name in files:
        if name.endswith(".json"):
            read_json(folder / name)
        else:
            check_storage(load_tensors(folder / name, allow, mmap=True), folder / name)


def verify(folder, allow=()):
    """verify_manifest, then verify_tensors -> the manifest's files."""
    files = verify_manifest(folder)
    verify_tensors(folder, files, allow)
    return files


# trainer.json: field -> (type, lowest value); checked before a resume uses any of it (launch.trainer writes it)
TRAINER_FIELDS = {"step": (int, 0), "samples_per_step": (int, 1), "dp": (int, 1), "sp": (int, 1), "tp": (int, 1),
                  "world_size": (int, 1), "zero": (int, 0), "data_key": (str, None), "model": (dict, None),
                  "data": (dict, None), "schedule": (dict, None)}
SCHEDULE_FIELDS = {"lr": float, "min_lr": float, "warmup_steps": int, "max_steps": int}


def _check_field(where, name, value, kind, low=None):
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ok = ok and (kind is not float or math.isfinite(value)) and (low is None or value >= low)
    if not ok:
        what = {int: "an int", float: "a finite float"}.get(kind, f"a {kind.__name__}")
        raise ValueError(f"{where}: {name} must be {what}{f' >= {low}' if low is not None else ''}, got "
                         f"{str(value)[:100]!r}; refusing to resume from it")


def read_trainer_state(folder):
    """The trainer.json of a checkpoint folder with every known field's type and range checked (step a
    non-negative int equal to the folder's, sizes positive ints, the schedule's numbers finite) -> dict. ValueError
    naming the file and the field otherwise."""
    path = Path(folder) / "trainer.json"
    state = read_json(path, limit=1 << 20)
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: expected a JSON object with a step, got {str(state)[:100]!r}")
    for name, value in state.items():
        if name in TRAINER_FIELDS:
            _check_field(path, name, value, *TRAINER_FIELDS[name])
    if state["step"] != _step_of(Path(folder)):
        raise ValueError(f"{path}: step {state['step']} is not its folder's ({Path(folder).name}); refusing to "
                         f"resume from it")
    schedule = state.get("schedule")
    if schedule is not None:
        for name, kind in SCHEDULE_FIELDS.items():
            _check_field(path, f"schedule.{name}", schedule.get(name), kind, 0)
        restart = schedule.get("restart")
        if restart is not None:
            _check_field(path, "schedule.restart", restart, dict)
            _check_field(path, "schedule.restart.step", restart.get("step"), int, 0)
            _check_field(path, "schedule.restart.lr", restart.get("lr"), float, 0)
    return state


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
