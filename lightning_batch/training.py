"""One run, end to end: prepare, open the run record, build the trainer, fit, evaluate, report.

The order matters for bad input: the config is validated and the data read, cleaned and split
*before* an MLflow run exists, so a bad file costs nothing but its error line. Once the run
exists, any exception ends it FAILED with the error in a tag, never left RUNNING
(:class:`~lightning_batch.tracking.run_record.RunRecord`).

Examples:
    >>> import tempfile
    >>> from lightning_batch.config import RunConfig
    >>> store = tempfile.mkdtemp()
    >>> cfg = RunConfig(data="iris", epochs=2, batch_size=16, lr=0.1, tracking_uri=f"sqlite:///{store}/m.db")
    >>> result = train(cfg)
    >>> result.status, result.metrics["test_acc"] > 0.5
    ('FINISHED', True)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, Timer

from lightning_batch._extras import check
from lightning_batch.config import DEFAULT_LR, RunConfig, check_model_for_task
from lightning_batch.errors import UserError
from lightning_batch.placement import Placement, resolve_placement
from lightning_batch.plugin._lightning_compat import destroy_process_group_at_exit
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.plugin.checkpoint_io import AtomicCheckpointIO
from lightning_batch.plugin.progress import BatchProgressBar
from lightning_batch.store_uri import resolve_tracking_uri, warn_if_password
from lightning_batch.tabular.augment import Augmenter
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.lr_search import LrSearch, optimizer_factory, range_test
from lightning_batch.tabular.networks import build_model, check_model_for_data
from lightning_batch.tabular.task_module import TaskModule
from lightning_batch.tracking.datasets import dataset_input_fields
from lightning_batch.tracking.run_record import RunRecord, checkpoint_dir, load_resumable_config
from lightning_batch.tracking.store import check_store_access

# Every run is recorded in MLflow and ends with plots: say so now, not after the fit (no import cost).
check(("mlflow", "matplotlib"), "tracking", "the tabular training path (it records runs in MLflow)")


log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports back to the CLI, the tuner and tests."""

    run_id: str
    experiment_id: str
    status: str
    dataset: str
    task: str
    model: str
    batch_size_start: int
    batch_size_end: int
    batch_size_max: int
    epochs: int
    seconds: float
    samples_seen: int
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str = ""
    #: The global DDP rank that returned this (0 in a single-process run). Only rank 0 wrote the run;
    #: another rank's result names the same run, with its own counters.
    rank: int = 0
    #: The run's MLflow Model (``models:/<model id>``; ``mlflow.pyfunc.load_model`` reads it), or "" when
    #: none was logged (``log_model=False``, or another DDP rank).
    model_uri: str = ""
    #: A regression trained on its standardised target (``scale_target``): its losses are in standard units.
    target_scaled: bool = False
    #: A regression whose test r² is below 0, worse than predicting the training mean: why, else "".
    poor_fit: str = ""


def early_stop_note(trainer: pl.Trainer) -> str:
    """Why the fit ended before its last epoch (its EarlyStopping stopped it), else ""."""
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's connector
        if isinstance(callback, EarlyStopping) and callback.stopped_epoch > 0:
            return (
                f"after epoch {callback.stopped_epoch}: val_loss had not improved for {callback.patience} "
                f"validations (best {float(callback.best_score):.4g})"
            )
        remaining = callback.time_remaining() if isinstance(callback, Timer) else None
        if isinstance(callback, Timer) and remaining is not None and remaining <= 0.0:
            minutes = (callback.time_elapsed() + remaining) / 60  # the cap it was given
            return (
                f"in epoch {trainer.current_epoch}, step {trainer.global_step}: the time cap of {minutes:g} "
                "minutes (--max-minutes)"
            )
    return ""


