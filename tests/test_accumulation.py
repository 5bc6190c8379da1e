"""A batch beyond the memory ceiling runs as accumulated micro-batches: same step, same statistics.

References are independent of the code under test: a plain torch optimizer step on the whole
batch, and the noise statistics of the same rows measured in one pass.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_batch import DynamicBatchSize, TabularDataModule, TaskModule, build_model
from lightning_batch.plugin.memory import MemoryProbeResult
from lightning_batch.plugin.noise import NoiseMeter
from tests.conftest import measured_step, quiet_trainer


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("rows_per_pass", [7, 25, 64])
def test_one_step_in_passes_equals_one_plain_step_on_the_whole_batch(optimizer: str, rows_per_pass: int):
    x, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    net = _mlp()
    reference = copy.deepcopy(net)
    module = TaskModule(net, task="classification", n_classes=3, optimizer=optimizer, lr=0.1, momentum=0.0)
    module.max_rows_per_pass = rows_per_pass
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    quiet_trainer(1, [], limit_val_batches=0).fit(module, loader)

    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls(reference.parameters(), lr=0.1)
    nn.functional.cross_entropy(reference(x), y).backward()
    opt.step()
    assert module._step["passes"] == -(-100 // rows_per_pass)
    for got, want in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("passes", [2, 3, 5])
def test_noise_statistics_of_a_step_in_passes_equal_those_of_one_pass(passes: int):
    torch.manual_seed(1)
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    net = _mlp()

    def measure(split: int) -> tuple[float, float]:
        return measured_step(net, NoiseMeter(dict(net.named_parameters()), module=net), x, y, split)

    whole = measure(1)
    split = measure(passes)
    assert split == pytest.approx(whole, rel=1e-5)


def test_interleaved_forwards_are_not_taken_for_passes():
    """Two forwards on halves of the batch before one backward: which call saw which examples cannot
    be told, so nothing is measured exactly (and without a loss nothing at all), and the reason says so."""
    net = _mlp()
    meter = NoiseMeter(dict(net.named_parameters()), module=net)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    meter.begin_step(measure=True, batch=(x, y))
    first = nn.functional.cross_entropy(net(x[:10]), y[:10])
    second = nn.functional.cross_entropy(net(x[10:]), y[10:])
    (first + second).backward()
    meter.after_backward()
    meter.before_optimizer_step()
    assert meter.estimate(global_rows=20) is None
    assert meter.exact == () and "saw 10 examples" in meter.reasons["0.weight"]
    meter.remove()


class MetricsRecorder(Logger):
    """Keeps every logged metric in memory (a stand-in for MLflow, which these tests don't need)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step or 0, dict(metrics)))


def test_a_policy_beyond_the_ceiling_trains_in_micro_batches_and_logs_them(monkeypatch):
    dm = TabularDataModule(data="synthetic-regression", rows=3000, features=6, batch_size=32, seed=0)
    dm.setup()
    module = TaskModule(build_model("mlp", dm.n_features, 1, hidden=[16]), lr=0.01, log_every=5)
    probe = MemoryProbeResult(
        ceiling=48, steps=[(48, 48)], budget_bytes=48, backend="fake", bytes_per_sample=1.0
    )
    monkeypatch.setattr("lightning_batch.plugin.probe.probe_training_ceiling", lambda *a, **k: probe)
    resize = DynamicBatchSize(policy="schedule", milestones=(1,), schedule_factor=4.0, lr_rule="none")
    recorder = MetricsRecorder()
    trainer = quiet_trainer(2, [resize], logger=recorder, log_every_n_steps=5)
    trainer.fit(module, datamodule=dm)
    assert resize.ceiling == 48 and resize.accumulates
    assert resize.batch_size == 128, "the schedule's batch is not capped at the ceiling"
    assert module.max_rows_per_pass == 48
    micro = [m["micro_batches"] for _, m in recorder.rows if "micro_batches" in m]
    assert micro and micro[0] == 1.0 and max(micro) == 3.0  # 128 rows in passes of 48, 48, 32
    assert module.samples_seen == 2 * len(dm.train_set)


def test_without_accumulation_the_ceiling_caps_the_batch(monkeypatch):
    dm = TabularDataModule(data="synthetic-regression", rows=3000, features=6, batch_size=32, seed=0)
    dm.setup()
    module = TaskModule(build_model("mlp", dm.n_features, 1, hidden=[16]), lr=0.01)
    probe = MemoryProbeResult(
        ceiling=48, steps=[(48, 48)], budget_bytes=48, backend="fake", bytes_per_sample=1.0
    )
    monkeypatch.setattr("lightning_batch.plugin.probe.probe_training_ceiling", lambda *a, **k: probe)
    resize = DynamicBatchSize(
        policy="schedule", milestones=(1,), schedule_factor=4.0, lr_rule="none", accumulate=False
    )
    pl.seed_everything(0, verbose=False)
    quiet_trainer(2, [resize]).fit(module, datamodule=dm)
    assert resize.batch_size == 48 and module.max_rows_per_pass is None


class DtypeRecorder(nn.Module):
    """An MLP that remembers the dtype of its output at each call (bf16 under autocast)."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 32), nn.ReLU(), nn.Linear(32, 1))
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        self.dtypes.append(out.dtype)
        return out


@pytest.mark.parametrize(("precision", "dtype"), [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_the_memory_probe_runs_under_the_trainers_precision(precision: str, dtype: torch.dtype):
    dm = TabularDataModule(data="synthetic-regression", rows=2000, features=6, batch_size=32, seed=0)
    dm.setup()
    net = DtypeRecorder(dm.n_features)
    module = TaskModule(net, lr=0.01)
    seen_at_start: list[torch.dtype] = []

    class Mark(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen_at_start:
                seen_at_start.extend(net.dtypes)  # every forward so far was the probe's

    resize = DynamicBatchSize(policy="noise")
    quiet_trainer(1, [resize, Mark()], precision=precision, limit_train_batches=2).fit(module, datamodule=dm)
    assert resize.probe is not None and len(seen_at_start) >= 3  # the warm-up and the trial steps
    assert set(seen_at_start) == {dtype}


def test_a_float16_gradient_scaler_is_divided_out_of_the_noise_statistics():
    """Under 16-mixed the loss is multiplied by the scaler's S before backward, so the hooks and
    .grad see gradients × S; the statistics must come out as in full precision, not × S²."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def first_measurement(plugins: list) -> tuple[float, float]:
        dm = TabularDataModule(data="synthetic-regression", rows=2000, features=6, batch_size=64, seed=0)
        dm.setup()
        torch.manual_seed(0)
        module = TaskModule(build_model("mlp", dm.n_features, 1, hidden=[16]), lr=0.01)
        resize = DynamicBatchSize(policy="noise", probe_memory=False, measure_every=1)
        measured: list[tuple[float, float]] = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if resize.measurement.last is not None and not measured:
                    measured.append(resize.measurement.last)

        quiet_trainer(1, [resize, Keep()], plugins=plugins, limit_train_batches=3).fit(module, datamodule=dm)
        return measured[0]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = first_measurement([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    plain = first_measurement([MixedPrecision("bf16-mixed", "cpu")])  # autocast too, no scaler
    # float16 vs bfloat16 activations differ a little; a missing division would be a factor 2**20.
    assert scaled == pytest.approx(plain, rel=0.05)


def test_gradient_norms_and_clipping_see_unscaled_gradients_under_a_float16_scaler():
    from lightning.pytorch.plugins.precision import MixedPrecision

    def logged_norms(plugins: list) -> list[float]:
        dm = TabularDataModule(data="synthetic-regression", rows=2000, features=6, batch_size=64, seed=0)
        dm.setup()
        torch.manual_seed(0)
        module = TaskModule(
            build_model("mlp", dm.n_features, 1, hidden=[16]), lr=0.01, grad_clip=100.0, log_every=1
        )
        recorder = MetricsRecorder()
        quiet_trainer(1, [], plugins=plugins, logger=recorder, limit_train_batches=4).fit(
            module, datamodule=dm
        )
        return [m["grad_norm"] for _, m in recorder.rows if "grad_norm" in m]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled = logged_norms([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    plain = logged_norms([MixedPrecision("bf16-mixed", "cpu")])
    assert len(scaled) == len(plain) >= 3
    assert scaled == pytest.approx(plain, rel=0.05)  # not × 1024: clipping would act on scaled norms


# -- Lightning's own gradient accumulation -----------------------------------------------------------------


def _accumulating_fit(k: int, callbacks: list) -> dict[tuple[int, int], list[int]]:
    """A plain module under ``Trainer(accumulate_grad_batches=k)``: rows of each micro-batch, per
    ``(epoch, optimizer step)``."""
    from .plain_project import PlainDataModule, PlainRegressor

    micro: dict[tuple[int, int], list[int]] = {}

    class MicroBatches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            micro.setdefault((trainer.current_epoch, trainer.global_step), []).append(len(batch[0]))

    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(2, [*callbacks, MicroBatches()], limit_val_batches=0, accumulate_grad_batches=k)
    trainer.fit(PlainRegressor(), datamodule=PlainDataModule(batch_size=16, rows=1200))
    return micro


def _last_step_of_each_epoch(micro: dict[tuple[int, int], list[int]]) -> dict[int, int]:
    """The optimizer step that ends each epoch (its passes may be fewer, the last one short)."""
    last: dict[int, int] = {}
    for epoch, step in micro:
        last[epoch] = max(last.get(epoch, -1), step)
    return last


def test_under_accumulation_decisions_fall_between_optimizer_steps():
    # Decisions due every 3 micro-batches would land inside 4-batch steps if counted per batch.
    resize = DynamicBatchSize(
        policy="noise", adjust_every=3, measure_every=1, probe_memory=False, noise_k=4.0
    )
    micro = _accumulating_fit(4, [resize])
    assert len({d["to"] for d in resize.decisions}) >= 2, "the batch moved more than once"
    steps = [d["step"] for d in resize.decisions]
    assert len(steps) == len(set(steps)), "one decision at most per optimizer step"
    last_of_epoch = _last_step_of_each_epoch(micro)
    for (epoch, step), sizes in micro.items():
        full = sizes[:-1] if step == last_of_epoch[epoch] else sizes  # an epoch's short tail
        assert len(set(full)) <= 1, f"step {step}: micro-batches of {sizes} rows"
        if step != last_of_epoch[epoch]:
            assert len(sizes) == 4


def test_a_gradient_accumulation_schedule_is_refused_in_one_line():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    from lightning_batch.plugin.measured import UnsupportedSetupError

    resize = DynamicBatchSize(policy="fixed", probe_memory=False)
    with pytest.raises(
        UnsupportedSetupError, match=r"^DynamicBatchSize: a GradientAccumulationScheduler .*\n?$"
    ) as info:
        _accumulating_fit(1, [resize, GradientAccumulationScheduler({0: 2, 1: 4})])
    assert "\n" not in str(info.value)


def test_under_accumulation_the_policy_reasons_in_rows_per_optimizer_step():
    """goodput's efficiency bound B <= (B_noise + B0) / e - B_noise holds for the rows of an optimizer
    step (B0 = 16 rows x 4 passes), and every full step trains exactly the rows the decision chose."""
    resize = DynamicBatchSize(
        policy="goodput",
        min_efficiency=0.5,
        adjust_every=4,
        min_timed_steps=4,
        measure_every=2,
        probe_memory=False,
    )
    micro = _accumulating_fit(4, [resize])
    changes = [d for d in resize.decisions if d["to"] != d["from"] and d["grad_sqr"]]
    assert changes, "the batch moved on a measured noise scale"
    b0 = 16 * 4
    for d in changes:
        noise = d["grad_var"] / d["grad_sqr"]
        bound = (noise + b0) / 0.5 - noise
        assert d["to"] <= bound + 8, (d["to"], bound, d["reason"])  # rounded to a multiple of 8 at most
        assert d["to"] % 4 == 0 and d["from"] % 4 == 0, "rows per step: whole passes"
    chosen = {d["step"]: d["to"] for d in resize.decisions}
    step_rows = 64
    last_of_epoch = _last_step_of_each_epoch(micro)
    for (epoch, step), sizes in sorted(micro.items(), key=lambda item: item[0][1]):
        step_rows = chosen.get(step, step_rows)  # a decision at step s applies from step s on
        if step != last_of_epoch[epoch]:
            assert sum(sizes) == step_rows == 4 * sizes[0], (step, sizes, step_rows)


class PlainClassifier(pl.LightningModule):
    """A user's module, not TaskModule: automatic optimization, its network under ``self.body``.

    It records the rows of each optimizer step (the passes since the last step) and the lr each step
    used, for comparison with a run whose batch fits in one pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.step_rows: list[int] = []
        self.lrs: list[float] = []
        self._rows = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self._rows += len(x)
        return nn.functional.cross_entropy(self.body(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.step_rows.append(self._rows)
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self._rows = 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_plain(
    monkeypatch, ceiling: int, epochs: int = 3, rows: int = 640, callbacks: tuple = (), ckpt_path=None
) -> tuple[PlainClassifier, DynamicBatchSize]:
    """Epochs of ``rows`` rows from B=16; the schedule asks for 4x at each epoch: 16, 64, 256."""
    probe = MemoryProbeResult(
        ceiling=ceiling,
        steps=[(ceiling, ceiling)],
        budget_bytes=ceiling,
        backend="fake",
        bytes_per_sample=1.0,
    )
    monkeypatch.setattr("lightning_batch.plugin.probe.probe_training_ceiling", lambda *a, **k: probe)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(1)  # learnable: the mean gradient is not noise alone
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    module = PlainClassifier()
    resize = DynamicBatchSize(
        policy="schedule",
        milestones=(1, 2),
        schedule_factor=4.0,
        lr_rule="adascale",
        measure_every=1,
        log_every=1,
    )
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        epochs, [resize, *callbacks], limit_val_batches=0, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, resize


def test_a_plain_module_asking_for_4x_the_ceiling_trains_as_one_big_step(monkeypatch):
    """Acceptance (issue 24, part 5): beyond the ceiling Lightning's own accumulation runs the passes;
    rows per step, weights, noise statistics and the AdaScale lr equal a run where the batch fits."""
    fits, fits_resize = _fit_plain(monkeypatch, ceiling=10_000)
    split, split_resize = _fit_plain(monkeypatch, ceiling=64)

    assert [d["to"] for d in split_resize.decisions] == [d["to"] for d in fits_resize.decisions] == [64, 256]
    assert split_resize.batch_size == 64 and split_resize.passes_per_step == 4  # 256 rows in 4 passes of 64
    assert fits_resize.batch_size == 256 and fits_resize.passes_per_step == 1
    # The same rows per optimizer step in both runs; every step has the decided rows but an epoch's last.
    assert split.step_rows == fits.step_rows and 256 in split.step_rows
    assert sum(split.step_rows) == 3 * 640
    for got, want in zip(split.body.parameters(), fits.body.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Measured at every step over all its passes: the same |G|², tr(Σ) and therefore the same lr.
    assert len(split_resize.history) == len(fits_resize.history) == len(split.step_rows)
    for key in ("grad_sqr", "grad_var", "gns", "batch_size"):
        got = torch.tensor([row[key] for row in split_resize.history])
        want = torch.tensor([row[key] for row in fits_resize.history])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(torch.tensor(split.lrs), torch.tensor(fits.lrs), rtol=1e-5, atol=0.0)
    assert max(split.lrs) > 0.05, "AdaScale raised the lr at the larger batches"
    # The fit over, the Trainer has the user's accumulation back.
    assert split_resize.passes.user_passes == 1


def test_a_fit_stopped_between_passes_beyond_the_ceiling_resumes_as_the_unbroken_one(monkeypatch, tmp_path):
    """Stopped mid-epoch while each step runs in 4 passes: the resumed fit has the same passes per
    step, the same rows per step, lrs and final weights as the unbroken fit."""

    class Stop(Exception):
        pass

    unbroken, _ = _fit_plain(monkeypatch, ceiling=64, rows=1280)
    big = [i for i, rows in enumerate(unbroken.step_rows) if rows == 256]
    assert len(big) >= 3, "several steps of 4 passes in the last epoch"
    stop_at = big[1] + 1  # the global step after the second 4-pass step

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == stop_at:
                raise Stop

    saves = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0
    )
    with pytest.raises(Stop):
        _fit_plain(monkeypatch, ceiling=64, rows=1280, callbacks=(StopAt(), saves))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (own,) = [state for key, state in saved["callbacks"].items() if key.startswith("DynamicBatchSize")]
    start = saved["global_step"]  # the checkpoint of the step before the stop (callbacks run first)
    assert start == big[1] and own["passes"]["passes"] == 4
    resumed, _ = _fit_plain(monkeypatch, ceiling=64, rows=1280, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.step_rows == unbroken.step_rows[start:]
    assert resumed.lrs == pytest.approx(unbroken.lrs[start:], rel=1e-9)
    for got, want in zip(resumed.body.parameters(), unbroken.body.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
