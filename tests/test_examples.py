"""The examples in examples/ run as a user runs them, and do what they say: each trains a plain
Lightning project (no class of this package but DynamicBatchSize) and the callback moves its
batch size. examples/ is not a package: each file is loaded by path, as ``python examples/X.py``
would run it, and its ``main`` called in-process with short settings.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
import torch

from lightning_batch.plugin.sampler import ResizableBatchSampler

from .conftest import ROOT


def _example(name: str) -> ModuleType:
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses, pickling and Lightning's hparams look modules up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _moved(callback) -> bool:
    return bool(callback.decisions) and any(d["from"] != d["to"] for d in callback.decisions)


def test_digits_cnn_learns_with_two_workers_while_the_batch_size_moves(capsys, tmp_path, monkeypatch):
    example = _example("digits_cnn")
    # Each process that reads a row leaves a file named for its worker id and pid (workers are
    # forked: the patched class goes with them).
    read_row = example.Digits.__getitem__

    def recorded(self, index):
        info = torch.utils.data.get_worker_info()
        (tmp_path / f"{info.id if info else 'main'}-{os.getpid()}").touch()
        return read_row(self, index)

    monkeypatch.setattr(example.Digits, "__getitem__", recorded)
    result = example.main(["--epochs", "2", "--seed", "0"])
    trainer, callback = result["trainer"], result["callback"]

    assert result["val_acc"] > 0.8, "ten classes: chance is 0.1"
    assert _moved(callback) and callback.batch_size == callback.decisions[-1]["to"]
    assert callback.batch_size != 16
    # The loader that trained is the user's, rebuilt on a resizable sampler with its 2 workers,
    # and those 2 worker processes read the rows (the validation loader reads in this process).
    loader = trainer.train_dataloader
    assert isinstance(loader.batch_sampler, ResizableBatchSampler)
    assert loader.num_workers == 2 and loader.persistent_workers
    readers = {tuple(path.name.split("-")) for path in tmp_path.iterdir()}
    workers = {(who, pid) for who, pid in readers if who != "main"}
    assert {who for who, _ in workers} == {"0", "1"}
    assert all(int(pid) != os.getpid() for _, pid in workers)
    out = capsys.readouterr().out
    assert f"val accuracy {result['val_acc']:.3f}" in out
    assert f"-> {callback.batch_size}; decisions:" in out


def test_regression_datamodule_fits_below_the_target_variance_while_the_batch_size_moves(capsys):
    result = _example("regression_datamodule").main(["--epochs", "3", "--rows", "4096", "--seed", "0"])
    callback, data = result["callback"], result["data"]

    # Predicting the mean scores the target variance; a fit gets near the noise floor.
    assert result["val_loss"] < 0.1 * data.target_variance()
    assert _moved(callback) and callback.batch_size == callback.decisions[-1]["to"]
    # The callback started where the DataModule's batch_size said, and left that attribute alone.
    assert callback.base_batch == data.batch_size == 32
    assert isinstance(result["trainer"].train_dataloader.batch_sampler, ResizableBatchSampler)
    out = capsys.readouterr().out
    assert f"val MSE {result['val_loss']:.3f}" in out
    assert f"32 -> {callback.batch_size} in" in out