def worse_than_the_mean(metrics: Mapping[str, float]) -> str:
    """Why a regression's test result is not a result (its r² below 0: worse than predicting the
    training mean), else "".

    >>> worse_than_the_mean({"test_r2": -2.0e8}), worse_than_the_mean({"test_r2": 0.4})
    ('test r² is -2e+08, worse than predicting the training mean: the fit failed (check the lr and the data)', '')
    """
    r2 = metrics.get("test_r2")
    if r2 is None or not r2 < 0.0:
        return ""
    return f"test r² is {r2:.3g}, worse than predicting the training mean: the fit failed (check the lr and the data)"


def train(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Callback] = (),
    trainer_options: dict[str, Any] | None = None,
    progress_bar: bool | None = None,
    verbose: bool = False,
    extra_tags: dict[str, str] | None = None,
    resume_run_id: str | None = None,
    evaluate_test: bool = True,
    clean_stops: tuple[type[BaseException], ...] = (),
    on_run_created: Callable[[str], None] | None = None,
    log_model: bool = True,
) -> RunResult:
    """Train, validate and test one configuration, recorded as one MLflow run.

    ``resume_run_id`` continues a run that stopped (crashed, killed, interrupted) from its last
    checkpoint, on the same MLflow run: model, optimizer, sampler position and the batch-size
    controller's state come back from the checkpoint, the config from the run's store folder.
    ``evaluate_test=False`` skips the test split (a tuning trial must not look at it).
    ``clean_stops`` are exceptions that stop a run on purpose (Optuna's ``TrialPruned``): the run
    ends FINISHED with a ``stopped`` tag instead of FAILED, and the exception propagates.
    ``on_run_created`` is told the MLflow run id as soon as the run exists (a tuner records it).
    ``log_model`` logs the best checkpoint with its preprocessing as the run's MLflow Model.

    Under DDP every rank calls this (Lightning's launcher re-runs the command once per device):
    only global rank 0 creates, writes and ends the MLflow run; the other ranks train without
    opening the tracking store and return a :class:`RunResult` with their ``rank``.
    """
    quiet_lightning(verbose)
    run = prepare_run(cfg, resume_run_id)
    record = None
    if run.rank == 0:
        tags = {
            "task": run.dm.task,
            "dataset": run.cfg.data,
            "model": str(run.cfg.model),
            **run.placement.tags(),
            **({"lr_search": run.lr_search.method} if run.lr_search is not None else {}),
        }
        record = RunRecord.for_fit(run.uri, run.cfg, {**tags, **(extra_tags or {})}, resume_run_id)
    started = time.perf_counter()
    try:
        if record is not None:
            if on_run_created is not None:
                on_run_created(record.run_id)
            record.begin(run.cfg, run_params(run), run.dm.prepared)
        fit = build_trainer(run, record, resume_run_id, callbacks, trainer_options, progress_bar, verbose)
        # weights_only: a checkpoint holds tensors and plain containers, loaded without unpickling objects.
        fit.trainer.fit(run.module, datamodule=run.dm, ckpt_path=fit.resume_from, weights_only=True)
        samples_seen = run.module.samples_seen  # before test() loads the best checkpoint's counters
        final_weights = {k: v.detach().cpu().clone() for k, v in run.module.state_dict().items()}
        stopped = early_stop_note(fit.trainer)  # before the test loads the best checkpoint's callback states
        metrics = evaluate(run, fit, evaluate_test)
        metrics["fit_seconds"] = time.perf_counter() - started
        poor_fit = worse_than_the_mean(metrics)
        if poor_fit:
            log.warning("warning: %s", poor_fit)
        model_uri = ""
        if record is not None:
            if poor_fit:
                record.client.set_tag(record.run_id, "poor_fit", poor_fit)
            if stopped:
                record.client.set_tag(record.run_id, "stopped_early", stopped)
            best = fit.checkpoint.best_model_path or None
            model_uri = record.finish(run.cfg, run.dm, metrics, best, final_weights, fit.resizer, log_model)
        return RunResult(
            run_id=fit.ids.ids[0],
            experiment_id=fit.ids.ids[1],
            status="FINISHED",
            dataset=run.cfg.data,
            task=run.dm.task,
            model=str(run.cfg.model),
            batch_size_start=run.dm.initial_batch_size(),
            batch_size_end=run.dm.batch_size,
            batch_size_max=max(_batch_sizes(run, record, fit.resizer)),
            epochs=fit.trainer.current_epoch,
            seconds=metrics["fit_seconds"],
            samples_seen=samples_seen,
            metrics=metrics,
            tracking_uri=run.uri,
            rank=run.rank,
            model_uri=model_uri,
            target_scaled=run.dm.target_scaling is not None,
            poor_fit=poor_fit,
        )
    except clean_stops as exc:
        if record is not None:
            record.stop(exc)
        raise
    except BaseException as exc:
        if record is not None:
            record.fail(exc)
        else:
            _leave_failure_to_rank_zero(run.rank)
        raise


