"""DynamicBatchSize dropped into a plain Lightning project (tests/plain_project.py): the user's own
module, DataModule and ``DataLoader(shuffle=True)``, nothing else of this package.

Each epoch must train every row exactly once while the batch size moves mid-epoch (rows are
recorded from the batches, which carry their indices, so worker processes are covered too); a
fit killed mid-epoch resumes exactly; what the callback cannot resize is refused in one line.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, WeightedRandomSampler

from lightning_batch import DynamicBatchSize
from lightning_batch.plugin.loader import UnsupportedLoaderError
from lightning_batch.plugin.sampler import ResizableBatchSampler

from .conftest import ROOT, quiet_trainer, subprocess_env
from .plain_project import PlainRegressor, RowDataset, RowsTrained, fit

NOISE = dict(
    policy="noise", lr_rule="sqrt", adjust_every=8, measure_every=2, min_batch=4, max_batch=256, multiple=1
)


def _epochs(steps: list[list]) -> dict[int, list[int]]:
    epochs: dict[int, list[int]] = {}
    for _, epoch, rows in steps:
        epochs.setdefault(epoch, []).extend(rows)
    return epochs


def _mid_epoch_changes(steps: list[list]) -> int:
    """Batch-size changes between two steps of the same epoch (the last batch of an epoch aside)."""
    changes = 0
    for (_, e1, r1), (_, e2, r2), nxt in zip(steps, steps[1:], [*steps[2:], None], strict=False):
        last_of_epoch = nxt is None or nxt[1] != e2
        changes += e1 == e2 and len(r1) != len(r2) and not last_of_epoch
    return changes


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_plain_loader_is_resized_mid_epoch_and_each_epoch_trains_every_row_once(num_workers, tmp_path):
    rows = RowsTrained()
    sizes_at_epoch_end: list[int] = []

    class SizeAtEpochEnd(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            sizes_at_epoch_end.append(trainer.train_dataloader.batch_sampler.batch_size)

    trainer, _ = fit(
        dict(resize=NOISE, epochs=3, num_workers=num_workers, root=str(tmp_path)), [rows, SizeAtEpochEnd()]
    )
    n = len(trainer.datamodule.dataset)
    epochs = _epochs(rows.steps)
    assert sorted(epochs) == [0, 1, 2]
    for epoch, seen in epochs.items():
        assert sorted(seen) == list(range(n)), f"epoch {epoch}: every row exactly once"
    assert _mid_epoch_changes(rows.steps) >= 2, "the batch size must have moved mid-epoch"
    assert epochs[0] != epochs[1], "shuffle=True: a new order each epoch"
    # The loader was rebuilt with the user's arguments (workers included): batches fetched ahead at
    # the old size are trained as they are, and each epoch starts at the size the last one ended with.
    assert trainer.train_dataloader.num_workers == num_workers
    assert trainer.train_dataloader.persistent_workers == (num_workers > 0)
    first_of_epoch = [r for (_, e, r), prev in zip(rows.steps[1:], rows.steps, strict=False) if prev[1] != e]
    assert [len(r) for r in first_of_epoch] == [min(b, n) for b in sizes_at_epoch_end[:2]]


def test_a_plain_fit_killed_at_a_random_step_resumes_with_every_row_once_and_the_same_weights(tmp_path):
    """SIGKILL from inside a plain-module fit (its own process) at a random step, then resume from
    last.ckpt: each epoch's rows exactly once, and the weights of an unbroken fit to 1e-6."""
    config = dict(resize=NOISE, epochs=2, root=str(tmp_path / "ckpt"), checkpoint_every=7, rows=1000)
    script = str(ROOT / "tests" / "plain_project.py")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, *args],
            cwd=tmp_path,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    unbroken = run("fit", json.dumps({**config, "root": str(tmp_path / "ref")}), str(tmp_path / "ref"))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]
    reference = json.loads((tmp_path / "ref.rank0.json").read_text())
    total_steps = reference["steps"][-1][0]
    kill_step = random.Random().randint(8, total_steps - 2)  # after the first checkpoint, before the end

    killed = run("kill", json.dumps(config), str(kill_step), str(tmp_path / "killed.json"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    checkpoint_step = saved["global_step"]
    # the last step checkpoint before the kill (at a multiple of 7 the kill comes before that save)
    assert checkpoint_step == (kill_step - 1) // 7 * 7
    kept = [s for s in json.loads((tmp_path / "killed.json").read_text()) if s[0] <= checkpoint_step]

    resumed = run("fit", json.dumps(config), str(tmp_path / "resumed"), str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((tmp_path / "resumed.rank0.json").read_text())
    steps = kept + after["steps"]
    for epoch, seen in _epochs(steps).items():
        assert sorted(seen) == list(range(1000)), (
            f"epoch {epoch} (killed at step {kill_step}): every row once"
        )
    assert [s[2] for s in steps] == [s[2] for s in reference["steps"]], f"killed at step {kill_step}"
    for name, values in reference["weights"].items():
        torch.testing.assert_close(
            torch.tensor(after["weights"][name]), torch.tensor(values), rtol=0, atol=1e-6, msg=name
        )


def _two_rank_fit(tmp_path, name: str, config: dict) -> list[dict]:
    """Two epochs of the plain project in 2 DDP processes (gloo); each rank's record."""
    config = dict(epochs=2, devices=2, strategy="ddp", root=str(tmp_path), **config)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "plain_project.py"),
            "fit",
            json.dumps(config),
            str(tmp_path / name),
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.ddp
def test_two_rank_ddp_with_a_plain_loader_covers_each_epoch_once_with_one_batch_size_sequence(tmp_path):
    """Also: the user's ``DataLoader(batch_size=9)`` is per device, as in Lightning, so the rebuilt
    loader starts at a global batch of 2 ranks x 9 = 18 rows (9 on each rank); starting at 9 global
    rows would train the first steps, and anchor every decision (B0), at half the batch asked for."""
    config = dict(resize=NOISE, rows=900, batch_size=9)
    ranks = _two_rank_fit(tmp_path, "ddp", config)
    assert [len(r["steps"][0][2]) for r in ranks] == [9, 9], "the first global batch is 2 x 9 rows"
    assert all(r["steps"][0][1] == 0 for r in ranks)
    assert ranks[0]["decisions"] == ranks[1]["decisions"] and ranks[0]["decisions"]
    sizes = [[len(s[2]) for s in r["steps"]] for r in ranks]
    # one global batch per step: the two ranks' shares differ by at most one row
    assert len(sizes[0]) == len(sizes[1])
    assert all(abs(a - b) <= 1 for a, b in zip(*sizes, strict=True))
    assert len({a + b for a, b in zip(*sizes, strict=True)}) > 2, "the global batch moved"
    epochs = [_epochs(r["steps"]) for r in ranks]
    for epoch in epochs[0]:
        union = epochs[0][epoch] + epochs[1][epoch]
        assert sorted(union) == list(range(900)), f"epoch {epoch}: every row once across ranks"
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.ddp
def test_two_rank_ddp_beyond_the_ceiling_trains_as_the_batch_in_one_pass(tmp_path):
    """Under DDP a global batch of 4x the ceiling runs as 4 passes on each rank (Lightning's own
    accumulation, gradients synchronised once per step): the same weights as a 2-rank fit where the
    batch fits, every row once per epoch."""
    schedule = dict(policy="schedule", milestones=[1], schedule_factor=4.0, lr_rule="none")

    def fit(name: str, ceiling: int) -> list[dict]:
        return _two_rank_fit(tmp_path, name, dict(resize=schedule, rows=1024, batch_size=32, ceiling=ceiling))

    # The probe finds a rank's ceiling: 32 rows a rank, 64 global. B0 is 2 ranks x 32 = 64 global rows;
    # the schedule asks for 256 from epoch 1, 4x the ceiling.
    split, fits = fit("split", ceiling=32), fit("fits", ceiling=10_000)
    assert split[0]["decisions"] == fits[0]["decisions"] == [256]
    assert {len(s[2]) for r in split for s in r["steps"]} == {32}, "every pass a rank's share of the ceiling"
    assert 128 in {len(s[2]) for s in fits[0]["steps"]}, "one pass of 128 rows a rank where it fits"
    for rank in (0, 1):
        for name, values in fits[rank]["weights"].items():
            torch.testing.assert_close(
                torch.tensor(split[rank]["weights"][name]),
                torch.tensor(values),
                rtol=1e-5,
                atol=1e-6,
                msg=name,
            )
    epoch_1 = [row for r in split for s in r["steps"] if s[1] == 1 for row in s[2]]
    assert sorted(epoch_1) == list(range(1024)), "every row once across ranks"


class _Stream(IterableDataset):
    def __iter__(self):
        yield from (torch.zeros(6),) * 4


@pytest.mark.parametrize(
    ("loader", "names"),
    [
        (lambda ds: DataLoader(_Stream(), batch_size=2), "iterable-style dataset"),
        (
            lambda ds: DataLoader(ds, batch_size=8, sampler=WeightedRandomSampler([1.0] * len(ds), len(ds))),
            "custom sampler (WeightedRandomSampler)",
        ),
        (
            lambda ds: DataLoader(ds, batch_sampler=_OwnBatchSampler(ds)),
            "its own batch_sampler (_OwnBatchSampler)",
        ),
        (lambda ds: DataLoader(ds, batch_size=None), "batch_size=None"),
        (lambda ds: DataLoader(ds, batch_size=8, sampler=RandomSampler(ds, replacement=True)), "replacement"),
    ],
    ids=["iterable", "weighted-sampler", "batch-sampler", "no-batching", "with-replacement"],
)
def test_a_loader_that_cannot_be_resized_is_refused_in_one_line(loader, names, tmp_path):
    module = PlainRegressor()
    trainer = quiet_trainer(
        1, [DynamicBatchSize(policy="noise", probe_memory=False)], default_root_dir=tmp_path
    )
    with pytest.raises(UnsupportedLoaderError) as raised:
        trainer.fit(module, train_dataloaders=loader(RowDataset(40)))
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and names in message and "shuffle=True|False" in message


class _OwnBatchSampler(BatchSampler):
    def __init__(self, dataset) -> None:
        super().__init__(RandomSampler(dataset), 8, False)


def test_a_fit_that_raises_mid_measurement_leaves_nothing_watching_the_model(tmp_path):
    """The measurement watches a step's forward through a TorchFunctionMode (and hooks on transformer
    layers built batch_first=False): a fit that raises while it watches must leave neither behind."""
    watching: list[int] = []

    class BoomWhileWatched(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            watching.append(torch._C._len_torch_function_stack())
            if trainer.global_step >= 4 and watching[-1] > 0:
                raise RuntimeError("boom")

    module = PlainRegressor()

    def hooked() -> list[str]:
        return [
            name
            for name, layer in module.named_modules()
            if layer._forward_hooks
            or layer._forward_pre_hooks
            or layer._backward_hooks
            or layer._backward_pre_hooks
        ]

    with pytest.raises(RuntimeError, match="boom"):
        fit(dict(resize=NOISE, root=str(tmp_path)), [BoomWhileWatched()], module=module)
    assert max(watching) > 0, "the measured steps' forwards are watched"
    assert torch._C._len_torch_function_stack() == 0, "a fit that raised must leave no mode watching"
    assert not hooked(), "a fit that raised must leave no hook on the user's model"


class _NoLossRegressor(pl.LightningModule):
    """No ``loss()`` method, and a parameter outside any nn.Linear (an output scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.scale = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return torch.nn.functional.mse_loss(self.net(x) * self.scale, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_without_a_loss_method_the_training_step_serves_the_probe_and_the_micro_batches(tmp_path, caplog):
    """No loss(): the probe's trial steps and the micro-batches of the one parameter without a rule (a
    scale multiplied in) run the module's own training_step; what is not exact is said once, with its
    share, and the exact share is a metric and a run tag."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="plugin", tracking_uri=uri)
    with caplog.at_level("WARNING", logger="lightning_batch.plugin.callback"):
        trainer, _ = fit(
            dict(resize={**NOISE, "probe_memory": True}, root=str(tmp_path), trainer=dict(logger=logger)),
            [],
            module=_NoLossRegressor(),
        )
    resize = next(c for c in trainer.callbacks if isinstance(c, DynamicBatchSize))
    assert resize.probe is not None and resize.ceiling is not None, "probed through training_step"
    said = [r.getMessage() for r in caplog.records if "measured exactly" in r.getMessage()]
    assert len(said) == 1 and "scale (0.77%)" in said[0] and "micro-batches" in said[0], said
    assert resize.measurement.measured_fraction == pytest.approx(129 / 130)
    assert resize.ema.num_updates > 0 and resize.ema.gns is not None
    run = MlflowClient(uri).get_run(logger.run_id)
    assert float(run.data.tags["gns_measured_fraction"]) == pytest.approx(129 / 130, abs=1e-4)
    assert "scale" in run.data.tags["gns_not_exact"]
    history = MlflowClient(uri).get_metric_history(logger.run_id, "gns_measured_fraction")
    assert history and all(m.value == pytest.approx(129 / 130) for m in history)


def test_with_a_loss_method_a_per_row_dataset_is_probed_and_fully_measured(tmp_path, caplog):
    rows = RowsTrained()
    with caplog.at_level("WARNING", logger="lightning_batch.plugin.callback"):
        trainer, _ = fit(dict(resize={**NOISE, "probe_memory": True}, root=str(tmp_path)), [rows])
    resize = next(c for c in trainer.callbacks if isinstance(c, DynamicBatchSize))
    assert resize.probe is not None and resize.ceiling is not None and resize.ceiling >= 1
    assert resize.ema.num_updates > 0 and resize.ema.gns is not None
    assert resize.measurement.measured_fraction == 1.0
    assert not [r for r in caplog.records if "measured exactly" in r.getMessage()]


def test_a_policy_of_ones_own_drives_the_batch_size(tmp_path):
    from lightning_batch.plugin.policy import BatchPolicy

    class Alternate(BatchPolicy):
        """16 and 24 in turn, at every decision."""

        name = "alternate"

        def propose_with_reason(self, ctx):
            return (24 if ctx.batch_size == 16 else 16), "alternate"

    rows = RowsTrained()
    trainer, _ = fit(
        dict(resize=dict(policy=Alternate(), adjust_every=5, multiple=1, hysteresis=0.0), root=str(tmp_path)),
        [rows],
    )
    resize = next(c for c in trainer.callbacks if isinstance(c, DynamicBatchSize))
    assert resize.policy_name == "alternate"
    assert [d["to"] for d in resize.decisions[:4]] == [24, 16, 24, 16]
    # The first before any step, then the warm-up's after 1 and 2 steps, then every 5.
    assert [d["step"] for d in resize.decisions[:5]] == [0, 1, 3, 8, 13]
    assert [len(s[2]) for s in rows.steps[:14]] == [24] + [16] * 2 + [24] * 5 + [16] * 5 + [24]


def _collate_with_marker(rows):
    """A user's own collate: stacks as PyTorch's default does and appends a marker."""
    x, y, index = zip(*rows, strict=True)
    return torch.stack(x), torch.stack(y), torch.tensor(index), "collated by the user"


class _TaggedLoader(DataLoader):
    """A DataLoader subclass with an argument of its own, as users write them."""

    def __init__(self, dataset, tag: str, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


class _TaggedData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.dataset = RowDataset(300)

    def train_dataloader(self):
        return _TaggedLoader(
            self.dataset,
            "mine",
            batch_size=10,
            shuffle=True,
            collate_fn=_collate_with_marker,
            generator=torch.Generator().manual_seed(5),
            drop_last=True,
        )


def test_a_subclassed_loader_keeps_its_own_arguments_collate_generator_and_drop_last(tmp_path):
    markers: list[str] = []
    rows = RowsTrained()

    class Marker(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            markers.append(batch[3])

    resize = DynamicBatchSize(
        policy="schedule", milestones=(1,), probe_memory=False, multiple=1, adjust_every=3
    )
    trainer = quiet_trainer(2, [resize, rows, Marker()], default_root_dir=tmp_path)
    trainer.fit(PlainRegressor(), datamodule=_TaggedData())
    loader = trainer.train_dataloader
    assert type(loader) is _TaggedLoader and loader.tag == "mine"
    assert set(markers) == {"collated by the user"}
    epochs = _epochs(rows.steps)
    # The schedule doubles the batch at the first decision of epoch 1 (after the warm-up's at steps
    # 1 and 2, every 3 steps: 29, 32): 2 batches of 10, then 20s (280 rows: no partial batch for
    # drop_last to drop), and no row comes twice.
    assert [len(s[2]) for s in rows.steps] == [10] * 30 + [10] * 2 + [20] * 14
    assert sorted(epochs[0]) == list(range(300))
    assert len(epochs[1]) == len(set(epochs[1])) == 300
    # the user's generator seeds the shuffle: its seed, not the global RNG, decides the order
    assert epochs[0] == ResizableBatchSampler(300, 10, seed=5).permutation(0).tolist()


class _Stopped(Exception):
    pass


class _StopAt(pl.Callback):
    """Ends the fit by an exception once ``step`` optimizer steps are done (no checkpoint then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise _Stopped


def test_lightning_sees_the_loader_as_resumable_and_a_mid_epoch_resume_does_not_warn(tmp_path):
    import warnings

    config = {"root": str(tmp_path), "checkpoint_every": 10, "epochs": 2, "resize": {"policy": "fixed"}}
    before = RowsTrained()
    with pytest.raises(_Stopped):
        fit(config, [before, _StopAt(13)])
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert (
        saved["global_step"] == 10
        and saved["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 0
    )
    (own,) = [state for key, state in saved["callbacks"].items() if key.startswith("DynamicBatchSize")]
    # Lightning saved the loader's position with its loop, and it is the callback's own.
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [own["sampler"]]
    assert own["sampler"]["cursor"] == 10 * 16

    after = RowsTrained()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit({**config, "checkpoint_every": None}, [after], ckpt_path=str(tmp_path / "last.ckpt"))
    assert not [w for w in caught if "not resumable" in str(w.message)], [str(w.message) for w in caught]
    kept = [step for step in before.steps if step[0] <= 10]
    for epoch, rows in _epochs(kept + after.steps).items():
        assert sorted(rows) == list(range(1200)), f"epoch {epoch}: every row exactly once"


def test_a_plain_loader_with_drop_last_never_trains_a_short_last_batch_even_after_a_resize(tmp_path):
    """``DataLoader(drop_last=True)``: the user excluded the short last batch of every epoch. The
    rebuilt, resizable loader must keep excluding it, before and after a mid-fit resize; otherwise
    the user trains batches of a few rows they asked never to train (noisy steps at full lr)."""
    dataset = RowDataset(100)
    rows = RowsTrained()
    resize = DynamicBatchSize(
        policy="schedule", milestones=(1,), probe_memory=False, multiple=1, adjust_every=2
    )
    trainer = quiet_trainer(2, [resize, rows], default_root_dir=tmp_path)
    loader = DataLoader(dataset, batch_size=16, shuffle=True, drop_last=True)
    trainer.fit(PlainRegressor(), train_dataloaders=loader)
    assert [d["to"] for d in resize.decisions] == [32], "the schedule doubles the batch in epoch 1"
    epochs = _epochs(rows.steps)
    # Epoch 0 at the user's batch: exactly what PyTorch's own loader trains (6 batches of 16, the
    # last 4 rows left out).
    reference = [len(batch[0]) for batch in DataLoader(dataset, batch_size=16, drop_last=True)]
    assert [len(r) for _, e, r in rows.steps if e == 0] == reference == [16] * 6
    # Epoch 1 resizes to 32 mid-epoch: only full batches of 16 or 32, fewer rows left out than one
    # batch of 32, none twice.
    sizes_1 = [len(r) for _, e, r in rows.steps if e == 1]
    assert set(sizes_1) == {16, 32}, sizes_1
    assert len(epochs[1]) == len(set(epochs[1])) and 100 - len(epochs[1]) < 32, sizes_1
