"""``TaskModule``: one LightningModule for regression (MSE) and classification (cross-entropy).

It wraps any plain model from :mod:`lightning_batch.tabular.networks` (or your own ``nn.Module``), owns the
loss, the metrics and the optimizer, and keeps the learning rate in the optimizer's param groups,
where a callback such as :class:`~lightning_batch.plugin.callback.DynamicBatchSize` can change it.

A training step reads top to bottom: zero the gradients, forward, loss, backward, clip, step.
Optimization is *manual* (``automatic_optimization = False``) for two reasons: Lightning's
closure machinery costs more than a small tabular step itself, and a step that owns its
backward can later redo its samples in micro-batches after an out-of-memory error. Per-step
numbers go to the logger's buffer every ``log_every`` steps, not through ``self.log``.

Examples:
    >>> import torch, lightning.pytorch as pl
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_batch.tabular.networks import LinearRegression
    >>> module = TaskModule(LinearRegression(3), task="regression", lr=0.1)
    >>> x = torch.randn(1280, 3); y = x.sum(1, keepdim=True)
    >>> loader = DataLoader(TensorDataset(x, y), batch_size=64)
    >>> trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
    ...                      enable_model_summary=False, enable_checkpointing=False)
    >>> trainer.fit(module, loader)
    >>> module.samples_seen
    1280
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.tabular.augment import Augmenter
from lightning_batch.tabular.gradient_health import GradientRatioAlarm, LayerGradNorms

log = logging.getLogger(__name__)

#: With ``on_nan="skip"``, this many non-finite steps in a row are skipped (each halving the lr); the
#: next one in the streak fails the run. A finite step in between starts the count again.
MAX_CONSECUTIVE_NAN_SKIPS = 20
#: With ``on_nan="rollback"``, a step loss this many times the lowest logging-window mean so far (the
#: first step's loss until then) is a blow-up on its way to inf (three orders of magnitude: a noisy
#: batch is not one).
BLOWUP_FACTOR = 1000.0


def _plain_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` wrapper (or the one given)."""
    plain: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
    return plain


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator's out-of-memory error (CUDA's, a CPU ``MemoryError``, or one reported as text)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; ``step`` is the optimizer step where it was seen."""

    def __init__(
        self, step: int, value: float, *, window: int = 1, skipped: int = 0, rollback: bool = False
    ) -> None:
        where = f"at step {step}" if window == 1 else f"in the {window} steps up to step {step}"
        if rollback:
            super().__init__(
                f"training loss blew up ({value:.3g}) at step {step} after {skipped} rollbacks, the last "
                f"{MAX_CONSECUTIVE_NAN_SKIPS} in a row, each at half the lr: training diverged; lower --lr, "
                "set --grad-clip, or check the data"
            )
            self.step = step
            return
        advice = "lower --lr or set --grad-clip"
        if not skipped:
            advice += ", or pass --on-nan skip to skip such steps and halve the lr"
        extra = (
            f" after {skipped} skipped steps, the last {MAX_CONSECUTIVE_NAN_SKIPS} in a row (the most "
            "--on-nan skip allows)"
            if skipped
            else ""
        )
        super().__init__(f"training loss is not finite ({value}) {where}{extra}: training diverged; {advice}")
        self.step = step


class TaskModule(pl.LightningModule):
    """Train ``model`` for ``task`` with SGD/Adam/AdamW and an optional per-epoch lr schedule.

    Args:
        model: any ``nn.Module`` mapping a feature batch to predictions (1 column per target) or logits.
        task: ``regression`` (MSE loss; RMSE and R² metrics) or ``classification`` (cross-entropy;
            accuracy and macro F1).
        n_classes: classes, required for classification metrics (default: the model's output width
            is not known in general, so pass it).
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw``.
        lr: the learning rate the run starts with.
        weight_decay: L2 penalty (decoupled for AdamW).
        lr_schedule: ``none``, ``cosine`` (to 0 over ``max_epochs``), ``step`` (×0.1 at 1/2 and 3/4 of
            ``max_epochs``) or ``plateau`` (×0.5 when val_loss stalls); stepped once per epoch.
        grad_clip: clip the global gradient norm to this value (``Trainer(gradient_clip_val=...)``
            is for automatic optimization only).
        grad_ratio_limit: warn (once, in the terminal and as the run's ``gradient_warning`` tag)
            when the first/last layer gradient-norm ratio stays outside ``[1/limit, limit]`` for 3
            log intervals: vanishing or exploding gradients (see :mod:`lightning_batch.tabular.gradient_health`).
        on_nan: a non-finite training loss ``fail``s the run (:class:`NonFiniteLossError`, with the
            step), or ``skip``s the step and halves the lr (counted in ``nan_skips``; at most
            :data:`MAX_CONSECUTIVE_NAN_SKIPS` in a row are skipped, the next one fails the run), or
            (``rollback``) a loss that is not finite or has grown :data:`BLOWUP_FACTOR` times past
            the lowest logging-window mean rolls the network and the optimizer back to the last good
            window, halves the lr and goes on (counted in ``rollbacks``, each one a warning and the
            run's ``rollback`` tag; :data:`MAX_CONSECUTIVE_NAN_SKIPS` in a row fail the run).
            On CPU the check is every step; on an accelerator, ``fail`` checks when a logging window
            closes (a per-step check would be a device sync per step), ``skip`` and ``rollback``
            every step (under DDP with one all-reduce, so every rank rolls back together).
        log_every: log per-step metrics every N optimizer steps (train_loss as the window's mean);
            MLflow's SQL store spends Python time on every value, so 1 (every step) is for short runs.

    Gradient health, logged every ``log_every`` steps: ``grad_norm`` (the global norm before
    clipping), ``grad_norm_first_layer``, ``grad_norm_last_layer`` and ``grad_norm_ratio`` (first /
    last), all of the window's last step; with ``grad_clip`` also ``grad_norm_mean`` and
    ``grad_norm_clipped_mean`` (the window's mean norm before and after clipping) and
    ``clipped_fraction``. Without clipping the norms are taken on log steps only: one fused norm
    every ``log_every`` steps, nothing on the others.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str = "regression",
        *,
        n_classes: int | None = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        lr_schedule: str = "none",
        max_epochs: int = 10,
        grad_clip: float | None = None,
        log_every: int = 10,
        on_nan: str = "fail",
        augment: Sequence[str] = (),
        grad_ratio_limit: float = 20.0,
        target_scaling: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if task not in ("regression", "classification"):
            raise ValueError(f"task must be 'regression' or 'classification', got {task!r}")
        if task == "classification" and (n_classes is None or n_classes < 2):
            raise ValueError("classification needs n_classes >= 2 (the number of model outputs)")
        if on_nan not in ("fail", "skip", "rollback"):
            raise ValueError(f"on_nan must be 'fail', 'skip' or 'rollback', got {on_nan!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.task = task
        # A standardised regression target: (mean, scale) on train; the network predicts in those units.
        self._target_mean, self._target_scale = target_scaling if target_scaling else (0.0, 1.0)
        self._scales_target = task == "regression" and target_scaling is not None
        self.automatic_optimization = False
        self.samples_seen = 0
        self._world_size = 1
        self._global_rows: Any = None  # a sampler with last_global_rows (see on_train_start)
        # Per-step scratch values in a plain dict: attribute writes on an nn.Module are slow.
        self._step: dict[str, Any] = {}
        self._val_loss_fresh = False
        #: Rows one forward/backward pass may hold (None: no limit): set by DynamicBatchSize from the
        #: memory ceiling (a larger batch runs as accumulated passes), lowered by out-of-memory errors.
        self.max_rows_per_pass: int | None = None
        #: Out-of-memory errors recovered from by redoing the step's rows in smaller passes.
        self.oom_recoveries = 0
        #: Blow-ups rolled back to the last good window (``on_nan="rollback"``), each halving the lr.
        self.rollbacks = 0
        self._good_state: tuple[dict[str, Any], dict[str, Any], int] | None = None
        self._start_state: tuple[dict[str, Any], dict[str, Any], int] | None = None
        #: Steps skipped because their loss was NaN/inf (``on_nan="skip"``), each halving the lr.
        self.nan_skips = 0
        #: Training-batch augmentations (never applied to validation or test batches).
        self.augmenter = Augmenter.parse(list(augment))
        self.layer_grad_norms = LayerGradNorms(model)
        self.gradient_alarm = GradientRatioAlarm(grad_ratio_limit)
        self._nan_streak = 0
        # Set again in on_fit_start for the device; here too, because Lightning's BatchSizeFinder
        # and LearningRateFinder run training steps before the module's on_fit_start.
        self._check_every_step = True
        self._max_eval_rows: int | None = None
        metrics: dict[str, torchmetrics.Metric | torchmetrics.MetricCollection]
        if task == "regression":
            metrics = {
                "rmse": torchmetrics.MeanSquaredError(squared=False),
                "r2": torchmetrics.R2Score(),
            }
        else:
            metrics = {
                "acc": torchmetrics.Accuracy(task="multiclass", num_classes=n_classes),
                "f1": torchmetrics.F1Score(task="multiclass", num_classes=n_classes, average="macro"),
            }
        self.val_metrics = torchmetrics.MetricCollection(metrics, prefix="val_")
        self.test_metrics = self.val_metrics.clone(prefix="test_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of the network's output against the target as the data holds it (a
        standardised target is standardised here: the loss is in standard units)."""
        if self.task == "regression":
            if self._scales_target:
                target = (target - self._target_mean) / self._target_scale
            return F.mse_loss(prediction, target)
        return F.cross_entropy(prediction, target)

    def in_target_units(self, prediction: torch.Tensor) -> torch.Tensor:
        """A regression output in the target's own units (unchanged without target scaling)."""
        if not self._scales_target:
            return prediction
        return prediction * self._target_scale + self._target_mean

    # -- training --------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._world_size = self.trainer.world_size
        self._check_every_step = self.hparams["on_nan"] != "fail" or self.device.type == "cpu"

    def on_train_start(self) -> None:
        # Under DDP a rank's share of an odd global batch differs by one row from another's, so
        # rows × ranks would miscount; a ResizableBatchSampler knows the step's global rows (the
        # same on every rank, set before the step). Other loaders shard evenly (DistributedSampler).
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        self._global_rows = sampler if hasattr(sampler, "last_global_rows") else None
        # A DynamicBatchSize logs batch_size (the rows of the step its policy chose) and lr itself.
        callbacks = getattr(self.trainer, "callbacks", ())  # set by Lightning's connector, undeclared
        self._step["batch_logged"] = any(isinstance(c, DynamicBatchSize) for c in callbacks)
        if self.hparams["on_nan"] == "rollback" and self._start_state is None:
            self._start_state = self._snapshot()  # where repeated blow-ups roll back to

    def _finite_or_skip(self, loss: torch.Tensor, optimizer: Any) -> bool:
        """True when the step's loss is finite (and, rolling back, not blown up); else fail the run,
        skip the step (halving the lr), or roll back to the last good window (halving the lr)."""
        mode = self.hparams["on_nan"]
        if mode == "rollback":
            return not self._blown_up(loss) or self._roll_back(float(loss), optimizer)
        if bool(torch.isfinite(loss)):
            if self._nan_streak:  # nn.Module.__setattr__ costs microseconds a step: write only a change
                self._nan_streak = 0
            return True
        step = self.trainer.global_step
        if mode == "fail" or self._nan_streak >= MAX_CONSECUTIVE_NAN_SKIPS:
            raise NonFiniteLossError(step, float(loss), skipped=self.nan_skips)
        optimizer.zero_grad()
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        self.nan_skips += 1
        self._nan_streak += 1
        # The sampler moved on; the optimizer did not step, so Lightning's global_step does not either.
        self._step["rows"] = 0
        return False

    def _blown_up(self, loss: torch.Tensor) -> bool:
        """The step's loss is not finite or three orders of magnitude past the lowest window mean (on
        every rank's word under DDP: one rank's blow-up rolls every rank back)."""
        value = float(loss)
        # Against window means only: one row's loss (B=1) is far too noisy to be a reference.
        floor = self._step.get("floor")
        blown = not math.isfinite(value) or (floor is not None and value > BLOWUP_FACTOR * floor)
        if self._world_size > 1:
            blown = bool(self.trainer.strategy.reduce_boolean_decision(blown, all=False))
        if not blown and self._nan_streak:
            self._nan_streak = 0
        return blown

    def _roll_back(self, value: float, optimizer: Any) -> bool:
        """Back to the last good window's network and optimizer state, at half the lr; False (the step
        is not taken). A second blow-up in a row goes back to the start of the fit instead (the last
        window may have been on its way up already). The run fails after
        :data:`MAX_CONSECUTIVE_NAN_SKIPS` in a row."""
        step = self.trainer.global_step
        if self._start_state is None or self._nan_streak >= MAX_CONSECUTIVE_NAN_SKIPS:
            raise NonFiniteLossError(step, value, skipped=self.rollbacks, rollback=True)
        good = (
            self._good_state if self._nan_streak == 0 and self._good_state is not None else self._start_state
        )
        if good is self._start_state:  # back to the start: its loss is the reference again
            self._step.pop("floor", None)
            self._good_state = None
        weights, optimizer_state, good_step = good
        lrs = [group["lr"] * 0.5 for group in optimizer.param_groups]
        self.model.load_state_dict(weights)
        _plain_optimizer(optimizer).load_state_dict(copy.deepcopy(optimizer_state))
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        optimizer.zero_grad()
        self.rollbacks += 1
        self._nan_streak += 1
        self._step["rows"] = 0  # no optimizer step: Lightning's global_step does not move either
        event = (
            f"step {step}: the training loss reached {value:.3g} (lowest window mean "
            f"{self._step.get('floor', math.nan):.3g}); rolled back to step {good_step} and halved the lr to {lrs[0]:.3g}"
        )
        log.warning("warning: %s", event)
        set_tag = getattr(self.logger, "set_tag", None)
        if callable(set_tag):
            set_tag("rollback", event)
        return False

    def _keep_good_state(self, loss_mean: float) -> None:
        """A window whose mean loss is finite and no blow-up: the state a rollback returns to."""
        floor = self._step.get("floor")
        if not math.isfinite(loss_mean) or (floor is not None and loss_mean > BLOWUP_FACTOR * floor):
            return
        self._step["floor"] = loss_mean if floor is None else min(floor, loss_mean)
        self._good_state = self._snapshot()

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, Any], int]:
        """Copies of the network's and the optimizer's state, and the step they are at."""
        optimizer = _plain_optimizer(self.optimizers())
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return weights, copy.deepcopy(optimizer.state_dict()), self.trainer.global_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.augmenter:
            x, y = self.augmenter(x, y, self.hparams["n_classes"] if self.task == "classification" else None)
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list)  # configure_optimizers returns one
        optimizer.zero_grad()
        loss = self._forward_backward(x, y, optimizer).detach()
        if self._check_every_step and not self._finite_or_skip(loss, optimizer):
            return loss  # skipped: no update, lr halved
        # Norms and clipping run in on_before_optimizer_step, where float16 gradients are unscaled.
        optimizer.step()
        source = self._global_rows
        rows = source.last_global_rows if source is not None else x.shape[0] * self._world_size
        self._step["rows"] = rows
        # The batch size logged without a DynamicBatchSize: the largest step so far, never the
        # epoch's short last one (what remains of the data, not a size anyone chose).
        self._step["full_rows"] = max(self._step.get("full_rows", 0), rows)
        # Counted here, not in on_train_batch_end: callbacks (a mid-epoch checkpoint) run before
        # the module's own batch-end hook and must see this step as done. A plain int attribute:
        # object.__setattr__ skips nn.Module's parameter/buffer/module checks (microseconds a step).
        object.__setattr__(self, "samples_seen", self.samples_seen + self._step["rows"])
        # Summed as a tensor over the logging window: no host sync until the window closes.
        self._step["loss_sum"] = self._step.get("loss_sum", 0.0) + loss
        self._step["window"] = self._step.get("window", 0) + 1
        return loss

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, optimizer: Any) -> torch.Tensor:
        """Gradients of the batch's mean loss; on out-of-memory, redo the same rows in halves.

        Composer-style recovery: the step's rows are split into passes of at most
        ``max_rows_per_pass`` rows whose gradients accumulate (each pass's loss weighted by its
        share of rows), so the step's gradient is the full batch's. Under DDP every rank learns
        whether any rank ran out of memory (one all-reduce), so all redo the step together, and
        only the last pass synchronises gradients.
        """
        rows = len(x)
        if self._world_size == 1 and (self.max_rows_per_pass is None or rows <= self.max_rows_per_pass):
            # One pass on one process: the common case, without the slicing and weighting below
            # (their few tensor ops are a measurable share of a small tabular step). An
            # out-of-memory error falls through to the loop, which halves the pass.
            try:
                loss = self.loss(self.model(x), y)
                self.manual_backward(loss)
                self._step["passes"] = 1
                return loss.detach()
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                self._halve_after_oom(optimizer, rows)
        strategy = self.trainer.strategy
        distributed = self._world_size > 1
        while True:
            per_pass = min(rows, self.max_rows_per_pass or rows)
            starts = range(0, rows, per_pass)
            total: torch.Tensor | None = None  # the batch loss, summed over passes
            failed = False
            try:
                for i, start in enumerate(starts):
                    xs, ys = x[start : start + per_pass], y[start : start + per_pass]
                    last = i == len(starts) - 1
                    no_sync = (
                        strategy.block_backward_sync()  # type: ignore[attr-defined]  # distributed: a DDPStrategy
                        if distributed and not last
                        else contextlib.nullcontext()
                    )
                    with no_sync:
                        loss = self.loss(self.model(xs), ys) * (len(xs) / rows)
                        self.manual_backward(loss)
                    total = loss.detach() if total is None else total + loss.detach()
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(exc):
                    raise
                failed = True
            if distributed:
                failed = strategy.reduce_boolean_decision(failed, all=False)
            if not failed:
                assert total is not None
                self._step["passes"] = len(starts)
                return total
            self._halve_after_oom(optimizer, per_pass)

    def _halve_after_oom(self, optimizer: Any, per_pass: int) -> None:
        """A pass of ``per_pass`` rows ran out of memory: drop its gradients, halve the pass."""
        optimizer.zero_grad()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if per_pass <= 1:
            raise MemoryError(
                "out of memory even with 1 row per pass; free memory, use a smaller model, or lower "
                "--memory-budget so the batch-size probe plans for less"
            )
        self.max_rows_per_pass = per_pass // 2
        self.oom_recoveries += 1

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        # Lightning calls this inside optimizer.step(), after a float16 GradScaler unscaled the
        # gradients and before the update: norms and clipping see true gradients in any precision.
        self._measure_and_clip_gradients()

    def _measure_and_clip_gradients(self) -> None:
        """Gradient norms for the log (layer norms on log steps only), then clipping if asked.

        Everything stays a device tensor, summed over the window: no host sync until it closes.
        """
        clip = self.hparams["grad_clip"]
        # global_step moves in optimizer.step(); the window closes when it reaches a multiple of log_every.
        log_step = (self.trainer.global_step + 1) % self.hparams["log_every"] == 0
        total: torch.Tensor | None = None
        if log_step and self.layer_grad_norms:
            self._step["layer_norms"], total = self.layer_grad_norms.compute()
            self._step["grad_norm"] = total
        if not clip:
            return
        params = self.layer_grad_norms.params
        if total is None:
            total = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None], foreach=True
            )
        # The same coefficient clip_grad_norm_ uses: scale by clip/(norm+1e-6) when that is below 1.
        torch.nn.utils.clip_grads_with_norm_(params, clip, total, foreach=True)
        after = total * torch.clamp(clip / (total + 1e-6), max=1.0)
        step = self._step
        step["norm_sum"] = step.get("norm_sum", 0.0) + total
        step["clipped_norm_sum"] = step.get("clipped_norm_sum", 0.0) + after
        step["clipped"] = step.get("clipped", 0.0) + (total > clip).float()
        step["norm_steps"] = step.get("norm_steps", 0) + 1

    def _gradient_health_metrics(self, step: int) -> dict[str, float]:
        """The window's gradient metrics (see the class docstring), and the vanishing/exploding alarm."""
        metrics: dict[str, float] = {}
        if "norm_steps" in self._step:
            steps = max(self._step.pop("norm_steps"), 1)
            metrics["grad_norm_mean"] = float(self._step.pop("norm_sum")) / steps
            metrics["grad_norm_clipped_mean"] = float(self._step.pop("clipped_norm_sum")) / steps
            metrics["clipped_fraction"] = float(self._step.pop("clipped")) / steps
        if "layer_norms" not in self._step:
            return metrics
        layer_norms = self._step.pop("layer_norms").tolist()
        metrics["grad_norm"] = float(self._step.pop("grad_norm"))
        first, last = layer_norms[0], layer_norms[-1]
        metrics["grad_norm_first_layer"], metrics["grad_norm_last_layer"] = first, last
        if last > 0 and math.isfinite(first / last) and len(layer_norms) > 1:
            ratio = first / last
            metrics["grad_norm_ratio"] = ratio
            warning = self.gradient_alarm.update(ratio, step)
            if warning is not None and self.trainer.is_global_zero:
                log.warning("warning: %s", warning)
                # A logger with run tags (tracking.BufferedMLFlowLogger); duck-typed so this module
                # imports without MLflow (a GPU box may have Lightning and torch only).
                set_tag = getattr(self.logger, "set_tag", None)
                if callable(set_tag):
                    set_tag("gradient_warning", warning)
        return metrics

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A skipped or rolled-back step leaves global_step where it was: its window closed already.
        if self.trainer.global_step % self.hparams["log_every"] == 0 and self._step.get("window"):
            self._log_step_window()

    def on_train_end(self) -> None:
        if self._step.get("window"):
            self._log_step_window()  # the last, partial window: the final step is always recorded

    def _log_step_window(self) -> None:
        step = self.trainer.global_step
        window = max(self._step.get("window", 0), 1)
        loss_sum = self._step.get("loss_sum", 0.0)
        if self._world_size > 1:
            # Every rank closes its windows at the same steps: the loss is all ranks' mean, one
            # all-reduce a window (not a step).
            loss_sum = self.trainer.strategy.reduce(
                torch.as_tensor(loss_sum, device=self.device), reduce_op="mean"
            )
        loss_mean = float(loss_sum) / window
        if not self._check_every_step and not math.isfinite(loss_mean):
            raise NonFiniteLossError(step, loss_mean, window=window)
        if self.hparams["on_nan"] == "rollback":
            self._keep_good_state(loss_mean)
        extra = self._gradient_health_metrics(step)
        if self.nan_skips:
            extra["nan_skips"] = float(self.nan_skips)
        if self.rollbacks:
            extra["rollbacks"] = float(self.rollbacks)
        if self.oom_recoveries:
            extra["oom_recoveries"] = float(self.oom_recoveries)
        if self.max_rows_per_pass is not None:
            # Passes of the window's last step: >1 when the batch is beyond what fits in one pass.
            extra["micro_batches"] = float(self._step.get("passes", 1))
        if self.logger is not None:
            # Straight into the logger's buffer (see tracking.BufferedMLFlowLogger): one dict a window.
            # train_loss is the mean over the window's steps, so no step's loss goes unrecorded.
            if not self._step.get("batch_logged"):
                extra.update(batch_size=float(self._step["full_rows"]), lr=self.current_lr)
            self.logger.log_metrics(
                {"train_loss": loss_mean, "samples_seen": float(self.samples_seen), **extra}, step=step
            )
        self._step["loss_sum"], self._step["window"] = 0.0, 0

    def on_validation_epoch_end(self) -> None:
        self._val_loss_fresh = True

    def on_train_epoch_end(self) -> None:
        # Manual optimization steps the schedulers itself: once per epoch, plateau on a fresh val_loss.
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                val_loss = self.trainer.callback_metrics.get("val_loss")
                if self._val_loss_fresh and val_loss is not None:
                    scheduler.step(float(val_loss))
            else:
                scheduler.step()
        self._val_loss_fresh = False

    @property
    def current_lr(self) -> float:
        """The first param group's learning rate, as the optimizer will use it next step."""
        if self._trainer is None or not self.trainer.optimizers:
            return float(self.hparams["lr"])
        return float(self.trainer.optimizers[0].param_groups[0]["lr"])

    # -- evaluation --------------------------------------------------------------------------------
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predictions for a whole evaluation batch, in smaller passes after an out-of-memory error."""
        while True:
            per_pass = min(len(x), self._max_eval_rows or len(x))
            try:
                return torch.cat([self.model(x[i : i + per_pass]) for i in range(0, len(x), per_pass)])
            except Exception as exc:  # noqa: BLE001 -- only out-of-memory is handled, the rest re-raised
                if not is_out_of_memory(exc) or per_pass <= 1:
                    raise
                self._max_eval_rows = per_pass // 2

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        prediction = self._predict(x)
        loss = self.loss(prediction, y)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if self.task == "regression":
            metrics.update(self.in_target_units(prediction), y)  # RMSE and r² in the target's units
        else:
            metrics.update(prediction.argmax(dim=1), y)
        # Weighted by rows so a short last batch counts for what it holds.
        self.log(f"{stage}_loss", loss, batch_size=x.shape[0], prog_bar=True, sync_dist=True)
        self.log_dict(metrics, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.model.parameters()
        if hp["optimizer"] == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
            )
        elif hp["optimizer"] == "adam":
            optimizer = torch.optim.Adam(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        elif hp["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])
        else:
            raise ValueError(f"unknown optimizer {hp['optimizer']!r}; use sgd, adam or adamw")
        # Schedules step per epoch: an epoch is one pass whatever the batch size did inside it.
        if hp["lr_schedule"] == "none":
            return optimizer
        # (Manual optimization: the interval/monitor entries document intent; on_train_epoch_end steps them.)
        if hp["lr_schedule"] == "cosine":
            scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, hp["max_epochs"])
            )
        elif hp["lr_schedule"] == "step":
            milestones = sorted({max(1, hp["max_epochs"] // 2), max(1, (3 * hp["max_epochs"]) // 4)})
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        elif hp["lr_schedule"] == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {
                    "scheduler": scheduler,
                    "monitor": "val_loss",
                    "interval": "epoch",
                    "strict": False,
                },
            }
        else:
            raise ValueError(f"unknown lr_schedule {hp['lr_schedule']!r}; use none, cosine, step or plateau")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["samples_seen"] = self.samples_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("samples_seen", 0))
