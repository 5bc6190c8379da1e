"""One fit's measurement of the gradient noise, for :class:`~lightning_batch.plugin.callback.DynamicBatchSize`.

The callback decides and applies; :class:`FitNoiseMeasurement` measures. It puts a
:class:`~lightning_batch.plugin.noise.NoiseMeter` on the parameters the optimizers update (whatever
the module calls them), follows each step's backward through the Lightning hooks the callback
forwards to it, undoes float16 loss scaling, averages a measured step's |G|² and tr(Σ) over the ranks
into the noise-scale EMA, and, after the first measured step, tells which share of the parameters is
measured exactly and what is done about the rest.

Examples:
    Outside a fit nothing is attached, and nothing has been measured:

    >>> from lightning_batch.plugin.noise import NoiseScaleEMA
    >>> measurement = FitNoiseMeasurement(NoiseScaleEMA(0.95), fallback_microbatches=4)
    >>> measurement.meter is None, measurement.last, measurement.measured_fraction
    (True, None, None)
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_batch.plugin.measured import not_exact_summary, optimized_parameters
from lightning_batch.plugin.noise import NoiseMeter, NoiseScaleEMA
from lightning_batch.plugin.preconditioner import Preconditioner, resolve_noise_gradients
from lightning_batch.plugin.step_loss import StepLoss

__all__ = ["FitNoiseMeasurement"]


class FitNoiseMeasurement:
    """The noise meter of one fit, the loss scale it must undo, and what it fed the EMA last."""

    def __init__(self, ema: NoiseScaleEMA, fallback_microbatches: int, gradients: str = "auto") -> None:
        self.ema = ema
        self.fallback_microbatches = fallback_microbatches
        self._gradients_option = gradients  # the ``noise_gradients`` option, resolved at each fit's start
        #: What the fit measures the noise of: ``raw`` or ``preconditioned`` gradients (once a fit starts).
        self.gradients = gradients
        #: One line naming optimizers whose preconditioner is unknown (their parameters measured raw).
        self.note: str | None = None
        #: Measures each step's noise statistics (None outside a fit, or when nothing can be measured).
        self.meter: NoiseMeter | None = None
        #: The last all-ranks mean ``(|G|², tr(Σ))`` fed to the EMA (None: that step was not measured).
        self.last: tuple[float, float] | None = None
        #: The share of the measured parameters' elements measured exactly (None until known).
        self.measured_fraction: float | None = None
        #: Rows trained since the EMA last took a measurement: that measurement's weight (checkpointed).
        self.rows_since_measurement = 0
        self._loss_scale = 1.0  # a float16 GradScaler's scale at the measured step's backward

    def start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step_loss: StepLoss | None
    ) -> str | None:
        """Attach the meter for this fit; return why nothing can be measured (None: something can)."""
        params = optimized_parameters(trainer.optimizers, pl_module)
        if not params:
            return "no parameter of the optimizers requires gradients"
        self.gradients, unknown = resolve_noise_gradients(self._gradients_option, trainer.optimizers)
        preconditioner = (
            Preconditioner(params, trainer.optimizers) if self.gradients == "preconditioned" else None
        )
        if unknown:
            self.note = (
                f"DynamicBatchSize: no preconditioner is known for {', '.join(unknown)}: its parameters' "
                "noise is measured on raw gradients"
            )
        # A measured step spans its accumulated passes (see next_pass): T, the squared norm of the step's
        # mean gradient, is .grad after its last backward.
        self.meter = NoiseMeter(
            params,
            module=pl_module,
            batch_loss=step_loss,
            fallback_microbatches=self.fallback_microbatches,
            preconditioner=preconditioner.weights if preconditioner is not None else None,
        )
        return None

    # -- the hooks of a step, in order ----------------------------------------------------------------

    def begin_step(self, measure: bool, batch: Any, fallback: bool) -> None:
        if self.meter is not None:
            self.meter.begin_step(measure, batch, fallback=fallback)

    def next_pass(self, batch: Any) -> None:
        if self.meter is not None:
            self.meter.next_pass(batch)

    def before_backward(self) -> None:
        if self.meter is not None:
            self.meter.before_backward()

    def after_backward(self, trainer: pl.Trainer) -> None:
        # Before clipping and the optimizer step: the gradients of the weights the hooks saw.
        if self.meter is not None:
            self.meter.after_backward()
            if self.meter.measuring:
                # float16 mixed precision scales the loss, so the hooks and .grad see gradients x S:
                # remember S now (the scaler may change it in the optimizer step) to divide by S².
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                self._loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0

    def before_optimizer_step(self) -> None:
        # After the backward, before the weights move: the per-example norms and the micro-batches.
        if self.meter is not None:
            self.meter.before_optimizer_step()

    def measure(self, trainer: pl.Trainer, device: torch.device, global_rows: int) -> None:
        """A measured step's unbiased |G|² and tr(Σ) into the EMA (averaged over ranks first).

        Every rank takes part in the all-reduce whatever happened locally (a rank that could not
        measure sends NaN), so a rank-local problem cannot deadlock the others; the EMA moves only
        when every rank measured.
        """
        meter = self.meter
        estimate = meter.estimate(global_rows=global_rows) if meter is not None else None
        values = torch.tensor(estimate if estimate is not None else (math.nan, math.nan), dtype=torch.float64)
        if self._loss_scale != 1.0:
            values /= self._loss_scale**2
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values.to(device), reduce_op="mean").cpu()
        grad_sqr, trace = float(values[0]), float(values[1])
        self.last = None
        if math.isfinite(grad_sqr) and math.isfinite(trace):
            self.last = (grad_sqr, trace)
            self.ema.update(grad_sqr, trace, samples=self.rows_since_measurement)
            self.rows_since_measurement = 0

    def end_step(self) -> None:
        if self.meter is not None:
            self.meter.end_step()

    # -- what is measured -----------------------------------------------------------------------------

    @property
    def newly_known(self) -> bool:
        """The first measured step has just shown which parameters are measured exactly."""
        return self.measured_fraction is None and self.meter is not None and self.meter.exact is not None

    def settle(self) -> tuple[str | None, str | None]:
        """Once :attr:`newly_known`: ``(why nothing can be measured, what is not measured exactly)``.

        The first is set (and the meter removed) when some parameters are not exact and no loss can
        run the micro-batches they would need; the second names every inexact group with its share.
        """
        meter = self.meter
        assert meter is not None and meter.exact is not None
        self.measured_fraction = meter.measured_fraction
        if not meter.exact and not meter.can_fall_back:
            self.remove()
            return f"{not_exact_summary(meter)} and no loss to run micro-batches", None
        if meter.inexact:
            return None, not_exact_summary(meter, self.fallback_microbatches)
        return None, None

    def nothing_measurable(self) -> None:
        self.measured_fraction = 0.0

    def remove(self) -> None:
        """Take the meter's hooks off the model (the end of a fit, or an exception in it)."""
        if self.meter is not None:
            self.meter.remove()
            self.meter = None
