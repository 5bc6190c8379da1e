"""Optuna studies over lr and batch size (and batch policy); every trial is a child MLflow run.

One study is one MLflow experiment (named after the study) holding a parent run for the study,
one child run per trial (``mlflow.parentRunId``) and, after the search, one run that refits the best
configuration and evaluates it once on the test split. The study itself lives in an Optuna RDB
storage (default ``sqlite:///mlruns/optuna.db``; PostgreSQL for many machines): the same name
resumes it, and any number of workers — processes here or on other machines — share it.

Why each piece:

- trials report ``val_loss`` per epoch through optuna-integration's ``PyTorchLightningPruningCallback``,
  so the pruner (median by default) stops hopeless trials early; a pruned trial's run ends FINISHED
  with ``optuna_trial_state=PRUNED``, not as a crash;
- RDB storages get a heartbeat: a worker that dies (SIGKILL, lost machine) leaves a trial whose
  heartbeat goes stale; the next worker to start a trial marks it FAIL, ends its MLflow run FAILED and
  queues a retry with the same parameters (:class:`StaleTrialRetry`);
- workers on one machine are separate processes (``python -m lightning_batch.tune.study``), so a crash
  in one cannot take the others down, and each is given its share of the CPU threads and, when the
  trials would train on GPUs, its own GPU: worker i of K sees GPU i mod n of the n visible
  (``CUDA_VISIBLE_DEVICES``, see :func:`worker_environment`).

Example (one process, bundled data, a throw-away store; the prepared data goes to its data-cache/):
    >>> import tempfile
    >>> from lightning_batch.config import RunConfig
    >>> root = tempfile.mkdtemp()
    >>> base = RunConfig(data="iris", epochs=2, tracking_uri=f"sqlite:///{root}/mlflow.db")
    >>> options = TuneConfig(study="iris-doc", trials=2, storage=f"sqlite:///{root}/optuna.db", retrain="none")
    >>> result = tune(base, options, echo=lambda line: None)
    >>> result.states["COMPLETE"] + result.states["PRUNED"] + result.states["FAIL"]
    2
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_batch import placement as hardware
from lightning_batch._extras import check, extra_imports
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.store_uri import redact, resolve_tracking_uri, sqlite_path, warn_if_password
from lightning_batch.tabular import cache as data_cache
from lightning_batch.tracking.run_owners import claim_run
from lightning_batch.tracking.run_record import RunRecord, open_store
from lightning_batch.tracking.store import check_store_access
from lightning_batch.tune.space import ParamSpec, TuneConfig, apply_params, parse_space

with extra_imports("tune", "Optuna tuning"):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.trial import FrozenTrial, TrialState
check("optuna_integration", "tune", "Optuna tuning")  # its pruning callback is imported per trial

#: Trial user attributes that tie a trial to its MLflow run and its process.
RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"
TRIAL_STATE_TAG = "optuna_trial_state"
#: Set in a worker's environment to the GPUs it was given (its ``CUDA_VISIBLE_DEVICES``); its trials
#: carry it as the tag :data:`WORKER_GPUS_TAG`.
WORKER_GPUS_ENV = "LIGHTNING_BATCH_WORKER_GPUS"
WORKER_GPUS_TAG = "worker_gpus"

Echo = Callable[[str], None]


@dataclass
class TuneResult:
    """What a study run reports back: the best trial, the refit's test metrics, counts by state."""

    study: str
    storage: str
    tracking_uri: str
    parent_run_id: str
    best_params: dict[str, Any]
    best_value: float | None
    best_trial: int | None
    states: dict[str, int] = field(default_factory=dict)
    retrain_run_id: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    trial_epochs: float = 0.0
    seconds: float = 0.0


# -- storage, sampler, pruner ----------------------------------------------------------------------


def resolve_storage(storage: str | None, tracking_uri: str) -> str:
    """``--storage`` or ``optuna.db`` beside the MLflow sqlite DB (``mlruns/optuna.db`` by default)."""
    if storage:
        return storage
    db = sqlite_path(tracking_uri)
    folder = db.parent if db is not None else Path("mlruns")
    return f"sqlite:///{folder / 'optuna.db'}"


