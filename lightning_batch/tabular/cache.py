"""The prepared data on disk: each split's float32 feature matrix and targets, memory-mapped.

A table whose prepared matrix would not fit a share of the available memory
(``--data-memory-budget``, default 0.25 of it), or any table with ``--data-cache DIR``, is prepared
once, written here, and trained from these files: ``np.load(mmap_mode="c")`` → ``torch.from_numpy``
→ the same :class:`~lightning_batch.tabular.tables.TensorTableDataset` and resizable sampler. A batch is
gathered from the page cache, so a table larger than RAM trains with the anonymous memory of a
batch, not of the table (the file-backed pages are the OS's to drop under pressure).

**One folder per preparation**, ``DIR/<name>-<digest>/``: ``train_x.npy``, ``train_y.npy``, ``val_*``,
``test_*`` and ``meta.json`` (the fitted preprocessing as JSON, task, classes, dropped rows, source,
truth, and the key below in words). The digest is a SHA-256 of:

- the source (the ``data`` option): a file's resolved path, size and modification time (an edited
  file is a new cache); a generator's name; a bundled set's name and scikit-learn's version;
- the value of every other option declared ``prepares_data=True`` in
  :mod:`lightning_batch.config` (the one declaration of a run's options): the generators'
  parameters, target, task, val/test fractions, seed, max_categories, train_on_val. Each option
  declares whether it changes the prepared tables, so a new one cannot be left out of the key by
  forgetting this module (``tests/test_options.py`` refuses an option without a decision, and
  ``tests/test_data_cache.py`` checks each decision against what the preparation makes). Options
  that only read the tables (shuffle, scale_target, batch size, model, ...) are not in it;
- the preparation code (the bytes of the modules in :data:`PREPARATION_CODE`) and the versions of
  numpy, pandas, scikit-learn and pyarrow: new code never trusts an old cache. Old folders are
  never deleted here; remove them by hand (``meta.json`` says what each holds and when it was
  written).

**Written atomically**: into ``DIR/.tmp-...``, every file synced, then renamed to its final name
in one step, so a folder with a digest name is complete by construction, and a killed writer
leaves only a ``.tmp-`` folder that is never read (and is removed by the next writer on this host
once its process is gone). A file found short or damaged on load is moved aside and rebuilt.
Processes preparing the same key at once (Optuna workers, DDP ranks) queue on a lock file: one
prepares, the others read what it wrote.

This module knows files and arrays only; :func:`lightning_batch.tabular.prepare.prepare_data` decides what
goes in and turns the arrays back into datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from lightning_batch.config import SKLEARN_DATASETS, SYNTHETIC_DATASETS, RunConfig
from lightning_batch.locks import file_lock
from lightning_batch.plugin.options import option_fields

#: Bumped when the folder layout or meta.json changes meaning: older folders are then not trusted.
#: 2: the key's options come from the declarations (older caches are prepared again, once).
FORMAT = 2
#: The arrays of a prepared table, by name.
ARRAYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
#: Where caches go without ``--data-cache``, beside the MLflow sqlite store (or under ``mlruns/``).
CACHE_FOLDER = "data-cache"
_META = "meta.json"
_OWNER = "owner.json"
_TMP_PREFIX = ".tmp-"


# -- where and when ---------------------------------------------------------------------------------


def default_cache_dir(tracking_uri: str | None) -> Path:
    """``data-cache/`` beside the MLflow sqlite database (``mlruns/data-cache`` by default); for
    another store (a server, PostgreSQL) ``mlruns/data-cache`` under the working directory."""
    from lightning_batch.store_uri import resolve_tracking_uri, sqlite_path

    db = sqlite_path(resolve_tracking_uri(tracking_uri))
    return (db.parent if db is not None else Path("mlruns")) / CACHE_FOLDER


def available_memory() -> int:
    """Bytes of RAM available to new allocations now (MemAvailable)."""
    from lightning_batch.plugin.memory import available_memory as free_ram

    return free_ram()


def budget_bytes(cfg: RunConfig) -> int:
    """The memory the prepared tables may take: ``data_memory_budget`` of the available RAM."""
    return int(cfg.data_memory_budget * available_memory())


def estimate_prepared_bytes(cfg: RunConfig) -> int:
    """The prepared float32 tables' size, estimated before reading any row.

    Generators: rows x (features + 1) x 4. Parquet: the footer's rows x columns x 4 (one-hot
    encoding may add columns). CSV: the file's size (text takes at least as many bytes as
    float32 for values written with more than three characters). Bundled sets: 0 (kilobytes).
    """
    if cfg.data in SYNTHETIC_DATASETS:
        return int(cfg.rows) * (int(cfg.features) + 1) * 4
    if cfg.data in SKLEARN_DATASETS:
        return 0
    path = Path(cfg.data)
    if path.suffix.lower() == ".csv":
        return path.stat().st_size
    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        return int(meta.num_rows) * int(meta.num_columns) * 4
    except Exception:  # unreadable: the in-memory reader reports it in its own words
        return path.stat().st_size


def cache_for(cfg: RunConfig) -> TableCache | None:
    """The cache a run prepares into and trains from, or None to prepare in memory as before.

    ``--data-cache DIR``: always that folder. Else a table estimated above the budget goes to
    :func:`default_cache_dir`. ``over_budget`` tells the preparation to stream where it can.
    """
    if cfg.data_cache is None and cfg.data in SKLEARN_DATASETS:
        return None
    need, budget = estimate_prepared_bytes(cfg), budget_bytes(cfg)
    over = need > budget
    if cfg.data_cache is None and not over:
        return None
    folder = Path(cfg.data_cache) if cfg.data_cache is not None else default_cache_dir(cfg.tracking_uri)
    return TableCache(folder, cache_key(cfg), over_budget=over, budget=budget)


#: The modules whose code makes the prepared tables: a change to any of them makes new tables.
PREPARATION_CODE = (
    "sources.py",
    "cleaning.py",
    "splitting.py",
    "preprocessing.py",
    "in_memory.py",
    "prepare.py",
    "streaming.py",
    "tables.py",
)

# -- the key --------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def source_identity(cfg: RunConfig) -> dict[str, Any]:
    """What the source is: a file by path, size and mtime; a generator or a bundled set by name.

    A generator's parameters are options declared ``prepares_data`` (:func:`preparing_options`)."""
    if cfg.data in SYNTHETIC_DATASETS:
        return {"generator": cfg.data}
    if cfg.data in SKLEARN_DATASETS:
        return {"bundled": cfg.data, "scikit-learn": _version("scikit-learn")}
    path = Path(cfg.data).resolve()
    stat = path.stat()
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def preparing_options(config: RunConfig | type[RunConfig] = RunConfig) -> list[str]:
    """The options of ``config`` (a run's by default) declared to change the prepared tables, in order.

    An option that has not decided yet is counted in: a needless rebuild costs time, a missing key
    entry would train a run on another run's tables."""
    return [f.name for f, info in option_fields(config) if info.prepares_data is not False]


