"""``DynamicBatchSize``: the Lightning callback that moves the batch size during training.

It is glue between the Trainer and three pieces of plain math:

- :mod:`lightning_batch.plugin.memory` finds the largest batch that fits (once, when training starts);
- :mod:`lightning_batch.plugin.noise` measures the gradient noise scale, as often as a share of the fit's
  time allows (``measure_budget``, 2%) or every ``measure_every`` steps;
- :mod:`lightning_batch.plugin.policy` decides, every ``adjust_every`` steps, the batch size and the lr
  multiplier that go with it.

It then writes the decision where the training reads it: the batch size into the
:class:`~lightning_batch.plugin.sampler.ResizableBatchSampler` (mid-epoch; the Trainer is told the
epoch's new length, see :func:`sync_epoch_length`), the lr into the optimizer's param groups and
the schedulers' base lrs.

Under DDP every rank measures its own per-example statistics; the estimates are averaged with
one all-reduce, the decision is taken on rank 0 and broadcast, so all ranks switch at the same
step. Its ``state_dict`` holds the batch size, the EMAs, the throughput model and the lr scale,
so a fit resumed from a checkpoint continues where it was.

Example:
    >>> import lightning.pytorch as pl
    >>> from lightning_batch import TabularDataModule, TaskModule, build_model
    >>> dm = TabularDataModule(data="synthetic-regression", rows=4000, batch_size=16, seed=0)
    >>> dm.setup()
    >>> module = TaskModule(build_model("linear", dm.n_features, 1), lr=0.05)
    >>> resize = DynamicBatchSize(policy="noise", adjust_every=20, probe_memory=False)
    >>> trainer = pl.Trainer(max_epochs=2, callbacks=[resize], use_distributed_sampler=False, logger=False,
    ...                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    >>> trainer.fit(module, datamodule=dm)
    >>> module.samples_seen == 2 * len(dm.train_set), resize.batch_size >= 16
    (True, True)
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_batch.plugin import defaults
from lightning_batch.plugin._lightning_compat import (
    replace_train_dataloader,
    restart_train_iterator,
    scale_scheduler_lrs,
    sync_epoch_length,
)
from lightning_batch.plugin.cadence import (
    WARMUP_DECISIONS,
    DecisionCadence,
    MeasurementBudget,
    effective_ceiling,
)
from lightning_batch.plugin.loader import UnsupportedLoaderError, make_resizable
from lightning_batch.plugin.memory import MemoryProbeResult, probe_training_ceiling, resident_bytes
from lightning_batch.plugin.noise import NoiseMeter, NoiseScaleEMA
from lightning_batch.plugin.policy import (
    BatchPolicy,
    BatchSizeController,
    Decision,
    PolicyContext,
    make_policy,
)
from lightning_batch.plugin.sampler import ResizableBatchSampler

__all__ = ["DynamicBatchSize", "sync_epoch_length"]

log = logging.getLogger(__name__)


@runtime_checkable
class LossModule(Protocol):
    """What DynamicBatchSize needs from a LightningModule to measure everything.

    ``loss(prediction, target)``: the training loss of the network's output on a batch, a mean
    over rows. With it the callback probes the memory ceiling (a few trial steps on random rows)
    and measures the noise of parameters outside ``nn.Linear`` layers (convolutions, norms) with
    micro-batches. Without it, the memory probe is skipped (the batch is bounded by ``max_batch``
    and by any out-of-memory error the module recovers from) and the noise scale covers the
    ``nn.Linear`` layers only, which hooks measure exactly in any module; the callback says so
    once, as a warning and a run tag. Both need training batches of the form
    ``(inputs, targets, ...)``.
    """

    def loss(self, prediction: Tensor, target: Tensor) -> Tensor: ...


#: Measurements of the noise statistics before a decision may act on them.
MIN_MEASUREMENTS = 4

#: The metrics this callback logs (besides ``batch_size`` and ``lr`` for modules that don't).
METRICS = ("gns", "grad_sqr", "grad_var", "throughput", "mem_peak")


class DynamicBatchSize(Callback):
    """Adapt the (global) batch size during training; rescale the learning rate to match.

    Args:
        policy: ``fixed``, ``memory`` (largest that fits), ``noise`` (``k × B_noise``), ``goodput``
            (Pollux: throughput × statistical efficiency) or ``schedule`` (grow at milestones); or a
            :class:`~lightning_batch.plugin.policy.BatchPolicy` object of your own (give it ``times_steps =
            True`` if it reads the throughput model, so it gets ``min_timed_steps`` timed steps a size).
        lr_rule: how lr follows the batch: ``none``, ``linear``, ``sqrt`` or ``adascale``.
        min_batch, max_batch: bounds of the batch size (global, all ranks together).
        multiple: round batch sizes to a multiple of this (sizes below it stay allowed).
        adjust_every: decide every N optimizer steps (sooner when a quarter epoch of rows went by);
            see :mod:`lightning_batch.plugin.cadence` for the exact steps.
        min_timed_steps: the ``goodput`` policy's steps timed at a batch size before it decides
            again (its throughput model fits step times; fewer make it noisier). Decisions then come
            every ``max(adjust_every, min_timed_steps)`` steps, said once in a warning when that is
            more than ``adjust_every``. Default 20; other policies time nothing and ignore it.
        measure_every: measure the noise statistics every N steps; 0 (the default): as often as
            ``measure_budget`` allows. A measurement costs ~0.6 ms on this project's 2-core CPU
            (hooks on every Linear, a few reductions, one host sync), about half a small tabular
            step, and far more for a CNN's micro-batches: a fixed N is right for one model only.
        measure_budget: with ``measure_every=0``, the share of the fit's time measurements may
            take. The callback times them (a measured step's cycle against the unmeasured steps'
            at the same batch, plus the reduction after it) and, at each decision, sets the
            steps between measurements so their cost stays within the budget over the fit so far;
            the first measurements come every other step (the estimates move fastest early, and
            the budget is repaid later). Under DDP rank 0 plans and broadcasts with the decision.
        hysteresis: change only when the predicted gain exceeds this (0.05 = 5%).
        ema_decay: decay per measurement of the EMAs of ``|G|²`` and ``tr(Σ)`` (their ratio is the
            noise scale), with ``noise_window=0``.
        noise_window: the EMAs' half-life as a share of the samples seen so far (see
            :class:`~lightning_batch.plugin.noise.NoiseScaleEMA`), at least 8 start batches.
        noise_k: the ``noise`` policy's multiple of ``B_noise``.
        explore_factor: ``goodput`` tries ``B × explore_factor`` once, to time a second size (only
            without the memory probe: the probe's timed trial steps give the throughput model its
            slope, so the first decision can already jump).
        min_efficiency: ``goodput`` keeps to batches whose statistical efficiency is at least
            this (see :class:`~lightning_batch.plugin.policy.GoodputPolicy`); 0: no bound.
        max_lr_scale: the lr rule's multiplier is capped at this (near the optimum AdaScale
            scales the lr linearly with the batch, the noise floor stops falling and the loss
            can diverge; capped, a larger batch lowers the floor instead).
        milestones, schedule_factor: the ``schedule`` policy's epochs and growth factor.
        probe_memory: find the memory ceiling when training starts (needs ``pl_module.loss``). The
            trial steps run under the Trainer's precision (bf16 activations take half the bytes).
        accumulate: a batch a policy wants beyond the memory ceiling runs as accumulated
            micro-batches of at most the ceiling's rows (as AdaptDL does), one optimizer step on
            the whole batch, instead of being capped at the ceiling. Needs a module that splits
            its step into passes of ``max_rows_per_pass`` rows (:class:`~lightning_batch.tabular.task_module.TaskModule`
            does; the callback sets the attribute); other modules, and the ``memory`` policy (the
            largest batch that fits), are capped at the ceiling.
        memory_budget: share of memory the probe may plan for (of free device memory on CUDA, of
            available RAM on CPU, where an OOM kills the process instead of raising).
        log_every: log this callback's metrics every N steps.
        module_attr: the attribute of the LightningModule holding the network whose forward is
            called once per step (hooks go there); ``None`` hooks the LightningModule itself.
        fallback_microbatches: micro-batches for the noise statistics of parameters outside
            ``nn.Linear`` layers (convolutions...), measured every ``fallback_every`` steps (in
            step with ``measure_every``: such a model is measured on steps that are multiples of
            both). It runs right after the step's backward, at the parameters the per-example
            hooks saw. For the digits CNN, measuring every 20 steps costs ~1-6% of the steps with
            the vectorized micro-batches, 12% with the loop a model with buffers needs
            (``benchmarks/noise_overhead.py --model cnn``).
    """

    def __init__(
        self,
        policy: str | BatchPolicy = defaults.POLICY,
        lr_rule: str = defaults.LR_RULE,
        *,
        min_batch: int = defaults.MIN_BATCH,
        max_batch: int | None = None,
        multiple: int = defaults.MULTIPLE,
        adjust_every: int = defaults.ADJUST_EVERY,
        min_timed_steps: int = defaults.MIN_TIMED_STEPS,
        measure_every: int = defaults.MEASURE_EVERY,
        measure_budget: float = defaults.MEASURE_BUDGET,
        hysteresis: float = defaults.HYSTERESIS,
        ema_decay: float = defaults.EMA_DECAY,
        noise_window: float = defaults.NOISE_WINDOW,
        noise_k: float = defaults.NOISE_K,
        explore_factor: float = defaults.EXPLORE_FACTOR,
        min_efficiency: float = defaults.MIN_EFFICIENCY,
        max_lr_scale: float = defaults.MAX_LR_SCALE,
        milestones: tuple[int, ...] = (),
        schedule_factor: float = defaults.SCHEDULE_FACTOR,
        probe_memory: bool = defaults.PROBE_MEMORY,
        memory_budget: float = defaults.MEMORY_BUDGET,
        log_every: int = defaults.LOG_EVERY,
        module_attr: str | None = "model",
        fallback_microbatches: int = defaults.FALLBACK_MICROBATCHES,
        fallback_every: int = defaults.FALLBACK_EVERY,
        accumulate: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("adjust_every", adjust_every),
            ("min_timed_steps", min_timed_steps),
            ("log_every", log_every),
            ("fallback_every", fallback_every),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(measure_every, bool) or not isinstance(measure_every, int) or measure_every < 0:
            raise ValueError(
                f"measure_every must be an integer >= 0 (0: by time budget), got {measure_every!r}"
            )
        if not 0 < measure_budget <= 0.5:
            raise ValueError(
                f"measure_budget must be a share of the fit's time in (0, 0.5], got {measure_budget!r}"
            )
        if not 0 <= noise_window <= 10:
            raise ValueError(
                f"noise_window must be in [0, 10] (0: ema_decay per measurement), got {noise_window!r}"
            )
        if not 0 < memory_budget <= 1:
            raise ValueError(f"memory_budget must be a fraction in (0, 1], got {memory_budget!r}; e.g. 0.5")
        if isinstance(policy, BatchPolicy):
            # A policy of the user's own (a BatchPolicy subclass), used as it is.
            batch_policy = policy
        else:
            policy_options: dict[str, Any] = {}
            if policy == "noise":
                policy_options = {"k": noise_k}
            elif policy == "goodput":
                policy_options = {"explore_factor": explore_factor, "min_efficiency": min_efficiency}
            elif policy == "schedule":
                policy_options = {"milestones": tuple(milestones), "factor": schedule_factor}
            batch_policy = make_policy(policy, **policy_options)
        self.policy_name = batch_policy.name
        self.lr_rule_name = lr_rule
        self.controller = BatchSizeController(
            batch_policy,
            lr_rule=lr_rule,
            min_batch=min_batch,
            max_batch=max_batch,
            multiple=multiple,
            hysteresis=hysteresis,
            max_lr_scale=max_lr_scale,
        )
        self.ema = NoiseScaleEMA(ema_decay, half_life_share=noise_window or None)
        self.adjust_every = adjust_every
        self.min_timed_steps = min_timed_steps
        # Only goodput reads step times (a policy of one's own says so with times_steps = True).
        times_steps = getattr(batch_policy, "times_steps", batch_policy.name == "goodput")
        self.cadence = DecisionCadence(
            adjust_every, min_timed_steps if times_steps else 1, warmup=WARMUP_DECISIONS
        )
        if self.cadence.effective_every > adjust_every:
            log.warning(
                "DynamicBatchSize: the %s policy times %d steps at each batch size, so it decides every "
                "%d steps, not every adjust_every=%d; pass min_timed_steps=%d (--min-timed-steps) to decide "
                "that often, with a noisier throughput model",
                batch_policy.name,
                min_timed_steps,
                self.cadence.effective_every,
                adjust_every,
                adjust_every,
            )
        self.measure_every = measure_every
        self.measure_budget = measure_budget
        self.probe_memory = probe_memory
        self.memory_budget = memory_budget
        self.log_every = log_every
        self.module_attr = module_attr
        self.fallback_microbatches = fallback_microbatches
        self.fallback_every = fallback_every
        self.accumulate = accumulate

        # Run state (all in state_dict).
        self.base_batch: int | None = None
        self.batch_size: int | None = None
        self.lr_scale = 1.0
        self.ceiling: int | None = None
        self.probe: MemoryProbeResult | None = None
        self.decisions: list[dict[str, Any]] = []
        #: One row per log interval: step, samples_seen, batch_size, lr, gns, ...; for plots and reports.
        self.history: list[dict[str, float]] = []

        # Per-fit scratch.
        self._sampler: ResizableBatchSampler | None = None
        #: Measures each step's noise statistics (None outside a fit); see :class:`NoiseMeter`.
        self.noise_meter: NoiseMeter | None = None
        #: The last all-ranks mean ``(|G|², tr(Σ))`` fed to the EMAs (None: that step was not measured).
        self.last_measurement: tuple[float, float] | None = None
        self._step_started = 0.0
        #: Unmeasured steps' (rows, seconds) not yet in the throughput model: fed in only when read
        #: (a measured step, a decision), so an ordinary step costs a list append.
        self._step_times: list[tuple[int, float]] = []
        self._fit_started = time.perf_counter()
        self._measured_this_step = False
        self._cycle_is_clean = False
        self._samples_seen = 0
        self._loaded_state: dict[str, Any] | None = None
        self._restart_iterator = False
        self._has_loss = True  # set for each fit in setup()
        #: Whether batches beyond the ceiling run as micro-batches in this fit (see ``accumulate``).
        self.accumulates = False
        self._loss_scale = 1.0  # a float16 GradScaler's scale at the measured step's backward
        #: The measurement budget's book-keeping (see ``measure_budget``), in state_dict.
        self.measurement = MeasurementBudget(measure_budget)
        self._rows_since_measurement = 0

    # ------------------------------------------------------------------------------------------
    # set-up

    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        inner = getattr(pl_module, self.module_attr, None) if self.module_attr else None
        return inner if isinstance(inner, nn.Module) else pl_module

    def _adopt_train_loader(self, trainer: pl.Trainer) -> ResizableBatchSampler:
        """The training loader's resizable sampler: the one it has (TabularDataModule's, or the user's
        own), else the loader rebuilt on one (see :mod:`lightning_batch.plugin.loader`). From
        here on this callback reports the trained batches, so the sampler's saved position is right
        whatever the loader fetches ahead."""
        loader = trainer.train_dataloader
        existing = getattr(loader, "batch_sampler", None)
        if not isinstance(existing, ResizableBatchSampler):
            existing = getattr(getattr(trainer, "datamodule", None), "train_batch_sampler", None)
        if isinstance(existing, ResizableBatchSampler):
            sampler = existing
        else:
            if not isinstance(loader, DataLoader):
                raise UnsupportedLoaderError(f"{type(loader).__name__} instead of one torch DataLoader")
            # One seed for every rank (an unseeded RandomSampler would draw its own on each).
            seed = int(torch.randint(2**31 - 1, ()).item())
            seed = int(trainer.strategy.broadcast(seed, src=0))
            loader, sampler = make_resizable(
                loader, seed=seed, rank=trainer.global_rank, world_size=trainer.world_size
            )
            replace_train_dataloader(trainer, loader)
            self._restart_iterator = True
        sampler.position_owner = self
        return sampler

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._has_loss = isinstance(pl_module, LossModule)

    def _say_what_is_not_measured(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per fit: what a module without ``loss()`` leaves unmeasured (warning and run tag)."""
        if self._has_loss:
            return
        assert self.noise_meter is not None
        left_out = list(self.noise_meter.uncovered_parameter_names)
        lost = [
            "the memory probe is skipped (the batch is bounded by max_batch and out-of-memory recoveries)"
        ]
        if left_out:
            lost.append(
                f"the noise scale leaves out {len(left_out)} parameters outside nn.Linear layers "
                f"({', '.join(left_out[:4])}{', ...' if len(left_out) > 4 else ''})"
            )
        message = (
            f"DynamicBatchSize: {type(pl_module).__name__} has no loss(prediction, target) method, so "
            f"{'; '.join(lost)}; add that method to measure them"
        )
        if trainer.is_global_zero:
            log.warning(message)
        _set_run_tag(trainer, "batch_size_not_measured", "; ".join(lost))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()  # the measurement budget's clock (the probe counts)
        self._restart_iterator = False
        self._sampler = self._adopt_train_loader(trainer)
        try:
            self._start(trainer, pl_module)
        finally:
            if self._restart_iterator:
                # The iterator Lightning made before this hook reads the user's loader, or a sampler
                # position restored only now: the first epoch must start from what is set here.
                restart_train_iterator(trainer)
                sync_epoch_length(trainer, self._sampler)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = self._network(pl_module)
        # T, the squared norm of the batch's mean gradient, is read from .grad right after backward
        # (an extra matmul per layer in the hooks would cost as much as the weight gradient itself).
        # That needs .grad to hold exactly this step's gradient: not with gradient accumulation.
        self.noise_meter = NoiseMeter(
            network,
            loss_fn=pl_module.loss if self._has_loss else None,  # type: ignore[attr-defined]
            grad_from_params=trainer.accumulate_grad_batches == 1,
            fallback_microbatches=self.fallback_microbatches,
        )
        self._say_what_is_not_measured(trainer, pl_module)
        self.accumulates = (
            self.accumulate
            and hasattr(pl_module, "max_rows_per_pass")
            and self.controller.policy.name != "memory"  # its batch *is* the ceiling
        )
        if self._loaded_state is not None:
            self._restore(trainer)
            self._limit_rows_per_pass(trainer, pl_module)
            return
        self.base_batch = self._sampler.batch_size
        self.batch_size = self._sampler.batch_size
        # The noise window never shorter than 8 start batches: the first estimates need several.
        self.ema.min_half_life = 8.0 * self.base_batch
        if self.probe_memory and self.controller.policy.name != "fixed":
            self._probe_memory(trainer, pl_module)
            self._limit_rows_per_pass(trainer, pl_module)
        # A start above the ceiling (or the bounds) is corrected before the first step.
        context = self._context(trainer)
        decision = self.controller.decide(context)
        if decision.changed:
            self._apply(trainer, decision, context)

    def _limit_rows_per_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``accumulate``, a rank's forward/backward passes hold at most its share of the ceiling."""
        if not self.accumulates or self.ceiling is None:
            return
        per_rank = max(1, self.ceiling // trainer.world_size)
        current = pl_module.max_rows_per_pass  # type: ignore[attr-defined]
        pl_module.max_rows_per_pass = min(current, per_rank) if current else per_rank  # type: ignore[attr-defined]

    def _probe_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._has_loss:
            return  # said once in _say_what_is_not_measured
        loss_fn = pl_module.loss  # type: ignore[attr-defined]
        loader = trainer.train_dataloader
        dataset, collate = loader.dataset, loader.collate_fn
        batched = callable(getattr(dataset, "__getitems__", None))
        world = trainer.world_size

        def sample_batch(index: Tensor) -> tuple[Tensor, Tensor]:
            # As the DataLoader builds a batch: the dataset's batched read, or rows and the collate.
            rows = dataset.__getitems__(index) if batched else [dataset[int(i)] for i in index]
            x, y = collate(rows)[:2]
            return x, y

        # Each rank probes its own share of the rows (a rank's batch is its share of the global one).
        self.probe = probe_training_ceiling(
            self._network(pl_module),
            loss_fn,
            sample_batch,
            len(dataset) // world or 1,
            pl_module.device,
            self.memory_budget,
            seed=trainer.global_rank,
            # Under the Trainer's precision: autocast changes the activations' bytes per row.
            forward_context=trainer.precision_plugin.forward_context,
        )
        local_ceiling = self.probe.ceiling
        if world > 1:
            # The global ceiling is what the tightest rank can hold, times the number of ranks.
            local_ceiling = int(trainer.strategy.reduce(torch.tensor(float(local_ceiling)), reduce_op="min"))
        self.ceiling = max(1, local_ceiling * world)
        # The trial steps were timed: their per-row cost (a rank's rows) is the throughput model's
        # slope until real steps at sizes far enough apart replace it, so the first decision can jump.
        per_row = self.probe.seconds_per_row()
        if per_row is not None:
            self.controller.throughput.set_prior_slope(per_row / world)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(self.probe.as_dict("memory_probe_"))
            trainer.logger.log_metrics(self.probe.metrics("memory_probe_"), step=trainer.global_step)

    # ------------------------------------------------------------------------------------------
    # every step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sampler is not None:
            sync_epoch_length(trainer, self._sampler)
        self._cycle_is_clean = False  # the first step's cycle includes the epoch's set-up

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sampler is not None and self._sampler.position_owner is self:
            self._sampler.batch_trained()  # in order, once per trained batch: the saved position
        # global_step moves on in the optimizer step: what to measure is decided here, at the start.
        if self.measure_every:
            self._measured_this_step = trainer.global_step % self.measure_every == 0
            fallback = trainer.global_step % self.fallback_every == 0
        else:
            # By the budget: the same on every rank (the spacing is rank 0's plan, broadcast), and a
            # measured step measures everything, micro-batches included, since the budget pays for it.
            self._measured_this_step = fallback = self.measurement.step_begins()
        if self.noise_meter is not None:
            self.noise_meter.begin_step(self._measured_this_step, batch, fallback=fallback)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A step's cost is the whole cycle since the previous step's end (data fetch and the loop's own
        # overhead included: they are the fixed cost alpha that large batches amortise), leaving out
        # cycles that ran a validation or crossed an epoch boundary.
        seconds = time.perf_counter() - self._step_started
        # Global rows from the sampler: identical on every rank (a rank's own share may differ by one),
        # so every rank reaches the same decision points and the broadcast in _decide cannot deadlock.
        rows = self._sampler.last_global_rows if self._sampler is not None else 0
        self._samples_seen += rows
        self._rows_since_measurement += rows
        if self._measured_this_step:
            # A measured step is slower than the others: its time is the measurement's cost, not
            # the throughput model's.
            started = time.perf_counter()
            self._measure(trainer, pl_module)
            cost = time.perf_counter() - started
            plain = self._plain_step_seconds(rows)
            if self._cycle_is_clean and plain is not None:
                cost += seconds - plain
            self.measurement.record(cost)
        elif self._cycle_is_clean:
            self._step_times.append((rows, seconds))
        step = trainer.global_step
        epoch_rows = self._sampler.num_samples if self._sampler is not None else 0
        if self.cadence.step_done(rows, epoch_rows) or self._over_ceiling(trainer):
            self._decide(trainer)
        if step % self.log_every == 0:
            self._log(trainer, pl_module, rows, seconds)
        self._step_started = time.perf_counter()
        self._cycle_is_clean = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before clipping and the optimizer step: the gradients of the weights the hooks saw.
        if self.noise_meter is not None:
            self.noise_meter.after_backward()
            if self._measured_this_step:
                # float16 mixed precision scales the loss, so the hooks and .grad see gradients × S:
                # remember S now (the scaler may change it in the optimizer step) to divide by S².
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                self._loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cycle_is_clean = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cycle_is_clean = False

    def _plain_step_seconds(self, rows: int) -> float | None:
        """An unmeasured step's seconds at ``rows``: the median of those timed, else the model's."""
        self._feed_throughput()
        model = self.controller.throughput
        times = model.times_at(rows)
        if times:
            return times[len(times) // 2]
        return model.step_time(rows) if model.is_fitted else None

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One step's unbiased |G|² and tr(Σ) into the EMAs (averaged over ranks first).

        Every rank takes part in the all-reduce whatever happened locally (a rank that could not
        measure sends NaN), so a rank-local problem cannot deadlock the others; the EMAs move only
        when every rank measured.
        """
        assert self.noise_meter is not None and self._sampler is not None
        estimate = self.noise_meter.estimate(global_rows=self._sampler.last_global_rows)
        values = torch.tensor(estimate if estimate is not None else (math.nan, math.nan), dtype=torch.float64)
        if self._loss_scale != 1.0:
            values /= self._loss_scale**2
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values.to(pl_module.device), reduce_op="mean").cpu()
        grad_sqr, trace = float(values[0]), float(values[1])
        self.last_measurement = None
        if math.isfinite(grad_sqr) and math.isfinite(trace):
            self.last_measurement = (grad_sqr, trace)
            self.ema.update(grad_sqr, trace, samples=self._rows_since_measurement)
            self._rows_since_measurement = 0

    def _over_ceiling(self, trainer: pl.Trainer) -> bool:
        """The batch no longer fits (an out-of-memory error lowered the ceiling): decide now."""
        ceiling = self._effective_ceiling(trainer)
        return ceiling is not None and self.batch_size is not None and self.batch_size > ceiling

    def _feed_throughput(self) -> None:
        for rows, seconds in self._step_times:
            self.controller.observe_step(rows, seconds)
        self._step_times.clear()

    def _context(self, trainer: pl.Trainer) -> PolicyContext:
        # Step times go into the controller's throughput model here and at measured steps (the
        # measurement budget reads it there), not through the context.
        self._feed_throughput()
        gns = self.ema.gns
        grad_sqr = self.ema.grad_sqr
        trace = self.ema.grad_var
        if self.ema.num_updates < MIN_MEASUREMENTS:
            # A noise scale from one to three measurements at the start batch swings by several
            # times (the digits CNN's first decisions went anywhere from B=40 to B=272 on it): no
            # policy or lr rule acts on it yet.
            gns = grad_sqr = trace = None
        return PolicyContext(
            batch_size=self.batch_size or 1,
            base_batch=self.base_batch or 1,
            noise_scale=gns if gns is not None and math.isfinite(gns) else None,
            grad_sqr=max(grad_sqr, 0.0) if grad_sqr is not None else None,
            trace_sigma=max(trace, 0.0) if trace is not None else None,
            ceiling=self._effective_ceiling(trainer),
            epoch=trainer.current_epoch,
        )

    def _effective_ceiling(self, trainer: pl.Trainer) -> int | None:
        """The probed ceiling, lowered by any OOM the module recovered from (rows that fit per pass)."""
        # The sampler's rows are the whole dataset (every rank walks the same permutation): global already.
        epoch_rows = self._sampler.num_samples if self._sampler is not None else None
        if self.accumulates:
            # Memory bounds the rows of a pass, not the batch: only the data (and max_batch) bound it.
            return effective_ceiling(None, None, trainer.world_size, epoch_rows)
        oom_rows = getattr(trainer.lightning_module, "max_rows_per_pass", None)
        return effective_ceiling(self.ceiling, oom_rows, trainer.world_size, epoch_rows)

    def _decide(self, trainer: pl.Trainer) -> None:
        self.cadence.reset()
        decision: Decision | None = None
        context = self._context(trainer)
        interval = self.measurement.interval
        if trainer.is_global_zero:
            decision = self.controller.decide(context)
            if not self.measure_every:
                interval = self.measurement.plan(
                    time.perf_counter() - self._fit_started,
                    self._plain_step_seconds(decision.batch_size),
                    self.ema.num_updates,
                )
        # Rank 0 decides (its throughput model is the one that counts) and plans the measurements;
        # every rank applies the same.
        decision, interval = trainer.strategy.broadcast((decision, interval), src=0)
        self.measurement.interval = interval
        if decision is not None and decision.changed:
            self._apply(trainer, decision, context)

    def _apply(self, trainer: pl.Trainer, decision: Decision, context: PolicyContext) -> None:
        assert self._sampler is not None
        old = self.batch_size
        self._sampler.batch_size = decision.batch_size
        self.batch_size = self._sampler.batch_size
        sync_epoch_length(trainer, self._sampler)
        self._set_lr_scale(trainer, decision.lr_scale)
        self.decisions.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                "samples_seen": self._samples_seen,
                "from": old,
                "to": self.batch_size,
                "lr_scale": self.lr_scale,
                # The statistics the decision (and the AdaScale lr) was taken from: rank 0's, the
                # same as every rank's, since the EMAs move only with all-reduced estimates.
                "grad_sqr": context.grad_sqr,
                "grad_var": context.trace_sigma,
                "reason": decision.reason,
            }
        )
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {"batch_size_change": float(self.batch_size)}, step=trainer.global_step
            )

    def _set_lr_scale(self, trainer: pl.Trainer, scale: float) -> None:
        """Multiply every lr by ``scale / current scale``; schedulers' base lrs follow, so they stay coherent."""
        ratio = scale / self.lr_scale
        if ratio == 1.0:
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= ratio
        for config in trainer.lr_scheduler_configs:
            scale_scheduler_lrs(config.scheduler, ratio)
        self.lr_scale = scale

    # ------------------------------------------------------------------------------------------
    # logging

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: int, seconds: float) -> None:
        gns = self.ema.gns
        row = {
            "step": float(trainer.global_step),
            "samples_seen": float(self._samples_seen),
            "batch_size": float(self.batch_size or rows),
            "lr": float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan"),
            "gns": float(gns) if gns is not None else float("nan"),
            "grad_sqr": float(self.ema.grad_sqr) if self.ema.grad_sqr is not None else float("nan"),
            "grad_var": float(self.ema.grad_var) if self.ema.grad_var is not None else float("nan"),
            "throughput": rows / seconds if seconds > 0 else float("nan"),
            "mem_peak": float(_memory_peak(pl_module.device)),
        }
        self.history.append(row)
        if trainer.logger is None:
            return
        metrics = {k: v for k, v in row.items() if k in METRICS and math.isfinite(v)}
        if not getattr(pl_module, "logs_batch_size", False):
            metrics.update(batch_size=row["batch_size"], lr=row["lr"])
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_batch": self.base_batch,
            "batch_size": self.batch_size,
            "lr_scale": self.lr_scale,
            "ceiling": self.ceiling,
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "ema": self.ema.state_dict(),
            "controller": self.controller.state_dict(),
            "decisions": list(self.decisions),
            "samples_seen": self._samples_seen,
            "measurement": self.measurement.state_dict(),
            "rows_since_measurement": self._rows_since_measurement,
            # Where the next decision falls: a resumed fit decides at the same steps as an unbroken one.
            **self.cadence.state_dict(),
            # The trained position in the epoch: this callback reports trained batches, so it saves
            # them too (a user's loader has nobody else to).
            "sampler": self._sampler.state_dict() if self._sampler is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_train_start, once the sampler exists.
        self._loaded_state = dict(state_dict)

    def _restore(self, trainer: pl.Trainer) -> None:
        state, self._loaded_state = self._loaded_state or {}, None
        self.base_batch = state["base_batch"]
        self.batch_size = state["batch_size"]
        self.lr_scale = float(state["lr_scale"])  # the optimizer's lr was restored with it
        self.ceiling = state["ceiling"]
        self.probe = MemoryProbeResult.from_state_dict(state["probe"]) if state["probe"] else None
        self.ema.load_state_dict(state["ema"])
        self.controller.load_state_dict(state["controller"])
        self.decisions = list(state["decisions"])
        self._samples_seen = int(state["samples_seen"])
        if "measurement" in state:  # checkpoints from before the measurement budget have none
            self.measurement.load_state_dict(state["measurement"])
            self._rows_since_measurement = int(state["rows_since_measurement"])
        self.cadence.load_state_dict(state)
        assert self._sampler is not None
        if state.get("sampler") is not None:
            self._sampler.load_state_dict(state["sampler"])
            self._restart_iterator = True
        if self.batch_size is not None:
            self._sampler.batch_size = self.batch_size
        sync_epoch_length(trainer, self._sampler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A fit that raised (a pruned trial, a KeyboardInterrupt, an error) must not leave the
        # measurement hooks on the user's model.
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if self.noise_meter is not None:
            self.noise_meter.remove()
            self.noise_meter = None


def _set_run_tag(trainer: pl.Trainer, key: str, value: str) -> None:
    """A tag on the run of each logger that has tags (MLflow), else a hyperparameter."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        set_tag = getattr(logger, "set_tag", None)
        experiment = getattr(logger, "experiment", None) if set_tag is None else None
        if callable(set_tag):
            set_tag(key, value)
        elif hasattr(experiment, "set_tag") and getattr(logger, "run_id", None):
            experiment.set_tag(logger.run_id, key, value)
        else:
            logger.log_hyperparams({key: value})


def _memory_peak(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator high-water mark, or the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(Exception):
        return resident_bytes()
    return 0