class StaleTrialRetry(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, plus ending that trial's MLflow run FAILED.

    The dead worker could not close its run; whoever notices the stale heartbeat does it here.
    """

    def __init__(self, tracking_uri: str, max_retry: int | None) -> None:
        super().__init__(max_retry=max_retry)
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            with contextlib.suppress(Exception):
                from mlflow import MlflowClient

                client = MlflowClient(self.tracking_uri)
                client.set_tag(run_id, TRIAL_STATE_TAG, "FAIL")
                client.set_tag(
                    run_id,
                    "error",
                    f"worker lost: no heartbeat from pid {trial.user_attrs.get('worker_pid')} "
                    f"on {trial.user_attrs.get('worker_host')}; the trial is re-queued",
                )
                client.set_terminated(run_id, "FAILED")
        super().__call__(study, trial)


def make_storage(url: str, tracking_uri: str, options: TuneConfig) -> RDBStorage:
    """An RDB storage with heartbeat and retry of lost trials (sqlite waits on locks instead of failing)."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            # The heartbeat has been "experimental" since Optuna 2.8; it is what finds dead workers.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=options.heartbeat_interval,
                grace_period=options.grace_seconds,
                heartbeat_stale_trial_callback=StaleTrialRetry(tracking_uri, options.max_retry),
            )
    except Exception as exc:  # sqlalchemy/driver errors: a wrong URL, a server that is down
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open the Optuna storage {redact(url)}: {message}") from exc


def make_sampler(
    options: TuneConfig, space: dict[str, ParamSpec], worker: int = 0
) -> optuna.samplers.BaseSampler:
    seed = options.seed + worker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if options.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=options.startup_trials)
        if options.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=options.startup_trials)
        if options.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.GridSampler({name: spec.grid() for name, spec in space.items()}, seed=seed)


def make_pruner(options: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if options.pruner == "median":
        # Judge a trial only after its first epoch's validation: epoch 0 says little about an lr.
        return optuna.pruners.MedianPruner(n_startup_trials=options.startup_trials, n_warmup_steps=1)
    if options.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    return optuna.pruners.NopPruner()


# -- the objective ---------------------------------------------------------------------------------


def trial_config(base: RunConfig, params: dict[str, Any], **overrides: Any) -> RunConfig:
    """``base`` with run options ``overrides`` (experiment, run name, ...) and a trial's ``params``.

    A trial measures the lr the sampler chose: a blow-up fails it (``on_nan="fail"``) instead of
    rolling back at half the lr, which would train another lr under this one's name.
    """
    values = {**base.to_dict(), **overrides}
    if values.get("on_nan") == "rollback":
        values["on_nan"] = "fail"
    return apply_params(RunConfig.from_mapping(values), params)


class Objective:
    """Train one trial's configuration as a child MLflow run and return its best validation loss."""

    def __init__(
        self, base: RunConfig, space: dict[str, ParamSpec], parent_run_id: str, tracking_uri: str
    ) -> None:
        self.base = base
        self.space = space
        self.parent_run_id = parent_run_id
        self.tracking_uri = tracking_uri

    def __call__(self, trial: optuna.Trial) -> float:
        from optuna_integration import PyTorchLightningPruningCallback

        from lightning_batch.training import train

        params = {name: spec.suggest(trial) for name, spec in self.space.items()}
        cfg = trial_config(
            self.base,
            params,
            experiment=trial.study.study_name,
            run_name=f"trial-{trial.number}",
            tracking_uri=self.tracking_uri,
        )
        trial.set_user_attr("worker_pid", os.getpid())
        trial.set_user_attr("worker_host", socket.gethostname())
        trial.set_user_attr(RUN_ID_ATTR, "")  # a retried trial must not point at its predecessor's run
        retry_of = trial.storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "optuna_study": trial.study.study_name,
            "optuna_trial_number": str(trial.number),
            TRIAL_STATE_TAG: "RUNNING",
        }
        if retry_of is not None:
            tags["optuna_retry_of"] = str(retry_of)
        if os.environ.get(WORKER_GPUS_ENV):
            tags[WORKER_GPUS_TAG] = os.environ[WORKER_GPUS_ENV]
        pruning = PyTorchLightningPruningCallback(trial, monitor="val_loss")
        epochs = _EpochCounter()
        try:
            result = train(
                cfg,
                callbacks=[pruning, epochs],
                extra_tags=tags,
                evaluate_test=False,
                clean_stops=(optuna.TrialPruned,),
                log_model=False,  # the study's refit logs the model: one per study, not one per trial
                on_run_created=lambda run_id: trial.set_user_attr(RUN_ID_ATTR, run_id),
            )
            value = result.metrics.get("best_val_loss", math.nan)
            if not math.isfinite(value):
                raise FloatingPointError(f"val_loss is {value}: the trial diverged (lr {cfg.lr} too high?)")
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # Optuna records FAIL but not why: keep the reason for the report
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
            raise
        finally:
            trial.set_user_attr("epochs_run", epochs.begun)  # the study's compute, pruned or not
        return float(value)


