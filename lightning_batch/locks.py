"""One inter-process lock on a file, for writers that share a folder (the MLflow store, the data cache).

>>> import tempfile, pathlib
>>> with file_lock(pathlib.Path(tempfile.mkdtemp()) / "sub" / ".lock"):
...     pass
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def store_lock(tracking_uri: str, purpose: str) -> Iterator[None]:
    """An exclusive lock beside a sqlite MLflow store, one file per ``purpose`` (``registry``,
    ``resume``); none for a tracking server, which has no file its clients share."""
    from lightning_batch.store_uri import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(f"{db.name}.{purpose}.lock")):
        yield
