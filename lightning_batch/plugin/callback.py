"""``DynamicBatchSize``: the Lightning callback that moves the batch size during training.

It is glue between the Trainer and pieces that know nothing of Lightning:

- :mod:`~lightning_batch.plugin.probe` finds the largest batch that fits (once, when training starts);
- :mod:`~lightning_batch.plugin.noise` measures the gradient noise scale of the parameters the
  optimizers update (:mod:`~lightning_batch.plugin.measured`), on the steps the
  :class:`~lightning_batch.plugin.clock.StepClock` picks (2% of the fit's time by default);
- :mod:`~lightning_batch.plugin.policy` decides, when the :mod:`~lightning_batch.plugin.cadence`
  says so, the batch size and the lr multiplier that goes with it.

It writes each decision where training reads it: the batch size into the
:class:`~lightning_batch.plugin.sampler.ResizableBatchSampler` (mid-epoch; the Trainer is told the
epoch's new length), the lr into the optimizers' param groups and the schedulers' base lrs. Under
DDP every rank measures its own rows, the estimates are averaged with one all-reduce, and rank 0
decides and broadcasts, so every rank switches at the same step. Its ``state_dict`` holds
everything a decision depends on, so a fit resumed from a checkpoint goes on where it stopped.

Examples:
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
import inspect
import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler

from lightning_batch.plugin._lightning_compat import (
    destroy_process_group_at_exit,
    drop_saved_loader_position,
    optimizer_step_done,
    restart_train_iterator,
    scale_scheduler_lrs,
    sync_epoch_length,
)
from lightning_batch.plugin.cadence import DecisionCadence, DecisionsKept, effective_ceiling
from lightning_batch.plugin.clock import StepClock
from lightning_batch.plugin.fit_noise import FitNoiseMeasurement
from lightning_batch.plugin.loader import adopt_train_loader
from lightning_batch.plugin.measured import UnsupportedSetupError
from lightning_batch.plugin.memory import MemoryProbeResult, resident_bytes
from lightning_batch.plugin.noise import NoiseScaleEMA
from lightning_batch.plugin.options import BatchSizeOptions, default_of, option_fields
from lightning_batch.plugin.passes import SplitsItsPasses, StepPasses
from lightning_batch.plugin.policy import (
    BatchSizeController,
    Decision,
    FixedPolicy,
    MemoryPolicy,
    PolicyContext,
    SchedulePolicy,
    make_lr_rule,
)
from lightning_batch.plugin.probe import probe_fit_ceiling
from lightning_batch.plugin.sampler import ResizableBatchSampler
from lightning_batch.plugin.schedules import (
    ScheduleProgress,
    drive_step_schedulers,
    release_step_schedulers,
    rows_worth,
)
from lightning_batch.plugin.step_loss import LossModule, StepLoss

__all__ = ["DynamicBatchSize", "LossModule", "UnsupportedSetupError", "resolve_lr_rule"]

log = logging.getLogger(__name__)

#: Measurements of the noise statistics before a decision may act on them: from one to three
#: measurements at the start batch the noise scale swings by several times (the digits CNN's first
#: decisions went anywhere from B=40 to B=272 on it).
MIN_MEASUREMENTS = 4
#: The metrics this callback logs (``batch_size``: the rows of an optimizer step, as the policy chose).
METRICS = (
    "batch_size",
    "lr",
    "gns",
    "grad_sqr",
    "grad_var",
    "gns_measured_fraction",
    "throughput",
    "mem_peak",
)
#: Optimizers whose step is not a plain multiple of the gradient, so AdaScale's gain does not apply.
ADAPTIVE_OPTIMIZERS = ("Adam", "AdamW", "RAdam", "NAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop")


def resolve_lr_rule(rule: str, optimizers: list[torch.optim.Optimizer]) -> str:
    """``auto``: ``adascale`` when every optimizer is SGD, else ``sqrt`` (AdaScale's derivation holds
    for SGD's step only); any other rule as it is.

    >>> net = torch.nn.Linear(2, 1)
    >>> resolve_lr_rule("auto", [torch.optim.SGD(net.parameters(), lr=0.1)])
    'adascale'
    >>> resolve_lr_rule("auto", [torch.optim.AdamW(net.parameters())])
    'sqrt'
    """
    if rule != "auto":
        return rule
    if optimizers and all(type(o).__name__ == "SGD" for o in optimizers):
        return "adascale"
    unknown = sorted({type(o).__name__ for o in optimizers} - {"SGD", *ADAPTIVE_OPTIMIZERS})
    if unknown:
        log.warning(
            "DynamicBatchSize: lr_rule='auto' scales the lr of %s by the square root of the batch "
            "ratio; pass lr_rule= to choose otherwise",
            ", ".join(unknown),
        )
    return "sqrt"


class DynamicBatchSize(Callback):
    """Adapt the (global) batch size during training; rescale the learning rate to match.

    Every option is declared once, in :class:`~lightning_batch.plugin.options.BatchSizeOptions`;
    the arguments below are generated from those declarations.
    """

    def __init__(self, policy: Any = None, lr_rule: str | None = None, **options: Any) -> None:
        super().__init__()
        given: dict[str, Any] = {
            name: value for name, value in (("policy", policy), ("lr_rule", lr_rule)) if value is not None
        }
        #: The checked options (a frozen :class:`BatchSizeOptions`).
        self.options = opts = BatchSizeOptions(**given, **options)
        # An lr rule of "auto" follows the optimizers, known when the fit starts (none until then).
        self.controller = BatchSizeController.from_options(
            opts, lr_rule="none" if opts.lr_rule == "auto" else None
        )
        batch_policy = self.controller.policy
        self.policy_name = batch_policy.name
        self.lr_rule_name = opts.lr_rule
        self.ema = NoiseScaleEMA(opts.ema_decay, half_life_share=opts.noise_window or None)
        self.cadence = DecisionCadence.for_policy(batch_policy, opts.adjust_every, opts.min_timed_steps)
        self.clock = StepClock(
            opts.measure_every, opts.fallback_every, opts.measure_budget, self.controller.throughput
        )

        # Run state (all in state_dict).
        self.base_batch: int | None = None
        self.batch_size: int | None = None
        self.lr_scale = 1.0
        self.ceiling: int | None = None
        self.probe: MemoryProbeResult | None = None
        self.decisions: list[dict[str, Any]] = []  # the changes
        self.kept = DecisionsKept()  # the decision points that kept the batch, and why
        #: One row per log interval: step, samples_seen, batch_size, lr, gns, ...; for plots and reports.
        self.history: list[dict[str, float]] = []
        self._samples_seen = 0
        self._rows_in_step = 0  # rows of the optimizer step so far (its micro-batches, with accumulation)
        self._full_step_lr_scale: float | None = None  # the batch's lr scale, while a short step trains
        #: The noise meter of this fit, the last measurement and the share measured exactly.
        self.measurement = FitNoiseMeasurement(self.ema, opts.fallback_microbatches, opts.noise_gradients)
        #: How far step-interval lr schedulers have come, in starting-batch steps (``schedule_progress``).
        self.schedule_progress = ScheduleProgress()

        # Per-fit scratch.
        self._sampler: ResizableBatchSampler | None = None
        self._loaded_state: dict[str, Any] | None = None
        self._restart_iterator = False
        self._step_loss: StepLoss | None = None  # the loss of batches the callback builds (per fit)
        #: Whether batches beyond the ceiling run as micro-batches in this fit (see ``accumulate``).
        self.accumulates = False
        #: The passes of an optimizer step: the user's accumulation, and more beyond the ceiling.
        self.passes = StepPasses()

    # -- set-up ---------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.start_fit()  # the measurement budget's clock: the probe counts
        if trainer.world_size > 1:
            destroy_process_group_at_exit()  # else gloo can abort the process after a good fit
        self._sampler, self._restart_iterator = adopt_train_loader(trainer, self)
        try:
            self._start(trainer, pl_module)
        finally:
            if self._restart_iterator:
                # The iterator Lightning made before this hook reads the user's loader, or a sampler
                # position restored only now: the first epoch must start from what is set here.
                restart_train_iterator(trainer)
                sync_epoch_length(trainer, self._sampler)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._sampler is not None
        if self.lr_rule_name == "auto":
            self.lr_rule_name = resolve_lr_rule("auto", list(trainer.optimizers))
            self.controller.lr_rule = make_lr_rule(self.lr_rule_name)
        if trainer.logger is not None and trainer.is_global_zero:  # "auto" resolved (again on a resume)
            trainer.logger.log_hyperparams({"lr_rule_resolved": self.lr_rule_name})
        if any(isinstance(c, GradientAccumulationScheduler) for c in getattr(trainer, "callbacks", ())):
            raise UnsupportedSetupError(
                "DynamicBatchSize: a GradientAccumulationScheduler changes the rows of an optimizer step "
                "behind the batch-size policy's back; pass Trainer(accumulate_grad_batches=k) (one k for the fit)"
            )
        self.passes = StepPasses(max(1, int(trainer.accumulate_grad_batches)))
        self.controller.accumulation = self.passes.user_passes
        step_loss = StepLoss.for_fit(trainer, pl_module)
        self._step_loss = step_loss if isinstance(step_loss, StepLoss) else None
        if self._step_loss is not None and self._step_loss.note:
            _warn(trainer, self._step_loss.note)
        self._attach_meter(trainer, pl_module)
        if self.options.schedule_progress:
            drive_step_schedulers(trainer, pl_module, self.schedule_progress, self._schedule_step_worth)
        # Beyond the ceiling: Lightning's accumulation (automatic optimization), or a module that splits
        # its own steps (manual optimization); the memory policy's batch *is* the ceiling.
        self.accumulates = (
            self.options.accumulate
            and (pl_module.automatic_optimization or isinstance(pl_module, SplitsItsPasses))
            and self.controller.policy.name != "memory"
        )
        if self.accumulates and pl_module.automatic_optimization:
            self.passes.take_over(trainer)
        if self._loaded_state is not None:
            self._restore(trainer)
            self._limit_rows_per_pass(trainer, pl_module)
            return
        self.base_batch = self.batch_size = self._sampler.batch_size
        # The noise window never shorter than 8 start batches: the first estimates need several.
        self.ema.min_half_life = 8.0 * self.base_batch
        if self.options.probe_memory and self.controller.policy.name != "fixed":
            if isinstance(step_loss, StepLoss):
                self._probe_memory(trainer, step_loss)
                self._limit_rows_per_pass(trainer, pl_module)
            else:
                why = f"the memory probe is skipped ({step_loss}): the batch is bounded by max_batch and out-of-memory recoveries"
                _warn(trainer, why)
                _set_run_tag(trainer, "batch_size_not_probed", why)
        # A start above the ceiling (or the bounds) is corrected before the first step.
        context = self._context(trainer)
        decision = self.controller.decide(context)
        if decision.changed:
            self._apply(trainer, decision, context)

    @property
    def passes_per_step(self) -> int:
        """Passes per optimizer step (``accumulate_grad_batches``): the policy's batch is ``batch_size`` x it."""
        return self.passes.passes

    def _schedule_step_worth(self) -> float:
        """The starting-batch steps this optimizer step is worth: AdaScale's gain, else rows / B0."""
        if self.lr_rule_name == "adascale":
            return self.lr_scale  # the gain r at the current batch: its scale-invariant iterations
        sampler = self._sampler
        if sampler is None or not self.base_batch:
            return 1.0
        # Called in the step's last pass, before on_train_batch_end counts its rows.
        step_rows = self._rows_in_step + sampler.last_global_rows
        base_step = self.base_batch * self.passes.user_passes
        return rows_worth(step_rows, base_step, sampler.num_samples, sampler.drop_last)

    def _probe_memory(self, trainer: pl.Trainer, step_loss: StepLoss) -> None:
        self.probe, self.ceiling = probe_fit_ceiling(trainer, step_loss, self.options.memory_budget)
        # The trial steps were timed: their per-row cost (a rank's rows) is the throughput model's
        # slope until real steps at sizes far enough apart replace it, so the first decision can jump.
        per_row = self.probe.seconds_per_row()
        if per_row is not None:
            self.controller.throughput.set_prior_slope(per_row / trainer.world_size)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams(self.probe.as_dict("memory_probe_"))
            trainer.logger.log_metrics(self.probe.metrics("memory_probe_"), step=trainer.global_step)

    def _limit_rows_per_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``accumulate``, a module that splits its own steps holds at most a rank's share of the
        ceiling per pass (with automatic optimization the sampler's batch is the pass: see _apply)."""
        if not self.accumulates or self.ceiling is None or not isinstance(pl_module, SplitsItsPasses):
            return
        per_rank = max(1, self.ceiling // trainer.world_size)
        current = getattr(pl_module, "max_rows_per_pass", None)
        setattr(pl_module, "max_rows_per_pass", min(current, per_rank) if current else per_rank)  # noqa: B010

    def _attach_meter(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The noise meter on the parameters the optimizers update, or one line saying why there is none."""
        several = not pl_module.automatic_optimization and len(trainer.optimizers) > 1
        if several and self._needs_noise():
            # One noise scale over several optimizers' parameters would rescale each lr from gradients
            # it does not own: refused where the decisions need it, else not measured.
            raise UnsupportedSetupError.several_optimizers(
                type(pl_module).__name__, len(trainer.optimizers), self.policy_name, self.lr_rule_name
            )
        why = (
            f"{len(trainer.optimizers)} optimizers by manual optimization, each with its own gradients"
            if several
            else self.measurement.start(trainer, pl_module, self._step_loss)
        )
        if why is not None:
            self._not_measurable(trainer, why)
            return
        if trainer.logger is not None and trainer.is_global_zero:  # which noise scale: raw or preconditioned
            trainer.logger.log_hyperparams({"gns_gradients": self.measurement.gradients})
        if self.measurement.note:
            _warn(trainer, self.measurement.note)

    def _needs_noise(self) -> bool:
        """Whether the decisions or the lr read the noise statistics (a policy of one's own may)."""
        uses_noise_policy = not isinstance(
            self.controller.policy, (FixedPolicy, MemoryPolicy, SchedulePolicy)
        )
        return uses_noise_policy or self.lr_rule_name == "adascale"

    def _not_measurable(self, trainer: pl.Trainer, why: str) -> None:
        """Nothing can be measured: said once; a policy that needs the noise scale gives way to memory's."""
        self.measurement.nothing_measurable()
        _set_run_tag(trainer, "gns_measured_fraction", "0")
        instead = ""
        if self._needs_noise() and not isinstance(self.controller.policy, MemoryPolicy):
            instead = f"; the batch follows the memory policy (the largest that fits) instead of {self.policy_name!r}"
            self.controller.policy = MemoryPolicy()
            self.policy_name = "memory"
        _warn(trainer, f"DynamicBatchSize: the gradient noise scale cannot be measured: {why}{instead}")
        _set_run_tag(trainer, "gns_not_measured", why)

    def _say_what_is_measured(self, trainer: pl.Trainer) -> None:
        """Once per fit, after the first measured step: the share measured exactly (a metric and a tag),
        and every group of parameters that is not, with its share and what is done instead."""
        unmeasurable, not_exact = self.measurement.settle()
        _set_run_tag(trainer, "gns_measured_fraction", f"{self.measurement.measured_fraction:.4f}")
        if unmeasurable is not None:
            self._not_measurable(trainer, unmeasurable)
        elif not_exact is not None:
            _warn(trainer, f"DynamicBatchSize: {not_exact}")
            _set_run_tag(trainer, "gns_not_exact", not_exact[:5000])

    # -- every step -----------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sampler is not None:
            sync_epoch_length(trainer, self._sampler)
        if self.passes.in_charge:
            self.passes.epoch_starts(trainer)
        self.clock.interrupt()  # the first step's cycle includes the epoch's set-up

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.interrupt()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.interrupt()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._sampler is not None and self._sampler.position_owner is self:
            self._sampler.batch_trained()  # in order, once per trained batch: the saved position
        if self._rows_in_step:  # a further pass of an accumulated step: measured with the step
            self.measurement.next_pass(batch)
            return
        if self.passes.in_charge and self._sampler is not None:  # an epoch's last step may be short
            self.passes.last_step_of_epoch(trainer, self._sampler.untrained_batches() + 1, batch_idx)
        self._lower_lr_for_a_short_step(trainer)
        # global_step moves on in the optimizer step: what to measure is decided here, at the start.
        measure, fallback = self.clock.begin_step(trainer.global_step)
        self.measurement.begin_step(measure, batch, fallback)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self.measurement.before_backward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.measurement.before_optimizer_step()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.measurement.after_backward(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seconds = self.clock.cycle_seconds()
        # Global rows from the sampler: identical on every rank (a rank's own share may differ by one),
        # so every rank reaches the same decision points and the broadcast in _decide cannot deadlock.
        rows = self._sampler.last_global_rows if self._sampler is not None else 0
        self._samples_seen += rows
        self.measurement.rows_since_measurement += rows
        self._rows_in_step += rows
        step_done = optimizer_step_done(trainer)
        if step_done and self._full_step_lr_scale is not None:  # the batch's lr, before any decision
            self._set_lr_scale(trainer, self._full_step_lr_scale)
            self._full_step_lr_scale = None
        if not self.clock.measuring:
            self.clock.record_step(rows, seconds)
        elif step_done:  # a measured step spans its passes: measured once, over all their rows
            started = self.clock.now()
            self.measurement.measure(trainer, pl_module.device, self._rows_in_step)
            self.clock.record_measurement(rows, seconds, self.clock.now() - started)
            if self.measurement.newly_known:
                self._say_what_is_measured(trainer)
        self.measurement.end_step()
        # A decision lands between optimizer steps only: with gradient accumulation, every micro-batch
        # of a step has one size, and the decision history one entry per optimizer step.
        if step_done:
            epoch_rows = self._sampler.num_samples if self._sampler is not None else 0
            step_rows, self._rows_in_step = self._rows_in_step, 0
            if self.cadence.step_done(step_rows, epoch_rows) or self._over_ceiling(trainer):
                self._decide(trainer)
            if trainer.global_step % self.options.log_every == 0:
                self._log(trainer, pl_module, rows, seconds)
        self.clock.next_cycle()

    # -- decide and apply -----------------------------------------------------------------------------

    def _effective_ceiling(self, trainer: pl.Trainer) -> int | None:
        """The probed ceiling, lowered by any OOM the module recovered from (rows that fit per pass)."""
        # The sampler's rows are the whole dataset (every rank walks the same permutation): global already.
        epoch_rows = self._sampler.num_samples if self._sampler is not None else None
        if self.accumulates:
            # Memory bounds the rows of a pass, not the batch: only the data (and max_batch) bound it.
            return effective_ceiling(None, None, trainer.world_size, epoch_rows)
        module = trainer.lightning_module
        # A module that splits its own steps lowers its rows per pass after an out-of-memory error.
        oom_rows = module.max_rows_per_pass if isinstance(module, SplitsItsPasses) else None
        return effective_ceiling(self.ceiling, oom_rows, trainer.world_size, epoch_rows)

    def _over_ceiling(self, trainer: pl.Trainer) -> bool:
        """The batch no longer fits (an out-of-memory error lowered the ceiling): decide now."""
        ceiling = self._effective_ceiling(trainer)
        return ceiling is not None and self.batch_size is not None and self.batch_size > ceiling

    def _context(self, trainer: pl.Trainer) -> PolicyContext:
        self.clock.feed_throughput()
        measured = self.ema.num_updates >= MIN_MEASUREMENTS
        gns, grad_sqr, trace = (
            (self.ema.gns, self.ema.grad_sqr, self.ema.grad_var) if measured else (None,) * 3
        )
        # The policy reasons in rows per optimizer step: k accumulated passes of the sampler's batch.
        k = self.passes.user_passes
        ceiling = self._effective_ceiling(trainer)  # rows of one pass
        if ceiling is not None and k > 1:
            epoch_rows = self._sampler.num_samples if self._sampler is not None else None
            ceiling = min(ceiling * k, epoch_rows) if epoch_rows else ceiling * k
        return PolicyContext(
            batch_size=(self.batch_size or 1) * self.passes_per_step,
            base_batch=(self.base_batch or 1) * k,
            noise_scale=gns if gns is not None and math.isfinite(gns) else None,
            grad_sqr=max(grad_sqr, 0.0) if grad_sqr is not None else None,
            trace_sigma=max(trace, 0.0) if trace is not None else None,
            ceiling=ceiling,
            epoch=trainer.current_epoch,
        )

    def _decide(self, trainer: pl.Trainer) -> None:
        self.cadence.reset()
        decision: Decision | None = None
        context = self._context(trainer)
        interval = self.clock.interval
        if trainer.is_global_zero:
            decision = self.controller.decide(context)
            known = self.ema.gns is not None or self.measurement.meter is None
            interval = self.clock.plan(self._pass_rows(decision.batch_size), self.ema.num_updates, known)
        # Rank 0 decides (its throughput model is the one that counts) and plans the measurements;
        # every rank applies the same.
        decision, interval = trainer.strategy.broadcast((decision, interval), src=0)
        self.clock.interval = interval
        fresh = self.kept.fresh_measurements(self.ema.num_updates)
        if decision is not None and decision.changed:
            self._apply(trainer, decision, context)
        elif decision is not None and self.batch_size is not None:
            step_rows = self.batch_size * self.passes_per_step
            measured = self._needs_noise() and self.measurement.meter is not None
            self.kept.add(
                trainer.global_step, trainer.current_epoch, step_rows, decision.reason, fresh, measured
            )

    def _apply(self, trainer: pl.Trainer, decision: Decision, context: PolicyContext) -> None:
        assert self._sampler is not None
        old = self.batch_size and self.batch_size * self.passes_per_step
        pass_rows, passes = self._split(decision.batch_size)
        self.passes.set(trainer, passes)
        self._sampler.batch_size = self.batch_size = pass_rows
        sync_epoch_length(trainer, self._sampler)
        self._set_lr_scale(trainer, decision.lr_scale)
        # What the decision (and the AdaScale lr) was taken from is rank 0's context, the same as every
        # rank's, since the EMAs move only with all-reduced estimates.
        where = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "samples_seen": self._samples_seen,
        }
        step_rows = self.batch_size * self.passes_per_step  # the record is in rows per optimizer step
        self.decisions.append({**where, **decision.record(old, step_rows, self.lr_scale, context)})
        if trainer.logger is not None:
            trainer.logger.log_metrics({"batch_size_change": float(step_rows)}, step=trainer.global_step)

    def _split(self, step_rows: int) -> tuple[int, int]:
        """``(the sampler's batch, passes)`` for an optimizer step of ``step_rows`` rows: beyond the
        ceiling, with automatic optimization, in as many more passes as memory needs."""
        beyond = self.accumulates and self.passes.in_charge
        return self.passes.split(step_rows, self.ceiling if beyond else None)

    def _pass_rows(self, step_rows: int) -> int:
        """The sampler's batch (one pass) for an optimizer step of ``step_rows`` rows."""
        return self._split(step_rows)[0]

    def _lower_lr_for_a_short_step(self, trainer: pl.Trainer) -> None:
        """At a step's first pass: an epoch's short last step trains at the lr rule's scale for its
        own rows, between 1 (lr0) and the batch's. At a batch near the epoch's size (104 of iris's
        106 rows) the 2-row rest would otherwise take the lr raised for 104 rows, and its noisy
        gradient jolt the fit every epoch."""
        if self._sampler is None or self.lr_scale <= 1.0 or not self.batch_size:
            return
        full = self.batch_size * self.passes_per_step
        rows = min(full, self._sampler.untrained_rows() + self._sampler.last_global_rows)
        if not 0 < rows < full:
            return
        context = self._context(trainer)
        scale = self.controller.lr_rule.scale(rows, context.base_batch, context.grad_sqr, context.trace_sigma)
        self._full_step_lr_scale = self.lr_scale
        self._set_lr_scale(trainer, min(max(float(scale), 1.0), self.lr_scale))

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

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rows: int, seconds: float) -> None:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else math.nan
        row = {
            "step": float(trainer.global_step),
            "samples_seen": float(self._samples_seen),
            "batch_size": float((self.batch_size or rows) * self.passes_per_step),  # rows per optimizer step
            "lr": lr,
            **self.ema.as_row(),
            "gns_measured_fraction": _nan_if_none(self.measurement.measured_fraction),
            "throughput": rows / seconds if seconds > 0 else math.nan,
            "mem_peak": float(_memory_peak(pl_module.device)),
        }
        self.history.append(row)
        if trainer.logger is None:
            return
        metrics = {k: v for k, v in row.items() if k in METRICS and math.isfinite(v)}
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_batch": self.base_batch,
            "batch_size": self.batch_size,
            "lr_scale": self.lr_scale,
            # Saved by a callback in the middle of a short step: the batch's scale to go back to.
            "full_step_lr_scale": self._full_step_lr_scale,
            "ceiling": self.ceiling,
            "probe": self.probe.state_dict() if self.probe is not None else None,
            "ema": self.ema.state_dict(),
            "controller": self.controller.state_dict(),
            "decisions": list(self.decisions),
            "kept": self.kept.state_dict(),
            "samples_seen": self._samples_seen,
            "measurement": self.clock.state_dict(),
            "rows_since_measurement": self.measurement.rows_since_measurement,
            "schedule_progress": self.schedule_progress.state_dict(),
            "passes": self.passes.state_dict(),
            # Where the next decision falls: a resumed fit decides at the same steps as an unbroken one.
            **self.cadence.state_dict(),
            # The trained position in the epoch: this callback reports trained batches, so it saves
            # them too (a user's loader has nobody else to).
            "sampler": self._sampler.state_dict() if self._sampler is not None else None,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        own = checkpoint.get("callbacks", {}).get(self.state_key, {})
        drop_saved_loader_position(checkpoint, own.get("sampler"))  # restored in _restore instead

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)  # applied in on_train_start, once the sampler exists

    def _restore(self, trainer: pl.Trainer) -> None:
        state, self._loaded_state = self._loaded_state or {}, None
        self.base_batch = state["base_batch"]
        self.batch_size = state["batch_size"]
        self.lr_scale = float(state["lr_scale"])  # the optimizer's lr was restored with it
        if state.get("full_step_lr_scale") is not None:  # saved during a short step: its lr was lowered
            self._set_lr_scale(trainer, float(state["full_step_lr_scale"]))
        self.ceiling = state["ceiling"]
        self.probe = MemoryProbeResult.from_state_dict(state["probe"]) if state["probe"] else None
        self.ema.load_state_dict(state["ema"])
        self.controller.load_state_dict(state["controller"])
        self.decisions = list(state["decisions"])
        self.kept.load_state_dict(state.get("kept", {}))  # none in checkpoints from before it existed
        self._samples_seen = int(state["samples_seen"])
        if "measurement" in state:  # checkpoints from before the measurement budget have none
            self.clock.load_state_dict(state["measurement"])
            self.measurement.rows_since_measurement = int(state["rows_since_measurement"])
        self.cadence.load_state_dict(state)
        self.schedule_progress.load_state_dict(state.get("schedule_progress", {}))
        if "passes" in state:  # checkpoints from before passes beyond the ceiling have none
            self.passes.load_state_dict(trainer, state["passes"])
        assert self._sampler is not None
        if state.get("sampler") is not None:
            self._sampler.load_state_dict(state["sampler"])
            self._restart_iterator = True
        if self.batch_size is not None:
            self._sampler.batch_size = self.batch_size
        sync_epoch_length(trainer, self._sampler)

    # -- the end --------------------------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step % self.options.log_every and self._sampler is not None:
            self._log(trainer, pl_module, self._sampler.last_global_rows, math.nan)  # the final step's row
        self.measurement.remove()
        release_step_schedulers(pl_module)
        self.passes.release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A fit that raised (a pruned trial, an interrupt, an error) must not leave hooks on the model.
        self.measurement.remove()
        release_step_schedulers(pl_module)
        self.passes.release()


def _set_run_tag(trainer: pl.Trainer, key: str, value: str) -> None:
    """A tag on the run of each logger that has tags (MLflow), else a hyperparameter."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        set_tag = getattr(logger, "set_tag", None)
        experiment: Any = getattr(logger, "experiment", None) if set_tag is None else None
        run_id = getattr(logger, "run_id", None)
        if callable(set_tag):
            set_tag(key, value)
        elif hasattr(experiment, "set_tag") and run_id:
            experiment.set_tag(run_id, key, value)
        else:
            logger.log_hyperparams({key: value})


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _warn(trainer: pl.Trainer, message: str) -> None:
    """A warning, once per fit: from rank 0 only."""
    if trainer.is_global_zero:
        log.warning(message)


def _memory_peak(device: torch.device) -> int:
    """Peak bytes: CUDA's allocator high-water mark, or the process's resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(Exception):
        return resident_bytes()
    return 0


def _signature_and_docs() -> None:
    """``DynamicBatchSize``'s signature and argument docs, generated from the option declarations:
    ``inspect.signature``, IDEs' help, ``help()`` and LightningCLI all read the one declaration."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    lines = ["", "Args:"]
    for f, info in option_fields(BatchSizeOptions):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name in ("policy", "lr_rule") else keyword
        params.append(inspect.Parameter(f.name, kind, default=default_of(f), annotation=f.type))
        lines.append(f"    {f.name}: {info.help}.")
    DynamicBatchSize.__init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    DynamicBatchSize.__doc__ = (
        (DynamicBatchSize.__doc__ or "").rstrip()
        + "\n"
        + "\n".join("    " + line if line else line for line in lines)
        + "\n"
    )


_signature_and_docs()