# -- 1. prepare ---------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """A validated config, where it trains, and its data and module, before any MLflow run exists."""

    cfg: RunConfig
    placement: Placement
    rank: int
    dm: TabularDataModule
    module: TaskModule
    uri: str
    #: How the lr was found when no ``--lr`` was given (None: it was given, or the fixed default).
    lr_search: LrSearch | None = None


def prepare_run(cfg: RunConfig, resume_run_id: str | None = None) -> PreparedRun:
    """Validate, place, read, clean, split and scale: every input error happens here, before a run exists."""
    if resume_run_id is not None:
        cfg = load_resumable_config(cfg, resume_run_id)
    cfg = cfg.validate()
    placement = resolve_placement(cfg)  # a GPU that is not there is an error before the data is read
    check_strategy(placement)
    rank = process_rank(placement)
    uri = resolve_tracking_uri(cfg.tracking_uri)
    if rank == 0:  # the only rank that opens the store
        warn_if_password(uri, "the tracking URI")
        check_store_access(uri)
    dm = TabularDataModule(cfg, describe_source=dataset_input_fields)
    dm.setup()
    cfg = cfg.replace(task=dm.task).validate()  # a file source's task is known only now: the model default
    check_model_for_task(cfg.model, dm.task)
    check_model_for_data(cfg.model, dm.n_features)
    Augmenter.parse(cfg.augment).check_features(dm.n_features)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    initial = torch.random.get_rng_state()
    module = build_module(cfg, dm)
    search = None
    if cfg.lr is None:  # no --lr: a short range test on a copy of the network finds it
        search = search_lr(cfg, dm, module)
        cfg = cfg.replace(lr=search.lr)
        # Built again from the same random state: the same initial weights, with the found lr in the
        # hyperparameters the module saves and logs, as if it had been given.
        torch.random.set_rng_state(initial)
        module = build_module(cfg, dm)
    return PreparedRun(cfg, placement, rank, dm, module, uri, search)


