"""One run, end to end: config → data → TaskModule → Trainer → MLflow, and a summary back.

The order matters for bad input: the config is validated and the data read, cleaned and split
*before* an MLflow run exists, so a bad file costs nothing but its error line. Once the run
exists, any exception ends it FAILED with the error in a tag — never left RUNNING.

Example:
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
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_batch._extras import check
from lightning_batch.config import RunConfig, UserError, check_model_for_data, check_model_for_task
from lightning_batch.placement import Placement, resolve_placement
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.plugin.checkpoint_io import AtomicCheckpointIO
from lightning_batch.plugin.progress import BatchProgressBar
from lightning_batch.store_uri import resolve_tracking_uri, sqlite_path
from lightning_batch.tabular.augment import Augmenter
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.networks import build_model
from lightning_batch.tabular.task_module import TaskModule
from lightning_batch.tracking.datasets import log_dataset_fields, log_dataset_input
from lightning_batch.tracking.logger import BufferedMLFlowLogger
from lightning_batch.tracking.plots import plot_batch_dynamics, plot_loss_curves
from lightning_batch.tracking.run_owners import claim_for_resume, owner_tags, reap_quietly
from lightning_batch.tracking.store import ensure_store, get_or_create_experiment, git_commit

# Every run is recorded in MLflow and ends with plots: say so now, not after the fit (no import cost).
check(("mlflow", "matplotlib"), "tracking", "the tabular training path (it records runs in MLflow)")


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


def default_run_name(cfg: RunConfig) -> str:
    """``data-model-batch-xxxx``: readable in the UI and distinct. MLflow's own random names come from
    ``random``, which ``seed_everything`` has just seeded: every run of a seed got the same name."""
    data = Path(cfg.data).stem if cfg.is_file_source else cfg.data
    batch = (
        cfg.batch_size
        if cfg.policy in (None, "fixed") or cfg.batch_size == "auto"
        else f"{cfg.policy}{cfg.batch_size}"
    )
    return f"{data}-{cfg.model}-b{batch}-{secrets.token_hex(2)}"


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
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        max_epochs=cfg.epochs,
        grad_clip=cfg.grad_clip,
        grad_ratio_limit=cfg.grad_ratio_limit,
        log_every=cfg.log_every,
        on_nan=cfg.on_nan,
        augment=list(cfg.augment),
    )


def build_resizer(cfg: RunConfig) -> DynamicBatchSize:
    """The DynamicBatchSize callback a config asks for (``cfg.dynamic`` must be true)."""
    return DynamicBatchSize(
        policy=cfg.resolved_policy,
        lr_rule=cfg.resolved_lr_rule,
        min_batch=cfg.min_batch,
        max_batch=cfg.max_batch,
        multiple=cfg.multiple,
        adjust_every=cfg.adjust_every,
        min_timed_steps=cfg.min_timed_steps,
        measure_every=cfg.measure_every,
        measure_budget=cfg.measure_budget,
        hysteresis=cfg.hysteresis,
        ema_decay=cfg.ema_decay,
        noise_window=cfg.noise_window,
        noise_k=cfg.noise_k,
        explore_factor=cfg.explore_factor,
        min_efficiency=cfg.min_efficiency,
        max_lr_scale=cfg.max_lr_scale,
        milestones=tuple(cfg.milestones),
        schedule_factor=cfg.schedule_factor,
        probe_memory=cfg.probe_memory,
        memory_budget=cfg.memory_budget,
        log_every=cfg.log_every,
        fallback_microbatches=cfg.fallback_microbatches,
        fallback_every=cfg.fallback_every,
        accumulate=cfg.accumulate,
    )


def _checkpoint_dir(uri: str, run_id: str) -> Path:
    db = sqlite_path(uri)
    base = db.parent / "checkpoints" if db is not None else Path(tempfile.gettempdir()) / "lightning-batch"
    return base / run_id


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


class _ShareRunId(Callback):
    """Rank 0's run and experiment ids, broadcast to every rank when the fit sets up (the other ranks
    never open the tracking store, but their RunResult names the one run)."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.ids = (run_id, experiment_id)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
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
    ``log_model`` logs the best checkpoint with its preprocessing as the run's MLflow Model (a pyfunc,
    :mod:`lightning_batch.tracking.run_model`); a tuning trial skips it, the study's refit does not.

    Under DDP every rank calls this (Lightning's launcher re-runs the command once per device):
    only global rank 0 creates, writes and ends the MLflow run and its artifacts; the other ranks
    train without opening the tracking store and return a :class:`RunResult` with their ``rank``.
    """
    quiet_lightning(verbose)
    if resume_run_id is not None:
        cfg = load_resumable_config(cfg, resume_run_id)
    cfg.validate()
    placement = resolve_placement(cfg)  # a GPU that is not there is an error before the data is read
    check_strategy(placement)
    rank = process_rank(placement)
    dm = TabularDataModule(cfg)
    dm.setup()  # read, clean, split, scale: every data error happens here, before a run exists
    cfg.task = dm.task
    cfg.validate()  # a file source's task is known only now: fill in the model default
    check_model_for_task(cfg.model, dm.task)
    check_model_for_data(cfg.model, dm.n_features)
    Augmenter.parse(cfg.augment).check_features(dm.n_features)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg, dm)

    uri = resolve_tracking_uri(cfg.tracking_uri)
    logger: BufferedMLFlowLogger | None = None
    if rank == 0:
        ensure_store(uri)
        reap_quietly(uri)  # runs whose process died end FAILED ("process lost") before this one starts
        if resume_run_id is not None:
            claim_for_resume(uri, resume_run_id)  # refused if a live process trains it: one writer a run
        experiment_id = get_or_create_experiment(uri, cfg.experiment)
        tags = {
            "task": dm.task,
            "dataset": cfg.data,
            "model": str(cfg.model),
            **placement.tags(),
            **(extra_tags or {}),
            **owner_tags(),  # this process (rank 0): a reaper ends the run FAILED if it dies
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        logger = BufferedMLFlowLogger(
            experiment_name=cfg.experiment,
            tracking_uri=uri,
            run_name=cfg.run_name or default_run_name(cfg),
            tags=tags,
            run_id=resume_run_id,
        )
        run_id = logger.run_id
        client = logger.experiment
        checkpoint_dir: Path | None = _checkpoint_dir(uri, run_id)
    else:
        # Another rank: no store, no run. Lightning's ModelCheckpoint takes rank 0's folder at setup
        # (a broadcast); a resumed fit reads its last.ckpt from the path every rank can compute.
        run_id, experiment_id = resume_run_id or "", ""
        checkpoint_dir = _checkpoint_dir(uri, resume_run_id) if resume_run_id else None
    resume_from = _checkpoint_dir(uri, resume_run_id) / "last.ckpt" if resume_run_id else None
    started = time.perf_counter()
    model_uri = ""
    try:
        data = dm.prepared
        assert data is not None
        if logger is not None:
            assert checkpoint_dir is not None
            if on_run_created is not None:
                on_run_created(run_id)
            if resume_run_id is not None:
                client.set_tag(run_id, "resumed", "true")  # claimed and set RUNNING above
            else:
                checkpoint_dir.mkdir(parents=True, exist_ok=True)
                (checkpoint_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                _log_params(logger, cfg, dm, placement)
                with contextlib.suppress(
                    Exception
                ):  # a dataset profile is nice to have, never worth a failed run
                    if data.raw_frame is not None:
                        log_dataset_input(
                            client, run_id, data.raw_frame, data.source, data.target_column, cfg.data
                        )
                    elif data.dataset_input is not None:  # tables from the data cache
                        log_dataset_fields(client, run_id, data.dataset_input)

        checkpoint = ModelCheckpoint(
            dirpath=checkpoint_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1
        )
        # The resumable state, mid-epoch included (the sampler saves its trained position), written
        # atomically by AtomicCheckpointIO (a temporary file beside it renamed over the old one), so a
        # kill during a save leaves the previous last.ckpt whole.
        # Two writers of the same file, because Lightning takes either a step or an epoch trigger.
        last_by_steps = ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="last",
            every_n_train_steps=cfg.checkpoint_every,
            enable_version_counter=False,
        )
        last_by_epoch = ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="last",
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        # The bar by default where someone watches (a terminal), never in logs or tests; rank 0's only.
        show_bar = rank == 0 and (sys.stderr.isatty() if progress_bar is None else progress_bar)
        ids = _ShareRunId(run_id, experiment_id)
        all_callbacks: list[Callback] = [
            ids,
            *([BatchProgressBar()] if show_bar else []),
            checkpoint,
            last_by_steps,
            last_by_epoch,
            StopOnNonFiniteLoss(),
            *callbacks,
        ]
        resizer = build_resizer(cfg) if cfg.dynamic else None
        if resizer is not None:
            all_callbacks.append(resizer)
        if cfg.patience:
            all_callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.patience, mode="min"))
        options: dict[str, Any] = dict(
            max_epochs=cfg.epochs,
            check_val_every_n_epoch=cfg.val_every,
            logger=logger if logger is not None else False,
            callbacks=all_callbacks,
            enable_progress_bar=show_bar,
            enable_model_summary=verbose and rank == 0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,
            **placement.trainer_options(),
            plugins=[AtomicCheckpointIO()],
        )
        options.update(trainer_options or {})
        trainer = pl.Trainer(**options)
        # weights_only: a checkpoint holds tensors and plain containers only, so it loads without
        # unpickling arbitrary objects.
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
        best_val = checkpoint.best_model_score
        final_weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        ckpt_path = checkpoint.best_model_path or None
        samples_seen = module.samples_seen  # before test() loads the best checkpoint's counters
        test_metrics: dict[str, Any] = {}
        if evaluate_test:
            if trainer.world_size > 1:
                # Rank 0 reads the best checkpoint and sends its weights: another machine need not
                # see rank 0's checkpoint folder.
                _load_best_weights_on_every_rank(trainer, module, ckpt_path)
                ckpt_path = None
            test_metrics = trainer.test(module, datamodule=dm, ckpt_path=ckpt_path, verbose=False)[0]
        seconds = time.perf_counter() - started
        summary = {
            **{k: float(v) for k, v in test_metrics.items()},
            "best_val_loss": float(best_val) if best_val is not None else float("nan"),
            "fit_seconds": seconds,
            "epochs_run": float(trainer.current_epoch),
        }
        if logger is not None:
            logger.log_metrics(
                {k: v for k, v in summary.items() if k.startswith(("best_", "fit_", "epochs_"))}
            )
            logger.flush()
            _log_run_artifacts(client, run_id, cfg, dm, logger, checkpoint, resizer, final_weights)
            if log_model:
                model_uri = _log_run_model(uri, run_id, cfg, dm, checkpoint, final_weights)
            logger.finalize("success")
            assert checkpoint_dir is not None
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the best one is an artifact now
        return RunResult(
            run_id=ids.ids[0],
            experiment_id=ids.ids[1],
            status="FINISHED",
            dataset=cfg.data,
            task=dm.task,
            model=str(cfg.model),
            batch_size_start=dm.initial_batch_size(),
            batch_size_end=dm.batch_size,
            batch_size_max=max(
                [
                    dm.initial_batch_size(),
                    dm.batch_size,
                    *(int(v) for _, v in (logger.history if logger else {}).get("batch_size", [])),
                    *(int(d["to"]) for d in (resizer.decisions if resizer is not None else [])),
                ]
            ),
            epochs=trainer.current_epoch,
            seconds=seconds,
            samples_seen=samples_seen,
            metrics=summary,
            tracking_uri=uri,
            rank=rank,
            model_uri=model_uri,
        )
    except clean_stops as exc:
        if logger is not None:
            mark_run_stopped(logger, exc)
            assert checkpoint_dir is not None
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        raise
    except BaseException as exc:
        if logger is not None:
            mark_run_failed(logger, exc)
        else:
            _leave_failure_to_rank_zero(rank)
        raise


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


def _log_params(
    logger: BufferedMLFlowLogger, cfg: RunConfig, dm: TabularDataModule, placement: Placement
) -> None:
    data = dm.prepared
    assert data is not None
    logger.log_hyperparams(
        {
            **cfg.to_dict(),
            # The flags as given (auto stays auto, so the config reruns anywhere), and what they became here.
            "accelerator_resolved": placement.accelerator,
            "devices_resolved": placement.devices,
            "strategy_resolved": placement.strategy,
            "world_size": placement.world_size,
            "n_train": len(dm.train_set),
            "n_val": len(dm.val_set),
            "n_test": len(dm.test_set),
            "n_features": dm.n_features,
            "dropped_rows": data.dropped_rows,
            "batch_size_resolved": dm.initial_batch_size(),
        }
    )


def load_resumable_config(cfg: RunConfig, run_id: str) -> RunConfig:
    """The config a run started with (saved beside its checkpoints), for ``--resume RUN_ID``."""
    uri = resolve_tracking_uri(cfg.tracking_uri)
    folder = _checkpoint_dir(uri, run_id)
    saved, last = folder / "config.yaml", folder / "last.ckpt"
    if not saved.is_file() or not last.is_file():
        raise UserError(
            f"run {run_id!r} has no checkpoint to resume from in {str(folder)!r}; it finished (its best checkpoint is an "
            "MLflow artifact) or never reached the end of an epoch — start a new run instead"
        )
    values = yaml.safe_load(saved.read_text()) or {}
    values["tracking_uri"] = cfg.tracking_uri
    return RunConfig.from_mapping(values, origin=repr(str(saved)))


def mark_run_failed(logger: BufferedMLFlowLogger, exc: BaseException) -> None:
    """End the run FAILED with the error in its tags (whatever was buffered is written first)."""
    with contextlib.suppress(Exception):
        logger.flush()
    with contextlib.suppress(Exception):
        message = f"{type(exc).__name__}: {exc}".strip()
        logger.experiment.set_tag(logger.run_id, "error", message[:4000])
        if isinstance(getattr(exc, "step", None), int):
            logger.experiment.set_tag(logger.run_id, "nonfinite_step", str(exc.step))
        logger.experiment.set_terminated(
            logger.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        )


def mark_run_stopped(logger: BufferedMLFlowLogger, exc: BaseException) -> None:
    """End a run stopped on purpose (e.g. pruned) FINISHED, its metrics so far written, the reason in a tag."""
    with contextlib.suppress(Exception):
        logger.flush()
    with contextlib.suppress(Exception):
        logger.experiment.set_tag(logger.run_id, "stopped", str(exc)[:4000] or type(exc).__name__)
        logger.experiment.set_terminated(logger.run_id, "FINISHED")


def _log_run_model(
    uri: str, run_id: str, cfg: RunConfig, dm: TabularDataModule, checkpoint: ModelCheckpoint, final: dict
) -> str:
    """Log the run's MLflow Model from the best validation checkpoint (the final weights when no
    validation ran), the weights ``test_*`` were measured with; its ``models:/`` URI."""
    from lightning_batch.tracking.run_model import log_run_model, network_weights

    state = final
    if checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file():
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    info = log_run_model(uri, run_id, cfg, dm.prepared, dm.n_features, dm.n_outputs, network_weights(state))
    return str(info.model_uri)


def _log_run_artifacts(
    client: Any,
    run_id: str,
    cfg: RunConfig,
    dm: TabularDataModule,
    logger: BufferedMLFlowLogger,
    checkpoint: ModelCheckpoint,
    resizer: DynamicBatchSize | None,
    final_weights: dict[str, Any],
) -> None:
    data = dm.prepared
    assert data is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        preprocessing = {
            "task": data.task,
            "classes": data.classes,
            "dropped_rows": data.dropped_rows,
            "source": data.source,
            **data.preprocessor.to_dict(),
        }
        (folder / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
        plot_loss_curves(logger.history, folder / "loss_curves.png")
        if resizer is not None:
            if resizer.history:
                plot_batch_dynamics(resizer.history, folder / "batch_size.png")
            (folder / "batch_size_decisions.json").write_text(
                json.dumps(
                    {
                        "decisions": resizer.decisions,
                        "probe": resizer.probe.as_dict() if resizer.probe else None,
                    },
                    indent=2,
                    default=str,
                )
            )
        client.log_artifacts(run_id, str(folder))
    with tempfile.TemporaryDirectory() as tmp:
        # The weights at the end of training (best.ckpt is the best validation epoch's), a plain
        # state_dict: torch.load(path, weights_only=True).
        torch.save(final_weights, Path(tmp) / "final_weights.pt")
        client.log_artifact(run_id, str(Path(tmp) / "final_weights.pt"), "checkpoints")
    if checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file():
        client.log_artifact(run_id, checkpoint.best_model_path, "checkpoints")
