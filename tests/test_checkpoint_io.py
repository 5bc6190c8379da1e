"""AtomicCheckpointIO where a checkpoint can be lost: remote and ``file://`` paths, a failed save, a
writer killed mid-save, and the leftovers of other processes (the mutation target
``make mutate-checkpoint-io``, with the two writer tests in tests/test_faults.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from lightning_batch.plugin.checkpoint_io import AtomicCheckpointIO


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _dead_pid() -> int:
    """The pid of a process that has ended (and been waited for)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_a_file_url_is_written_atomically_at_its_path(tmp_path: Path, monkeypatch):
    """``file://`` is a local path: written beside the target and renamed, not through fsspec."""
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real_replace(a, b)))
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "deep" / "er" / "last.ckpt"  # missing parents are created
    AtomicCheckpointIO().save_checkpoint({"step": 7}, f"file://{target}")
    assert _load(target) == {"step": 7}
    assert [(a.parent, b) for a, b in renames] == [(target.parent, target)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep"], "nothing written under another name"


def test_a_remote_url_goes_through_lightnings_writer(tmp_path: Path, monkeypatch):
    """``memory://`` (any URL but file://) keeps Lightning's fsspec path: no local folder named after it."""
    monkeypatch.chdir(tmp_path)
    url = "memory://lightning-batch-test/run/last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3}, url)
    with fsspec.open(url, "rb") as handle:
        assert torch.load(handle, weights_only=True) == {"step": 3}
    assert not list(tmp_path.iterdir()), "a URL was taken for a local path"
    fsspec.filesystem("memory").rm("/lightning-batch-test", recursive=True)


def test_a_save_that_fails_keeps_the_previous_checkpoint_and_leaves_nothing(tmp_path: Path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    with pytest.raises(Exception):  # noqa: B017  (pickle's error type varies by Python version)
        AtomicCheckpointIO().save_checkpoint({"step": 2, "f": lambda: None}, target)
    assert _load(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_writer_killed_mid_save_leaves_the_last_checkpoint_and_its_leftover_goes_with_the_next_save(
    tmp_path: Path,
):
    """A forked writer is SIGKILLed after its bytes are written, before the rename: last.ckpt is the
    previous checkpoint, whole; the next save (of another process) removes the dead writer's file."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    child = os.fork()
    if child == 0:  # pragma: no cover - the child dies here
        try:
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # type: ignore[assignment]
            AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.name for p in leftovers] == [f".last.ckpt.{child}.tmp"]
    assert torch.load(leftovers[0], weights_only=True) == {"step": 2}, "the killed save had its bytes"
    assert _load(target) == {"step": 1}
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _load(target) == {"step": 3}


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder any user may write in (pytest's own tmp folders are private to their owner)."""
    folder = Path(
        tempfile.mkdtemp(prefix="lightning-batch-test-", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_leftovers_of_live_processes_and_of_other_files_stay(shared_folder: Path):
    """Only a dead writer's temporary file of this very checkpoint is removed: not a live process's
    (left undisturbed), not another checkpoint's, not a name without a pid; and, saved by another
    user who may not signal that live process, its file stays too."""
    target = shared_folder / "last.ckpt"
    dead = _dead_pid()
    # A live writer of this test's own: never probe another process (a mutant may send a real signal).
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    keep = [
        f".last.ckpt.{live.pid}.tmp",
        f".best.ckpt.{dead}.tmp",
        ".last.ckpt.x1.tmp",
        f".last.ckpt.{dead}.tmp.bak",
    ]
    try:
        for save in (_save_here, _save_unprivileged):
            for name in keep + [f".last.ckpt.{dead}.tmp"]:
                (shared_folder / name).write_bytes(b"PK")
            save(target)
            assert sorted(p.name for p in shared_folder.iterdir()) == sorted(keep + ["last.ckpt"]), save
            assert live.poll() is None, "the live writer was disturbed"
    finally:
        live.kill()
        live.wait()


def _save_here(target: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)


def _save_unprivileged(target: Path) -> None:
    """Save as user nobody (in a forked child) where this process may signal every process (root)."""
    if os.geteuid() != 0:
        return _save_here(target)  # already unprivileged; the live writer is ours to signal, though
    child = os.fork()
    if child == 0:  # pragma: no cover - checked through the exit status
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            _save_here(target)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_leftover_removed_meanwhile_by_another_writer_does_not_fail_the_save(tmp_path: Path, monkeypatch):
    """Two writers sweeping one folder: the dead writer's file may be gone by the time this one
    removes it (simulated: it goes while its pid is being checked)."""
    target = tmp_path / "last.ckpt"
    dead = _dead_pid()
    orphan = tmp_path / f".last.ckpt.{dead}.tmp"
    orphan.write_bytes(b"PK")
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == dead:
            orphan.unlink()  # the other writer's sweep
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert _load(target) == {"step": 1}


def test_a_remote_url_refuses_storage_options_as_lightnings_writer_does(tmp_path: Path, monkeypatch):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    monkeypatch.chdir(tmp_path)
    url = "memory://lightning-batch-test/options/last.ckpt"
    for writer in (TorchCheckpointIO(), AtomicCheckpointIO()):
        with pytest.raises(TypeError, match="storage_options"):
            writer.save_checkpoint({"step": 1}, url, storage_options={"anon": True})