def search_lr(cfg: RunConfig, dm: TabularDataModule, module: TaskModule) -> LrSearch:
    """The lr for a config given none: :func:`range_test` on a copy of ``module``'s network, on the
    starting batch size's batches of the training split in a seeded order (every rank of a DDP run
    finds the same lr). The random number generators are left as they were: the run that follows
    trains as it would with that lr given."""
    x, y = dm.train_set.features, dm.train_set.targets
    batch = max(1, min(dm.initial_batch_size(), 512))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    batches = [(x[order[i : i + batch]], y[order[i : i + batch]]) for i in range(0, len(x), batch)][:100]
    options: dict[str, Any] = {"weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        options["momentum"] = cfg.momentum
    fallback = DEFAULT_LR.get(cfg.model or "", 0.01)
    state = torch.random.get_rng_state()
    try:
        return range_test(
            module.model, optimizer_factory(cfg.optimizer, **options), module.loss, batches, fallback=fallback
        )
    finally:
        torch.random.set_rng_state(state)


def build_module(cfg: RunConfig, dm: TabularDataModule) -> TaskModule:
    """The TaskModule for a validated config and a set-up data module."""
    model = build_model(
        cfg.model or "linear",
        n_features=dm.n_features,
        n_outputs=dm.n_outputs,
        hidden=cfg.hidden,
        activation=cfg.activation,
        dropout=cfg.dropout,
        init=cfg.init,
        channels=cfg.channels,
    )
    return TaskModule(
        model,
        task=dm.task,
        n_classes=dm.n_outputs if dm.task == "classification" else None,
        optimizer=cfg.optimizer,
        lr=float(cfg.lr or 0.01),  # validate() set it, or the range test will (prepare_run)
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        max_epochs=cfg.epochs,
        grad_clip=cfg.grad_clip,
        grad_ratio_limit=cfg.grad_ratio_limit,
        log_every=cfg.log_every,
        on_nan=cfg.on_nan,
        augment=list(cfg.augment),
        target_scaling=dm.target_scaling,
    )


def build_resizer(cfg: RunConfig) -> DynamicBatchSize:
    """The DynamicBatchSize callback a config asks for (``cfg.dynamic``): its options are the config's."""
    return DynamicBatchSize(**cfg.batch_size_options())


def run_params(run: PreparedRun) -> dict[str, Any]:
    """The run's MLflow params: the options as given (auto stays auto, so the config reruns anywhere),
    and what they became here."""
    data = run.dm.prepared
    assert data is not None
    return {
        **run.cfg.to_record(),
        "accelerator_resolved": run.placement.accelerator,
        "devices_resolved": run.placement.devices,
        "strategy_resolved": run.placement.strategy,
        "world_size": run.placement.world_size,
        "n_train": len(run.dm.train_set),
        "n_val": len(run.dm.val_set),
        "n_test": len(run.dm.test_set),
        "n_features": run.dm.n_features,
        "dropped_rows": data.dropped_rows,
        "batch_size_resolved": run.dm.initial_batch_size(),
    }


def process_rank(placement: Placement) -> int:
    """This process's global rank as Lightning numbers it; 0 in a single-process run.

    Known before the fit, from the same environment Lightning reads (``LOCAL_RANK`` in a process its
    DDP launcher started, ``NODE_RANK`` on another machine, torchrun's ``RANK``, SLURM's), because
    only global rank 0 may create the MLflow run. Asked of a Trainer built for the placement alone:
    building one starts nothing.
    """
    if placement.world_size == 1:
        return 0
    probe = pl.Trainer(
        **placement.trainer_options(),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return probe.global_rank


def check_strategy(placement: Placement) -> None:
    """Refuse ``ddp_spawn`` with one line, before the data is read or a run exists.

    Under ``ddp_spawn`` the ranks train in spawned copies of the module, callbacks and logger, and
    Lightning brings back only the weights and the last callback metrics: tried, the run ended
    FINISHED with its per-step metrics, but with ``best_val_loss`` NaN, ``epochs_run`` 0, an empty
    loss plot and no batch-size decisions, and ``samples_seen`` 0 in the result. ``ddp`` runs the
    same command once per device instead, each rank in a process of its own, with none of that lost.
    """
    if placement.strategy == "ddp_spawn":
        raise UserError(
            "--strategy ddp_spawn is not supported: its ranks train in spawned copies of the module, callbacks "
            "and logger, and the run's summary (best val loss, epochs, samples seen), loss plot and batch-size "
            "decisions would stay in those copies; use --strategy ddp (Lightning runs the same command once per "
            "device)"
        )


# -- 2. build the trainer -----------------------------------------------------------------------------


@dataclass
class Fit:
    """The Trainer of a run and the callbacks whose results the run reports."""

    trainer: pl.Trainer
    checkpoint: ModelCheckpoint
    resizer: DynamicBatchSize | None
    ids: _ShareRunId
    resume_from: Path | None


def build_trainer(
    run: PreparedRun,
    record: RunRecord | None,
    resume_run_id: str | None,
    callbacks: Sequence[Callback],
    trainer_options: dict[str, Any] | None,
    progress_bar: bool | None,
    verbose: bool,
) -> Fit:
    """The Trainer with the run's checkpoints, guards, progress bar and batch-size callback."""
    cfg = run.cfg
    if record is not None:
        folder: Path | None = record.checkpoints
        ids = _ShareRunId(record.run_id, record.experiment_id)
    else:
        # Another rank: no store, no run. Lightning's ModelCheckpoint takes rank 0's folder at setup
        # (a broadcast); a resumed fit reads its last.ckpt from the path every rank can compute.
        folder = checkpoint_dir(run.uri, resume_run_id) if resume_run_id else None
        ids = _ShareRunId(resume_run_id or "", "")
    checkpoint = ModelCheckpoint(
        dirpath=folder, filename="best", monitor="val_loss", mode="min", save_top_k=1
    )
    # The resumable state, mid-epoch included (the sampler saves its trained position), written atomically
    # by AtomicCheckpointIO. Two writers of one file: Lightning takes either a step or an epoch trigger.
    last_by_steps = ModelCheckpoint(
        dirpath=folder,
        filename="last",
        every_n_train_steps=cfg.checkpoint_every,
        enable_version_counter=False,
    )
    last_by_epoch = ModelCheckpoint(
        dirpath=folder,
        filename="last",
        every_n_epochs=1,
        save_on_train_epoch_end=True,
        enable_version_counter=False,
    )
    # The bar by default where someone watches (a terminal), never in logs or tests; rank 0's only.
    show_bar = run.rank == 0 and (sys.stderr.isatty() if progress_bar is None else progress_bar)
    resizer = build_resizer(cfg) if cfg.dynamic else None
    all_callbacks: list[Callback] = [
        ids,
        *([BatchProgressBar()] if show_bar else []),
        checkpoint,
        last_by_steps,
        last_by_epoch,
        StopOnNonFiniteLoss(),
        *callbacks,
        *([resizer] if resizer is not None else []),
        *([EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min")] if cfg.patience else []),
    ]
    options: dict[str, Any] = dict(
        max_epochs=cfg.epochs,
        # Lightning's Timer: checked after every step, so the cap holds within a step's time.
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes is not None else None,
        check_val_every_n_epoch=cfg.val_every,
        logger=record.logger if record is not None else False,
        callbacks=all_callbacks,
        enable_progress_bar=show_bar,
        enable_model_summary=verbose and run.rank == 0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        **run.placement.trainer_options(),
        plugins=[AtomicCheckpointIO()],
    )
    options.update(trainer_options or {})
    resume_from = checkpoint_dir(run.uri, resume_run_id) / "last.ckpt" if resume_run_id else None
    return Fit(pl.Trainer(**options), checkpoint, resizer, ids, resume_from)


# -- 3. evaluate --------------------------------------------------------------------------------------


def evaluate(run: PreparedRun, fit: Fit, evaluate_test: bool) -> dict[str, float]:
    """The test split on the best validation checkpoint's weights (unless ``evaluate_test`` is off),
    and the fit's summary: best val loss and epochs."""
    trainer, best = fit.trainer, fit.checkpoint.best_model_path or None
    test_metrics: Mapping[str, Any] = {}
    if evaluate_test:
        if trainer.world_size > 1:
            # Rank 0 reads the best checkpoint and sends its weights: another machine need not see its folder.
            _load_best_weights_on_every_rank(trainer, run.module, best)
            best = None
        test_metrics = trainer.test(run.module, datamodule=run.dm, ckpt_path=best, verbose=False)[0]
    best_val = fit.checkpoint.best_model_score
    return {
        **{k: float(v) for k, v in test_metrics.items()},
        "best_val_loss": float(best_val) if best_val is not None else math.nan,
        "epochs_run": float(trainer.current_epoch),
    }


def _batch_sizes(run: PreparedRun, record: RunRecord | None, resizer: DynamicBatchSize | None) -> list[int]:
    """Every batch size the run trained at, as far as this rank knows."""
    logged = record.logger.history.get("batch_size", []) if record is not None else []
    return [
        run.dm.initial_batch_size(),
        run.dm.batch_size,
        *(int(v) for _, v in logged),
        *(int(d["to"]) for d in (resizer.decisions if resizer is not None else [])),
    ]


def _load_best_weights_on_every_rank(trainer: pl.Trainer, module: TaskModule, best: str | None) -> None:
    """The best checkpoint's weights into ``module`` on every rank, read from disk by rank 0 alone.

    ``trainer.test(ckpt_path=...)`` would have each rank read the file, and only rank 0 wrote it:
    on several machines without a shared filesystem the others would not find it. Without a best
    checkpoint (no validation ran) every rank tests the weights it ends with, as a single process does.
    """
    state = None
    if trainer.is_global_zero and best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    state = trainer.strategy.broadcast(state, src=0)
    if state is not None:
        module.load_state_dict(state)


# -- the pieces a fit runs with -----------------------------------------------------------------------


class StopOnNonFiniteLoss(Callback):
    """Fail the run when the validation loss is NaN or infinite: training diverged.

    Runs before any user callback, so a tuner's pruner never sees the NaN (Optuna's median pruner
    would call such a trial PRUNED; it is a failure).
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or value is None:
            return
        if not math.isfinite(float(value)):
            raise FloatingPointError(
                f"val_loss is {float(value)} after epoch {trainer.current_epoch} (step {trainer.global_step}): "
                "training diverged; lower --lr or set --grad-clip"
            )


class _ShareRunId(Callback):
    """Rank 0's run and experiment ids, broadcast to every rank when the fit sets up (the other ranks
    never open the tracking store, but their RunResult names the one run)."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.ids: tuple[str, ...] = (run_id, experiment_id)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            destroy_process_group_at_exit()  # else gloo can abort the process after a good run
            self.ids = tuple(trainer.strategy.broadcast(self.ids, src=0))


#: Longest a failing DDP rank waits for rank 0 to record the failure before it exits.
FAILURE_HANDOFF_SECONDS = 30.0


def _leave_failure_to_rank_zero(rank: int) -> None:
    """On a failing rank other than 0: let rank 0 end the run FAILED before this process exits.

    Lightning's DDP launcher watches the ranks it started and SIGKILLs the launching process (rank 0
    of this node) as soon as one exits with an error; rank 0 would then die before it marks the run
    FAILED, leaving it RUNNING. So this rank first closes its connections (rank 0's next collective
    fails at once and ends the run FAILED), then waits for its launcher to exit, at most
    :data:`FAILURE_HANDOFF_SECONDS`, and only then lets its own error end the process.
    """
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    # Only a process Lightning launched on node 0 has rank 0 for a parent (LOCAL_RANK set by the launcher).
    launched_by_rank_zero = (
        os.environ.get("NODE_RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") != "0"
    )
    if rank == 0 or not launched_by_rank_zero:
        return
    parent = os.getppid()
    deadline = time.monotonic() + FAILURE_HANDOFF_SECONDS
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.1)


def quiet_lightning(verbose: bool = False) -> None:
    """Silence Lightning's start-up chatter (GPU/TPU lines, worker hints) unless ``verbose``."""
    level = logging.INFO if verbose else logging.WARNING
    import mlflow  # noqa: F401  -- mlflow configures its loggers on import: set the level after that

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "mlflow"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # In-memory tensors need no worker processes; Lightning's hint about them is noise here.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
        # torch 2.13 deprecates a pytree check that Lightning 2.6 still uses: not the user's concern.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        # Our step checkpoints hold the state after the step, with the sampler's trained position to match.
        warnings.filterwarnings("ignore", message=r".*manual optimization and every_n_train_steps.*")