class _EpochCounter(Callback):
    """Counts the training epochs a trial began (its compute, whether it completes or not)."""

    def __init__(self) -> None:
        self.begun = 0

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.begun += 1


# -- per-trial bookkeeping (runs in the worker, after Optuna set the state) ------------------------


class TrialReporter:
    """Prints one progress line per trial and puts the trial's final state on its MLflow run."""

    def __init__(self, tracking_uri: str, total: int, echo: Echo, worker: int = 0) -> None:
        self.tracking_uri = tracking_uri
        self.total = total
        self.echo = echo
        self.worker = worker
        self.done = 0
        self.started = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if run_id:
            with contextlib.suppress(Exception):
                from mlflow import MlflowClient

                client = MlflowClient(self.tracking_uri)
                client.set_tag(run_id, TRIAL_STATE_TAG, trial.state.name)
                if trial.state == TrialState.FAIL and client.get_run(run_id).info.status == "FINISHED":
                    # The fit finished but Optuna refused its value (NaN): the run failed too.
                    client.set_tag(
                        run_id, "error", str(trial.user_attrs.get("fail_reason", "trial failed"))[:4000]
                    )
                    client.set_terminated(run_id, "FAILED")
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        value = f"{trial.value:.5g}" if trial.value is not None else "-"
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            last = max(trial.intermediate_values)
            value = f"{trial.intermediate_values[last]:.5g} (pruned after epoch {last})"
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        if trial.state == TrialState.FAIL:
            params += f"  ({trial.user_attrs.get('fail_reason', 'failed').splitlines()[0][:200]})"
        try:
            best = f"{study.best_value:.5g} (#{study.best_trial.number})"
        except ValueError:
            best = "-"
        seconds = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else 0.0
        )
        prefix = f"[worker {self.worker}] " if self.worker else ""
        self.echo(
            f"{prefix}trial {trial.number:>3} {trial.state.name:<8} val_loss {value}  {params}  "
            f"{seconds:.1f}s  best {best}  [{self.done}/{self.total}, ETA {eta:.0f}s]"
        )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# -- study set-up, workers, summary ----------------------------------------------------------------


def open_study(base: RunConfig, options: TuneConfig, worker: int = 0) -> tuple[optuna.Study, str]:
    """The study (created or resumed by name) and its storage URL."""
    tracking_uri = resolve_tracking_uri(base.tracking_uri)
    url = resolve_storage(options.storage, tracking_uri)
    storage = make_storage(url, tracking_uri, options)
    space = parse_space(options.space)
    # Each trial gets its own progress line (TrialReporter), failures with their reason.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=options.study,
        storage=storage,
        direction="minimize",
        sampler=make_sampler(options, space, worker),
        pruner=make_pruner(options, base.epochs),
        load_if_exists=True,
    )
    return study, url


