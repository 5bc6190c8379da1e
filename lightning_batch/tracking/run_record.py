"""A run's record in MLflow: opened before training, written as it goes, ended exactly once.

:class:`RunRecord` is what :func:`lightning_batch.training.train` writes through, on global rank 0
only: the run (created, or claimed again for ``--resume``), its owner tags (so a reaper ends it
FAILED if the process dies), its params and dataset input, its artifacts and model at the end, and
its end state: FINISHED, FAILED with the error in a tag, or FINISHED with a ``stopped`` tag for a
run stopped on purpose (a pruned trial). An Optuna study's parent run is opened through the same
:func:`open_store` and owner tags (:mod:`lightning_batch.tune.study`).

Where a run keeps its resumable checkpoints: ``checkpoints/<run id>/`` beside a sqlite store (the
system's temporary folder for a server), with the config it started from, for ``--resume RUN_ID``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.store_uri import sqlite_path
from lightning_batch.tracking.datasets import log_dataset_fields, log_dataset_input
from lightning_batch.tracking.logger import BufferedMLFlowLogger
from lightning_batch.tracking.plots import plot_batch_dynamics, plot_loss_curves
from lightning_batch.tracking.run_owners import claim_for_resume, owner_tags, reap_quietly
from lightning_batch.tracking.store import ensure_store, get_or_create_experiment, git_commit

__all__ = ["RunRecord", "checkpoint_dir", "default_run_name", "load_resumable_config", "open_store"]


def open_store(uri: str) -> None:
    """The store exists, and runs whose process died are ended FAILED ("process lost") before a new one."""
    ensure_store(uri)
    reap_quietly(uri)


def checkpoint_dir(uri: str, run_id: str) -> Path:
    """Where run ``run_id`` keeps its resumable checkpoints and the config it started from."""
    db = sqlite_path(uri)
    base = db.parent / "checkpoints" if db is not None else Path(tempfile.gettempdir()) / "lightning-batch"
    return base / run_id


def default_run_name(cfg: RunConfig) -> str:
    """``data-model-batch-xxxx``: readable in the UI and distinct. MLflow's own random names come from
    ``random``, which ``seed_everything`` has just seeded: every run of a seed got the same name."""
    data = Path(cfg.data).stem if cfg.is_file_source else cfg.data
    batch = (
        cfg.batch_size
        if not cfg.dynamic or cfg.batch_size == "auto"
        else f"{cfg.resolved_policy}{cfg.batch_size}"
    )
    return f"{data}-{cfg.model}-b{batch}-{secrets.token_hex(2)}"


def load_resumable_config(cfg: RunConfig, run_id: str) -> RunConfig:
    """The config a run started with (saved beside its checkpoints), for ``--resume RUN_ID``."""
    from lightning_batch.store_uri import resolve_tracking_uri

    folder = checkpoint_dir(resolve_tracking_uri(cfg.tracking_uri), run_id)
    saved, last = folder / "config.yaml", folder / "last.ckpt"
    if not saved.is_file() or not last.is_file():
        raise UserError(
            f"run {run_id!r} has no checkpoint to resume from in {str(folder)!r}; it finished (its best checkpoint "
            "is an MLflow artifact) or never reached the end of an epoch — start a new run instead"
        )
    values = yaml.safe_load(saved.read_text()) or {}
    values["tracking_uri"] = cfg.tracking_uri
    return RunConfig.from_mapping(values, origin=repr(str(saved)))


class RunRecord:
    """One MLflow run, written by one process (global rank 0 of a fit; see the module docstring).

    Args:
        uri: the tracking store (opened: created if missing, lost runs reaped).
        experiment: its experiment (a model-training experiment, created if missing).
        run_name: the new run's name.
        tags: the new run's tags besides its owner and commit.
        run_id: write this existing run instead of creating one (its owner claimed it already).
    """

    def __init__(
        self, uri: str, experiment: str, run_name: str, tags: dict[str, str], run_id: str | None = None
    ) -> None:
        open_store(uri)
        self.uri = uri
        self.experiment_id = get_or_create_experiment(uri, experiment)
        tags = {**tags, **owner_tags()}  # this process: a reaper ends the run FAILED if it dies
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        self.logger = BufferedMLFlowLogger(
            experiment_name=experiment, tracking_uri=uri, run_name=run_name, tags=tags, run_id=run_id
        )
        assert self.logger.run_id is not None  # the logger created (or resumed) its run just now
        self.run_id: str = self.logger.run_id
        self.client = self.logger.experiment
        self.resumed = run_id is not None
        self.checkpoints = checkpoint_dir(uri, self.run_id)

    @classmethod
    def for_fit(
        cls, uri: str, cfg: RunConfig, tags: dict[str, str], resume_run_id: str | None = None
    ) -> RunRecord:
        """The run of one fit of ``cfg``: a new one, or ``resume_run_id`` claimed for this process
        (refused while a live process trains it: one writer a run)."""
        from mlflow.exceptions import MlflowException

        open_store(uri)
        try:
            if resume_run_id is not None:
                claim_for_resume(uri, resume_run_id)
            return cls(uri, cfg.experiment, cfg.run_name or default_run_name(cfg), tags, resume_run_id)
        except MlflowException as exc:
            if exc.get_http_status_code() != 403:
                raise
            # An authenticated server (run.py server): experiments belong to whoever created them.
            raise UserError(
                f"the tracking server refused to write to experiment {cfg.experiment!r} (403: another user "
                "owns it); pass --experiment NAME of your own, or ask its owner or an admin for EDIT on it"
            ) from None

    # -- the start ----------------------------------------------------------------------------------

    def begin(self, cfg: RunConfig, params: dict[str, Any], data: Any) -> None:
        """A new run gets its config (beside its checkpoints, for ``--resume``), params and dataset
        input; a resumed one a ``resumed`` tag (it was claimed and set RUNNING already)."""
        if self.resumed:
            self.client.set_tag(self.run_id, "resumed", "true")
            return
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        (self.checkpoints / "config.yaml").write_text(yaml.safe_dump(cfg.to_record(), sort_keys=False))
        self.logger.log_hyperparams(params)
        with contextlib.suppress(Exception):  # a dataset profile is nice to have, never worth a failed run
            if data.raw_frame is not None:
                log_dataset_input(
                    self.client, self.run_id, data.raw_frame, data.source, data.target_column, cfg.data
                )
            elif data.dataset_input is not None:  # tables from the data cache
                log_dataset_fields(self.client, self.run_id, data.dataset_input)

    # -- the end ------------------------------------------------------------------------------------

    def finish(
        self,
        cfg: RunConfig,
        dm: Any,
        summary: dict[str, float],
        best_checkpoint: str | None,
        final_weights: dict[str, torch.Tensor],
        resizer: Any = None,
        log_model: bool = True,
    ) -> str:
        """Summary metrics, artifacts and (with ``log_model``) the run's model; the run ends FINISHED.
        Returns the model's ``models:/`` URI, or "" when none was logged."""
        self.logger.log_metrics(
            {k: v for k, v in summary.items() if k.startswith(("best_", "fit_", "epochs_"))}
        )
        self.logger.flush()
        self._log_artifacts(cfg, dm, best_checkpoint, final_weights, resizer)
        model_uri = self._log_model(cfg, dm, best_checkpoint, final_weights) if log_model else ""
        self.logger.finalize("success")

        shutil.rmtree(self.checkpoints, ignore_errors=True)  # the best one is an artifact now
        return model_uri

    def fail(self, exc: BaseException) -> None:
        """End the run FAILED (KILLED for an interrupt) with the error in its tags, what was buffered written first."""
        with contextlib.suppress(Exception):
            self.logger.flush()
        with contextlib.suppress(Exception):
            message = f"{type(exc).__name__}: {exc}".strip()
            self.client.set_tag(self.run_id, "error", message[:4000])
            if isinstance(getattr(exc, "step", None), int):
                self.client.set_tag(self.run_id, "nonfinite_step", str(exc.step))  # type: ignore[attr-defined]
            self.client.set_terminated(
                self.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            )

    def stop(self, exc: BaseException) -> None:
        """End a run stopped on purpose (e.g. pruned) FINISHED, its metrics so far written, the reason in a tag."""
        with contextlib.suppress(Exception):
            self.logger.flush()
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, "stopped", str(exc)[:4000] or type(exc).__name__)
            self.client.set_terminated(self.run_id, "FINISHED")

        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def _log_model(self, cfg: RunConfig, dm: Any, best: str | None, final: dict[str, torch.Tensor]) -> str:
        """The run's MLflow Model from the best validation checkpoint (the final weights when no
        validation ran): the weights ``test_*`` were measured with."""
        from lightning_batch.tracking.run_model import log_run_model, network_weights

        state = final
        if best and Path(best).is_file():
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        info = log_run_model(
            self.uri, self.run_id, cfg, dm.prepared, dm.n_features, dm.n_outputs, network_weights(state)
        )
        return str(info.model_uri)

    def _log_artifacts(
        self, cfg: RunConfig, dm: Any, best: str | None, final_weights: dict[str, torch.Tensor], resizer: Any
    ) -> None:
        data = dm.prepared
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_record(), sort_keys=False))
            preprocessing = {
                "task": data.task,
                "classes": data.classes,
                "dropped_rows": data.dropped_rows,
                "source": data.source,
                **data.preprocessor.to_dict(),
            }
            (folder / "preprocessing.json").write_text(json.dumps(preprocessing, indent=2))
            plot_loss_curves(self.logger.history, folder / "loss_curves.png")
            if resizer is not None:
                if resizer.history:
                    plot_batch_dynamics(resizer.history, folder / "batch_size.png")
                decisions = {
                    "decisions": resizer.decisions,
                    "kept": resizer.kept.entries,
                    "probe": resizer.probe.as_dict() if resizer.probe else None,
                }
                (folder / "batch_size_decisions.json").write_text(
                    json.dumps(decisions, indent=2, default=str)
                )
            self.client.log_artifacts(self.run_id, str(folder))
        with tempfile.TemporaryDirectory() as tmp:
            # The weights at the end of training (best.ckpt is the best validation epoch's), a plain
            # state_dict: torch.load(path, weights_only=True).
            torch.save(final_weights, Path(tmp) / "final_weights.pt")
            self.client.log_artifact(self.run_id, str(Path(tmp) / "final_weights.pt"), "checkpoints")
        if best and Path(best).is_file():
            self.client.log_artifact(self.run_id, best, "checkpoints")