def cache_key(cfg: RunConfig) -> dict[str, Any]:
    """Everything the prepared tables depend on (hashed into the folder name, kept in meta.json)."""
    code = {
        name: hashlib.sha256(Path(__file__).with_name(name).read_bytes()).hexdigest()[:16]
        for name in PREPARATION_CODE
    }
    return {
        "format": FORMAT,
        # ``data`` is keyed by what it names (source_identity), not by how the path was spelled.
        "source": source_identity(cfg),
        "preparation": {name: getattr(cfg, name) for name in preparing_options(cfg) if name != "data"},
        "code": {
            **code,
            **{name: _version(name) for name in ("numpy", "pandas", "scikit-learn", "pyarrow")},
        },
    }


def digest(key: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``key`` as canonical JSON.

    >>> digest({"b": 1, "a": [2.0]}) == digest({"a": [2.0], "b": 1})
    True
    """
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _readable_name(key: dict[str, Any]) -> str:
    source = key["source"]
    raw = Path(source["file"]).stem if "file" in source else source.get("generator") or source.get("bundled")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(raw))[:40] or "data"


# -- on disk ---------------------------------------------------------------------------------------------


@dataclass
class CachedTables:
    """A prepared table as read back: memory-mapped arrays by name, and the facts in meta.json."""

    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays.values())


class CacheWriter:
    """A temporary folder the preparation writes its arrays into; renamed into place when complete."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.shapes: dict[str, dict[str, Any]] = {}
        self._scratch: list[Path] = []

    def save(self, name: str, array: np.ndarray) -> None:
        """Write a whole array (as ``name.npy``)."""
        with open(self.folder / f"{name}.npy", "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        self.shapes[name] = {"dtype": str(array.dtype), "shape": list(array.shape)}

    def create(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
        """An array to fill in place (``name.npy``), for tables written a block at a time."""
        out = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self.shapes[name] = {"dtype": str(out.dtype), "shape": list(shape)}
        return out

    def scratch(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
        """A temporary array on the cache's disk, deleted before the folder is committed."""
        path = self.folder / f"scratch-{name}.npy"
        self._scratch.append(path)
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def _finish(self, key: dict[str, Any], facts: dict[str, Any]) -> None:
        for path in self._scratch:
            path.unlink(missing_ok=True)
        missing = [name for name in ARRAYS if name not in self.shapes]
        if missing:
            raise RuntimeError(f"the preparation wrote no {missing} into the data cache")
        meta = {
            "key": key,
            "arrays": self.shapes,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **facts,
        }
        (self.folder / _META).write_text(json.dumps(meta, indent=1, default=_jsonable))
        for path in self.folder.iterdir():
            _fsync(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class TableCache:
    """One prepared table's place in ``folder``: found there, or built and written once."""

    folder: Path
    key: dict[str, Any]
    #: The estimate exceeded the budget: preparation should stream where it can.
    over_budget: bool = False
    #: Bytes the preparation may hold in memory (its chunk sizes follow from it).
    budget: int = 0
    #: Set by :meth:`load_or_build`: whether this process prepared the table (False: read it).
    built: bool = field(default=False, init=False)

    @property
    def digest(self) -> str:
        return digest(self.key)

    @property
    def path(self) -> Path:
        return self.folder / f"{_readable_name(self.key)}-{self.digest}"

    def load(self) -> CachedTables | None:
        """The complete cache, memory-mapped, or None. A damaged one is moved aside (``.bad-``)."""
        if not self.path.is_dir():
            return None
        try:
            meta = json.loads((self.path / _META).read_text())
            if meta.get("key") != json.loads(json.dumps(self.key, default=str)):
                raise ValueError("meta.json describes another preparation")
            arrays = {}
            for name in ARRAYS:
                # Copy-on-write: tensors over it are writable, and no write ever reaches the file.
                array = np.load(self.path / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                expected = meta["arrays"][name]
                if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
                    raise ValueError(f"{name}.npy holds {array.dtype}{list(array.shape)}, not {expected}")
                arrays[name] = array
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = self.path.with_name(f".bad-{self.path.name}-{uuid.uuid4().hex[:8]}")
            with contextlib.suppress(OSError):
                self.path.rename(aside)
            print(
                f"data cache {self.path} is damaged ({exc}); moved to {aside.name}, preparing again",
                file=sys.stderr,
            )
            return None
        return CachedTables(arrays, meta, self.path)

    def load_or_build(self, build: Callable[[CacheWriter], dict[str, Any]]) -> CachedTables:
        """Read the cache; without one, ``build(writer)`` writes the arrays and returns the facts
        for meta.json, and the folder is committed atomically. One builder per key at a time."""
        self.folder.mkdir(parents=True, exist_ok=True)
        found = self.load()
        if found is not None:
            return found
        with file_lock(self.folder / f".{self.path.name}.lock"):
            found = self.load()  # another process may have written it while we waited
            if found is not None:
                return found
            _sweep_dead_writers(self.folder)
            tmp = self.folder / f"{_TMP_PREFIX}{self.path.name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            (tmp / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
            try:
                writer = CacheWriter(tmp)
                facts = build(writer)
                writer._finish(self.key, facts)
                _commit(tmp, self.path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self.built = True
        _release_heap()  # what the preparation freed goes back to the OS before training starts
        found = self.load()
        if found is None:
            raise RuntimeError(f"the data cache {self.path} was written but cannot be read back")
        if self.over_budget:
            print(
                f"data: the prepared tables ({found.nbytes / 1e9:.2f} GB) are over --data-memory-budget "
                f"({self.budget / 1e9:.2f} GB of RAM); written once to {self.path} and trained from there, "
                "memory-mapped (later runs reuse them; delete the folder to reclaim the disk)",
                file=sys.stderr,
            )
        return found


def _release_heap() -> None:
    from lightning_batch.plugin.memory import release_free_memory

    release_free_memory()
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished folder to its digest name (atomic), then sync the parent folder."""
    try:
        tmp.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # written meanwhile by a writer without our lock
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_dead_writers(folder: Path) -> None:
    """Remove ``.tmp-`` folders left by writers on this host whose process is gone."""
    host = socket.gethostname()
    for tmp in folder.glob(f"{_TMP_PREFIX}*"):
        try:
            owner = json.loads((tmp / _OWNER).read_text())
        except (OSError, ValueError):
            continue  # being created right now, or not ours to judge
        if owner.get("host") == host and not _alive(int(owner.get("pid", 0))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
