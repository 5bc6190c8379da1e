"""Checkpoints written atomically on local disks, whatever filesystem ``$TMPDIR`` is on.

Lightning's ``TorchCheckpointIO`` saves through an fsspec transaction: the bytes go to a temporary
file made by ``tempfile`` (in ``$TMPDIR``) and are then moved over the target. When ``$TMPDIR`` is
another filesystem than the checkpoint folder (a tmpfs ``/tmp``, a different disk), that move is a
copy, and a kill during the copy leaves a torn ``last.ckpt`` that no longer loads: the run's only
resumable state is lost. This writer puts the temporary file beside the target, on the same
filesystem, flushes it to disk and renames it over the target, which POSIX makes atomic: a kill at
any moment leaves either the previous checkpoint or the new one, whole. Remote URLs (``s3://``...)
keep Lightning's own path.

Examples:
    >>> import tempfile, torch
    >>> folder = tempfile.mkdtemp()
    >>> AtomicCheckpointIO().save_checkpoint({"step": 3}, f"{folder}/last.ckpt")
    >>> torch.load(f"{folder}/last.ckpt", weights_only=True)
    {'step': 3}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are a same-folder temporary file renamed over the target."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        # One name per process: DDP ranks or two writers of the same file never share a temporary file.
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        _remove_orphans(target)


def _remove_orphans(target: Path) -> None:
    """Delete temporary files of ``target`` left by a killed process (a resumed run's first save)."""
    for orphan in target.parent.glob(f".{target.name}.*.tmp"):
        pid = orphan.name.removeprefix(f".{target.name}.").removesuffix(".tmp")
        if pid.isdigit() and not _alive(int(pid)):
            orphan.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