def ensure_parent_run(
    study: optuna.Study, base: RunConfig, options: TuneConfig, storage_url: str
) -> RunRecord:
    """The study's parent MLflow run, written through a :class:`RunRecord` as a fit's is: the one
    recorded on the study (claimed for this process), or a new one."""
    tracking_uri = resolve_tracking_uri(base.tracking_uri)
    open_store(tracking_uri)  # runs whose process died end FAILED ("process lost"), a lost parent too
    name = f"study-{options.study}"
    existing = study.user_attrs.get(PARENT_ATTR)
    if existing:
        with contextlib.suppress(Exception):
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri)
            claim_run(client, existing)  # this process owns the study run now
            client.update_run(existing, status="RUNNING")
            return RunRecord(tracking_uri, options.study, name, {}, run_id=str(existing))
    tags = {
        "optuna_study": options.study,
        "lightning_batch.role": "study",
        "optuna_storage": redact(storage_url),
    }
    record = RunRecord(tracking_uri, options.study, name, tags)
    study.set_user_attr(PARENT_ATTR, record.run_id)
    space = parse_space(options.space)
    search = {"space": {n: s.to_dict() for n, s in space.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "search_space.json").write_text(json.dumps(search, indent=2))
        Path(tmp, "base_config.json").write_text(json.dumps(base.to_record(), indent=2, default=str))
        record.client.log_artifacts(record.run_id, tmp)
    params = {
        "sampler": options.sampler,
        "pruner": options.pruner,
        "retrain": options.retrain,
        "data": base.data,
        "model": str(base.model),
        "epochs": base.epochs,
        "space": ",".join(space),
    }
    record.logger.log_hyperparams(params)
    return record


def _quota(trials: int, workers: int, index: int) -> int:
    """Trials worker ``index`` runs: ``trials`` split as evenly as possible."""
    return trials // workers + (1 if index < trials % workers else 0)


def run_worker(base: RunConfig, options: TuneConfig, worker: int, quota: int, echo: Echo = print) -> None:
    """Run ``quota`` trials of the study in this process."""
    from lightning_batch.training import quiet_lightning

    quiet_lightning(False)
    study, _ = open_study(base, options, worker)
    parent = study.user_attrs.get(PARENT_ATTR)
    if not parent:
        raise UserError(f"study {options.study!r} has no parent MLflow run; start it with `run.py tune`")
    tracking_uri = resolve_tracking_uri(base.tracking_uri)
    space = parse_space(options.space)
    reporter = TrialReporter(tracking_uri, quota, echo, worker)
    study.optimize(
        Objective(base, space, parent, tracking_uri),
        n_trials=quota,
        timeout=options.timeout,
        callbacks=[reporter],
        catch=(Exception,),
        gc_after_trial=True,
    )


def _worker_command(spec_path: Path, worker: int, quota: int) -> list[str]:
    return [sys.executable, "-m", "lightning_batch.tune.study", str(spec_path), str(worker), str(quota)]


def worker_environment(
    parent: Mapping[str, str],
    worker: int,
    workers: int,
    *,
    cpus: int,
    gpus: Sequence[str] = (),
    gpus_per_worker: int = 1,
) -> dict[str, str]:
    """The environment worker ``worker`` (0-based) of ``workers`` is started with.

    Each gets ``cpus // workers`` threads (at least one). Given ``gpus`` (``CUDA_VISIBLE_DEVICES``
    entries, :func:`lightning_batch.placement.visible_gpus`), worker i sees ``gpus_per_worker`` of
    them starting at entry ``i * gpus_per_worker`` mod n: with one device per trial, worker i gets
    GPU i mod n, and more workers than GPUs share them round-robin. Without ``gpus`` the parent's
    ``CUDA_VISIBLE_DEVICES`` (set or not) passes through unchanged.

    >>> env = worker_environment({}, 3, 4, cpus=8, gpus=["0", "1", "2"])
    >>> env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]
    ('0', '2')
    >>> worker_environment({}, 1, 2, cpus=16, gpus=["4", "5", "6", "7"], gpus_per_worker=2)["CUDA_VISIBLE_DEVICES"]
    '6,7'
    """
    threads = max(1, cpus // workers)
    env = {**parent, "OMP_NUM_THREADS": str(threads), "LIGHTNING_BATCH_THREADS": str(threads)}
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding lightning_batch/
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop(WORKER_GPUS_ENV, None)
    if gpus:
        count = min(max(1, gpus_per_worker), len(gpus))
        mine = [gpus[(worker * count + j) % len(gpus)] for j in range(count)]
        env["CUDA_VISIBLE_DEVICES"] = env[WORKER_GPUS_ENV] = ",".join(mine)
    return env


def worker_gpus(base: RunConfig, workers: int) -> tuple[list[str], int]:
    """The GPUs to share among ``workers`` and how many each trial needs; ``([], 1)`` off the GPU.

    GPUs are handed out only when the trials would train on them (``--accelerator auto`` or
    ``gpu`` and torch sees some). ``--devices N`` gives each worker N of them; ``--devices auto``
    (every GPU the process sees) gives each worker its share, n // K (at least one).
    """
    if base.accelerator not in ("auto", "gpu"):
        return [], 1
    gpus = hardware.visible_gpus()
    if not gpus:
        return [], 1
    devices = base.devices
    per_worker = devices if isinstance(devices, int) else max(1, len(gpus) // workers)
    return gpus, per_worker


def _run_workers(base: RunConfig, options: TuneConfig, echo: Echo) -> tuple[list[int], set[int]]:
    """Start ``options.workers`` processes, wait for all; their exit codes and pids."""
    gpus, per_worker = worker_gpus(base, options.workers)
    envs = [
        worker_environment(
            os.environ, i, options.workers, cpus=os.cpu_count() or 1, gpus=gpus, gpus_per_worker=per_worker
        )
        for i in range(options.workers)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp, "spec.json")
        spec.write_text(json.dumps({"base": base.to_dict(), "options": asdict(options)}, default=str))
        processes = [
            subprocess.Popen(
                _worker_command(spec, i + 1, _quota(options.trials, options.workers, i)), env=envs[i]
            )
            for i in range(options.workers)
        ]
        echo(f"started {len(processes)} workers: pids {', '.join(str(p.pid) for p in processes)}")
        if gpus:
            placed = ", ".join(f"{i + 1}: {env[WORKER_GPUS_ENV]}" for i, env in enumerate(envs))
            echo(f"GPUs per worker (CUDA_VISIBLE_DEVICES): {placed}")
        try:
            codes = [p.wait() for p in processes]
        except KeyboardInterrupt:
            for p in processes:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
            for p in processes:
                p.wait()
            raise
    for i, code in enumerate(codes, start=1):
        if code != 0:
            echo(f"worker {i} exited with status {code}; its unfinished trial is recovered below")
    return codes, {p.pid for p in processes}


def recover_lost_trials(
    study: optuna.Study, base: RunConfig, options: TuneConfig, echo: Echo, pids: set[int], workers_died: bool
) -> None:
    """After the workers: make good what a dead worker lost, so the study gets the trials asked for.

    A worker killed mid-trial leaves a RUNNING trial whose heartbeat goes stale; once the grace
    period is over it is failed here (which ends its MLflow run FAILED and queues a retry with the
    same parameters, see :class:`StaleTrialRetry`). Then the retries and any trials the dead
    worker never started are run in this process. Trials are counted by the pids that ran them,
    so other machines' trials on the same study never count as ours.
    """
    if workers_died:
        deadline = time.monotonic() + options.grace_seconds + options.heartbeat_interval + 5

        def ours_running() -> bool:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            return any(t.user_attrs.get("worker_pid") in pids for t in running)

        while ours_running() and time.monotonic() < deadline:
            optuna.storages.fail_stale_trials(study)
            time.sleep(1.0)
    trials = study.get_trials(deepcopy=False)
    ours = [t for t in trials if t.user_attrs.get("worker_pid") in pids and t.state.is_finished()]
    retried = {
        t.system_attrs.get("failed_trial") for t in trials if t.system_attrs.get("failed_trial") is not None
    }
    lost = [t for t in ours if t.state == TrialState.FAIL and t.number in retried]
    shortfall = options.trials - (len(ours) - len(lost))
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if options.timeout is None and shortfall > 0 or waiting:
        count = max(shortfall, waiting) if options.timeout is None else waiting
        echo(f"running {count} trial(s) here that a lost worker did not finish")
        run_worker(base, options, 0, count, echo)


def _log_study_summary(
    study: optuna.Study, parent_run_id: str, tracking_uri: str, storage_url: str
) -> dict[str, int]:
    """Best params/value, trials per state and Optuna's plots on the parent run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    counts = {s: states.get(s, 0) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    now = int(time.time() * 1000)
    metrics = [Metric(f"trials_{k.lower()}", float(v), now, 0) for k, v in counts.items()]
    metrics.append(Metric("trial_epochs", float(trial_epochs(trials)), now, 0))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        metrics.append(Metric("best_val_loss", float(best.value), now, 0))  # type: ignore[arg-type]
        client.set_tag(parent_run_id, "best_trial", str(best.number))
        for name, value in best.params.items():
            client.set_tag(parent_run_id, f"best_param.{name}", _short(value))
    client.log_batch(parent_run_id, metrics=metrics)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _study_plots(study, folder)
        summary = {
            "study": study.study_name,
            "storage": redact(storage_url),
            "states": counts,
            "best_trial": study.best_trial.number if complete else None,
            "best_value": study.best_value if complete else None,
            "best_params": study.best_params if complete else {},
            "trials": [
                {
                    "number": t.number,
                    "state": t.state.name,
                    "value": t.value,
                    "params": t.params,
                    "epochs": len(t.intermediate_values),
                    RUN_ID_ATTR: t.user_attrs.get(RUN_ID_ATTR),
                }
                for t in trials
            ],
        }
        (folder / "study_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        client.log_artifacts(parent_run_id, str(folder))
    return counts


def trial_epochs(trials: list[FrozenTrial]) -> int:
    """Compute spent, in epochs trained (begun): pruned and failed trials count what they ran.

    A trial whose worker died never recorded its count: it counts the epochs it reported plus the
    one it was in.
    """
    return sum(
        int(t.user_attrs["epochs_run"]) if "epochs_run" in t.user_attrs else len(t.intermediate_values) + 1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    )


def _study_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optuna's matplotlib plots as PNGs; a plot the trials cannot support yet is left out."""
    with extra_imports("tracking", "plotting"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    params = list(study.best_params) if any(t.state == TrialState.COMPLETE for t in study.trials) else []
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
        "slice": lambda: ovm.plot_slice(study),
        "param_importances": lambda: ovm.plot_param_importances(study),
    }
    if {"lr", "batch_size"} <= set(params):
        plots["contour_lr_batch_size"] = lambda: ovm.plot_contour(study, params=["lr", "batch_size"])
    written = []
    for name, make in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
                figure = _figure_of(axes)
                figure.set_size_inches(8, 5.5)
                figure.tight_layout()
                figure.savefig(folder / f"{name}.png", dpi=110)
            plt.close(figure)
            written.append(name)
        except Exception:  # e.g. importances need 2+ complete trials with varied params
            plt.close("all")
    return written


def _figure_of(axes: Any) -> Any:
    if hasattr(axes, "figure"):
        return axes.figure
    return axes.flat[0].figure  # an array of axes (slice, contour of several params)


def retrain_best(study: optuna.Study, base: RunConfig, options: TuneConfig, parent_run_id: str) -> Any:
    """Refit the best trial's configuration (``as-is`` or on ``train+val``) and test it once."""
    from lightning_batch.training import train

    best = study.best_trial
    cfg = trial_config(
        base,
        best.params,
        experiment=options.study,
        run_name=f"best-of-{options.study}",
        train_on_val=options.retrain == "train+val",
    )
    tags = {
        "optuna_study": options.study,
        "lightning_batch.role": "best-retrain",
        "study_parent_run_id": parent_run_id,
        "optuna_best_trial": str(best.number),
        "retrain": options.retrain,
    }
    return train(cfg, extra_tags=tags)


def tune(base: RunConfig, options: TuneConfig, echo: Echo = print) -> TuneResult:
    """Run (or resume) a study: trials as child runs, then the summary and the best config's refit."""
    from mlflow import MlflowClient

    from lightning_batch.tabular.datamodule import TabularDataModule
    from lightning_batch.training import quiet_lightning

    started = time.perf_counter()
    quiet_lightning(False)
    base = base.validate()
    options = options.validate()
    placement = hardware.resolve_placement(base)  # no GPU, bf16 unsupported, ...: one error before anything
    if placement.world_size > 1:
        # Lightning's DDP launcher would re-run the whole tuner once per device.
        raise UserError(
            f"run.py tune trains each trial on one device, got --devices {base.devices} --num-nodes {base.num_nodes}; "
            "run trials side by side instead: --workers K (worker i gets GPU i mod n)"
        )
    if base.data_cache is None:
        # A study prepares its data once: every trial, here or in a worker, reads the tables this
        # setup writes (memory-mapped) instead of reading, cleaning and scaling the source again.
        cache = data_cache.default_cache_dir(base.tracking_uri).resolve()
        base = RunConfig.from_mapping({**base.to_dict(), "data_cache": str(cache)}).validate()
    tracking_uri = resolve_tracking_uri(base.tracking_uri)
    warn_if_password(tracking_uri, "the tracking URI")
    warn_if_password(resolve_storage(options.storage, tracking_uri), "the Optuna storage")
    check_store_access(tracking_uri)  # a server refusing the credentials: one line, before any work
    TabularDataModule(base).setup()  # bad data fails here, once, before any study or run exists
    base = RunConfig.from_mapping({**base.to_dict(), "tracking_uri": tracking_uri})
    study, url = open_study(base, options)
    record = ensure_parent_run(study, base, options, url)
    parent = record.run_id
    for params in options.enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    client = MlflowClient(tracking_uri)
    try:
        echo(
            f"study {options.study!r} on {redact(url)}: {options.trials} trials, {options.workers} worker(s), "
            f"{options.sampler} sampler, {options.pruner} pruner"
        )
        pids = {os.getpid()}
        workers_died = False
        if options.workers == 1:
            run_worker(base, options, 0, options.trials, echo)
        else:
            codes, worker_pids = _run_workers(base, options, echo)
            pids |= worker_pids
            workers_died = any(code != 0 for code in codes)
        recover_lost_trials(study, base, options, echo, pids, workers_died)
        counts = _log_study_summary(study, parent, tracking_uri, url)
        result = TuneResult(
            study=options.study,
            storage=url,
            tracking_uri=tracking_uri,
            parent_run_id=parent,
            best_params={},
            best_value=None,
            best_trial=None,
            states=counts,
            trial_epochs=trial_epochs(study.get_trials(deepcopy=False)),
        )
        if counts["COMPLETE"]:
            best = study.best_trial
            result.best_params, result.best_value, result.best_trial = best.params, best.value, best.number
            if options.retrain != "none":
                echo(f"refitting trial {best.number}'s configuration ({options.retrain}) and testing it once")
                final = retrain_best(study, base, options, parent)
                result.retrain_run_id = final.run_id
                result.test_metrics = {k: v for k, v in final.metrics.items() if k.startswith("test_")}
                client.set_tag(parent, "best_retrain_run_id", final.run_id)
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                client.log_batch(
                    parent,
                    metrics=[Metric(f"best_{k}", float(v), now, 0) for k, v in result.test_metrics.items()],
                )
        result.seconds = time.perf_counter() - started
        record.logger.finalize("success")
        return result
    except BaseException as exc:
        record.fail(exc)  # FAILED with the error in a tag (KILLED for an interrupt)
        raise


def _worker_main(argv: list[str]) -> int:
    """``python -m lightning_batch.tune.study SPEC.json WORKER QUOTA``: one worker process."""
    spec_path, worker, quota = argv[0], int(argv[1]), int(argv[2])
    spec = json.loads(Path(spec_path).read_text())
    threads = os.environ.get("LIGHTNING_BATCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    base = RunConfig.from_mapping(spec["base"])
    options = TuneConfig(**spec["options"])
    run_worker(base, options, worker, quota, echo=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
