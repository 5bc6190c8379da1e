"""Optuna studies: trials ↔ MLflow child runs, workers sharing a storage, a killed worker's trial retried.

Every check reads back with Optuna's and MLflow's own clients: the storage's trials and the
tracking store's runs must agree one to one (a trial number, a child run; its state, the run's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.tune.space import DEFAULT_SPACE, TuneConfig, apply_params, parse_space
from lightning_batch.tune.study import PARENT_ATTR, RUN_ID_ATTR, _quota, redact, resolve_storage, tune

from .conftest import RUN_PY, free_port, subprocess_env, wait_for

#: A small regression problem: a trial is ~1 s of training.
SMALL = dict(data="synthetic-regression", rows=2000, features=4, epochs=3)
#: Where .ci/postgres.sh puts the test database (override with LIGHTNING_BATCH_TEST_POSTGRES).
DEFAULT_POSTGRES = "postgresql://lightning_batch:lb-pg-secret-7c2e@127.0.0.1:5432/lightning_batch_test"

RUN_STATUS_OF_TRIAL = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}


def _child_runs(tracking_uri: str, study: str) -> tuple[dict, list]:
    """(parent run, child runs) of a study's experiment, via MLflow's client."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lightning_batch.role") == "study"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def _assert_trials_match_runs(storage: str, tracking_uri: str, study_name: str, expected: int) -> list:
    """Storage and MLflow agree: one child run per trial, same number, state and status."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == expected
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(expected)), "no duplicate or missing trial numbers"
    assert not [
        t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    ]
    parent, children = _child_runs(tracking_uri, study_name)
    assert study.user_attrs[PARENT_ATTR] == parent.info.run_id
    by_number = {int(r.data.tags["optuna_trial_number"]): r for r in children}
    assert len(children) == expected and sorted(by_number) == numbers
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ID_ATTR]
        assert run.data.tags["optuna_trial_state"] == trial.state.name
        assert run.info.status == RUN_STATUS_OF_TRIAL[trial.state.name], (trial.number, trial.state)
    return trials


# -- search space ------------------------------------------------------------------------------------


def test_default_space_covers_lr_batch_and_policy():
    space = parse_space(None)
    assert set(space) == set(DEFAULT_SPACE)
    assert space["lr"].kind == "float" and space["lr"].log
    assert space["batch_size"].kind == "int" and space["batch_size"].log
    assert space["policy"].choices == ("fixed", "goodput")


def test_space_grid_and_apply_params():
    space = parse_space(
        {
            "batch_size": {"low": 8, "high": 128, "log": True},
            "dropout": {"low": 0.0, "high": 0.4, "step": 0.2},
        }
    )
    assert space["batch_size"].grid() == [8, 16, 32, 64, 128]
    assert space["dropout"].grid() == pytest.approx([0.0, 0.2, 0.4])
    cfg = apply_params(
        RunConfig(data="iris", hidden=[16, 16]), {"hidden_width": 32, "policy": "fixed", "batch_size": 8}
    )
    assert cfg.hidden == [32, 32] and cfg.batch_size == 8 and not cfg.dynamic
    dynamic = apply_params(RunConfig(data="iris"), {"policy": "goodput", "batch_size": 16})
    assert dynamic.dynamic and dynamic.resolved_policy == "goodput" and dynamic.batch_size == 16


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"lr": {"low": 0.1}}, "needs low and high"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "must be below high"),
        ({"seed": [1, 2]}, "cannot be searched"),
        ({"lr": {"low": 0.1, "high": 1, "log": True, "step": 0.1}}, "either log or step"),
        ({"hidden": {"choices": [[8], [16]]}}, "numbers or strings"),
        ({"lr": {"low": 0.1, "high": 1, "mean": 0.5}}, "unknown key"),
    ],
)
def test_bad_spaces_are_one_line_errors(raw, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_space(raw)


def test_storage_defaults_beside_the_mlflow_store_and_hides_passwords():
    assert resolve_storage(None, "sqlite:///some/where/mlflow.db") == "sqlite:///some/where/optuna.db"
    assert resolve_storage(None, "http://127.0.0.1:5000") == "sqlite:///mlruns/optuna.db"
    assert redact("postgresql://u:pw@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
    assert [_quota(8, 3, i) for i in range(3)] == [3, 3, 2]


# -- one process -------------------------------------------------------------------------------------


def test_six_trial_study_one_child_run_per_trial_with_matching_states(workdir: Path, tracking_uri: str):
    """Enqueued points make the states certain: 3 good lrs, then one that diverges (FAIL) and two so
    small that the median pruner stops them after epoch 1 (PRUNED)."""
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    base = RunConfig(**SMALL, tracking_uri=tracking_uri)
    options = TuneConfig(
        study="six",
        trials=6,
        storage=storage,
        startup_trials=3,  # the pruner judges from the 4th trial on
        space={"lr": {"low": 1e-5, "high": 1e5, "log": True}, "batch_size": [32, 64]},
        enqueue=[
            {"lr": 0.1, "batch_size": 32},
            {"lr": 0.05, "batch_size": 64},
            {"lr": 0.08, "batch_size": 32},
            {"lr": 1e4, "batch_size": 32},
            {"lr": 1e-5, "batch_size": 32},
            {"lr": 2e-5, "batch_size": 64},
        ],
    )
    lines: list[str] = []
    result = tune(base, options, echo=lines.append)

    trials = _assert_trials_match_runs(storage, tracking_uri, "six", 6)
    states = {t.number: t.state.name for t in trials}
    assert states == {0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "FAIL", 4: "PRUNED", 5: "PRUNED"}
    assert result.states["COMPLETE"] == 3 and result.states["PRUNED"] == 2 and result.states["FAIL"] == 1
    # compute: 3 complete x 3 epochs, the diverged one's first epoch, 2 pruned x 2 epochs
    assert result.trial_epochs == 3 * 3 + 1 + 2 * 2
    assert (
        sum("trial" in line and ("COMPLETE" in line or "PRUNED" in line or "FAIL" in line) for line in lines)
        == 6
    )
    assert "diverged" in next(line for line in lines if " FAIL " in line)

    client = MlflowClient(tracking_uri)
    parent, children = _child_runs(tracking_uri, "six")
    pruned = next(r for r in children if r.data.tags["optuna_trial_number"] == "4")
    assert "pruned" in pruned.data.tags["stopped"].lower() and "error" not in pruned.data.tags
    failed = next(r for r in children if r.data.tags["optuna_trial_number"] == "3")
    assert "diverged" in failed.data.tags["error"]
    # Per-step metrics as in a plain run, and no peeking at the test split during the search.
    good = next(r for r in children if r.data.tags["optuna_trial_number"] == "0")
    assert client.get_metric_history(good.info.run_id, "train_loss")
    assert not any(k.startswith("test_") for k in good.data.metrics)
    assert float(good.data.params["lr"]) == 0.1 and good.data.params["batch_size"] == "32"

    # The parent: best params and value, trials per state, Optuna's plots.
    best = min((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert result.best_trial == best.number and result.best_value == pytest.approx(best.value)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.metrics["trials_complete"] == 3 and parent.data.metrics["trials_pruned"] == 2
    assert parent.data.tags["best_param.lr"] == f"{best.params['lr']:.4g}"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    for plot in (
        "optimization_history",
        "intermediate_values",
        "slice",
        "param_importances",
        "contour_lr_batch_size",
    ):
        assert f"{plot}.png" in artifacts, artifacts
    assert "study_summary.json" in artifacts and "search_space.json" in artifacts
    assert parent.info.status == "FINISHED"

    # The refit: its own run in the study's experiment, linked to it, tested once.
    refit = client.get_run(result.retrain_run_id)
    assert refit.data.tags["study_parent_run_id"] == parent.info.run_id
    assert refit.data.tags.get("mlflow.parentRunId") is None
    assert refit.data.metrics["test_loss"] == pytest.approx(result.test_metrics["test_loss"])
    assert float(refit.data.params["lr"]) == pytest.approx(best.params["lr"])
    assert parent.data.tags["best_retrain_run_id"] == refit.info.run_id


def test_a_study_resumes_by_name_and_train_plus_val_refit(workdir: Path, tracking_uri: str):
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    base = RunConfig(**SMALL, tracking_uri=tracking_uri)
    options = TuneConfig(study="again", trials=2, storage=storage, retrain="none", sampler="random")
    first = tune(base, options, echo=lambda line: None)
    second = tune(base, dataclasses.replace(options, trials=1, retrain="train+val"), echo=lambda line: None)
    assert first.parent_run_id == second.parent_run_id
    _assert_trials_match_runs(storage, tracking_uri, "again", 3)
    refit = MlflowClient(tracking_uri).get_run(second.retrain_run_id)
    assert refit.data.params["train_on_val"] == "True"
    # train+val: the training split grew by the validation rows
    assert int(refit.data.params["n_train"]) == int(refit.data.params["n_val"]) + 1400


@pytest.mark.slow  # a full grid study: ~30 s; CI runs the slow suite after `make test`
def test_grid_sampler_walks_the_grid(workdir: Path, tracking_uri: str):
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    base = RunConfig(**{**SMALL, "epochs": 1}, tracking_uri=tracking_uri)
    space = {"lr": [0.01, 0.1], "batch_size": [32, 64]}
    result = tune(
        base,
        TuneConfig(
            study="grid",
            trials=4,
            storage=storage,
            sampler="grid",
            pruner="none",
            retrain="none",
            space=space,
        ),
        echo=lambda line: None,
    )
    study = optuna.load_study(study_name="grid", storage=storage)
    seen = {(t.params["lr"], t.params["batch_size"]) for t in study.trials}
    assert seen == {(0.01, 32), (0.01, 64), (0.1, 32), (0.1, 64)}
    assert result.states["COMPLETE"] == 4


# -- several processes ------------------------------------------------------------------------------


def _tune_cli(workdir: Path, storage: str, study: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(RUN_PY),
        "tune",
        "--data",
        "synthetic-regression",
        "--rows",
        "2000",
        "--features",
        "4",
        "--epochs",
        "2",
        "--storage",
        storage,
        "--study",
        study,
        "--tracking-uri",
        f"sqlite:///{workdir}/mlruns/mlflow.db",
        *extra,
    ]


def _two_workers_eight_trials(workdir: Path, storage: str, study: str) -> None:
    done = subprocess.run(
        _tune_cli(workdir, storage, study, "--trials", "8", "--workers", "2", "--retrain", "none"),
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started 2 workers" in done.stdout
    assert done.stdout.count("[worker 1] trial") == 4 and done.stdout.count("[worker 2] trial") == 4
    trials = _assert_trials_match_runs(storage, f"sqlite:///{workdir}/mlruns/mlflow.db", study, 8)
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2, "both workers ran trials"


@pytest.mark.slow  # the PostgreSQL test below runs the same path in the default suite
def test_two_workers_share_a_sqlite_study(workdir: Path):
    _two_workers_eight_trials(workdir, f"sqlite:///{workdir}/mlruns/optuna.db", "two-sqlite")


def _postgres_url() -> str:
    return os.environ.get("LIGHTNING_BATCH_TEST_POSTGRES", DEFAULT_POSTGRES)


def _postgres_reachable(url: str) -> str | None:
    """None when a connection works, else why not."""
    try:
        import psycopg  # SQLAlchemy 2.1's driver for postgresql:// URLs

        psycopg.connect(url, connect_timeout=3).close()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def test_two_workers_share_a_postgresql_study(workdir: Path):
    url = _postgres_url()
    why = _postgres_reachable(url)
    if why is not None:
        pytest.skip(f"no PostgreSQL at {redact(url)} ({why}); .ci/postgres.sh installs and starts one")
    _two_workers_eight_trials(workdir, url, f"two-pg-{uuid.uuid4().hex[:8]}")


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
def test_a_killed_worker_trial_fails_and_is_retried(workdir: Path):
    """SIGKILL one worker mid-trial: its trial ends FAIL (and its MLflow run FAILED) once the
    heartbeat is stale, and a trial with the same parameters runs again; nothing is left RUNNING."""
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    tracking = f"sqlite:///{workdir}/mlruns/mlflow.db"
    process = subprocess.Popen(
        [
            *_tune_cli(workdir, storage, "killed", "--trials", "6", "--workers", "2", "--retrain", "none"),
            "--heartbeat-interval",
            "1",
            "--pruner",
            "none",
            "--epochs",
            "6",
            "--rows",
            "6000",
        ],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="killed", storage=storage)
        except Exception:  # the database or the study does not exist yet
            continue
        running = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.state.name == "RUNNING" and t.user_attrs.get(RUN_ID_ATTR)
        ]
        if running:
            victim = running[0]
    assert victim is not None, "no trial started"
    os.kill(int(victim.user_attrs["worker_pid"]), signal.SIGKILL)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "exited with status -9" in output

    study = optuna.load_study(study_name="killed", storage=storage)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[victim.number].state.name == "FAIL"
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state.name == "COMPLETE" and retry.params == victim.params
    assert retry.user_attrs["worker_pid"] != victim.user_attrs["worker_pid"]
    assert not [t for t in trials.values() if t.state.name in ("RUNNING", "WAITING")]
    # 6 trials asked for, one lost and re-run: 7 trials, 7 child runs, states matching.
    _assert_trials_match_runs(storage, tracking, "killed", 7)
    lost = MlflowClient(tracking).get_run(victim.user_attrs[RUN_ID_ATTR])
    assert lost.info.status == "FAILED" and "worker lost" in lost.data.tags["error"]
    retry_run = MlflowClient(tracking).get_run(retry.user_attrs[RUN_ID_ATTR])
    assert retry_run.data.tags["optuna_retry_of"] == str(victim.number)


# -- servers -------------------------------------------------------------------------------------------


@pytest.mark.slow  # tests/test_e2e_browser.py checks the dashboard in a browser in the default suite
def test_optuna_dashboard_serves_the_study(workdir: Path, tracking_uri: str):
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    tune(
        RunConfig(**{**SMALL, "epochs": 1}, tracking_uri=tracking_uri),
        TuneConfig(study="dash", trials=2, storage=storage, retrain="none"),
        echo=lambda line: None,
    )
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from optuna_dashboard._cli import main; sys.exit(main())",
            storage,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = json.loads(wait_for(f"http://127.0.0.1:{port}/api/studies", 60))["study_summaries"]
        study = next(s for s in studies if s["study_name"] == "dash")
        detail = json.loads(wait_for(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", 30))
        assert len(detail["trials"]) == 2
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
def test_a_study_recorded_through_an_mlflow_tracking_server(workdir: Path):
    """The many-machines path: trials log to `mlflow server` over HTTP, artifacts to its destination."""
    port = free_port()
    store = workdir / "server"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        store.mkdir(exist_ok=True)
        wait_for(f"http://127.0.0.1:{port}/health", 120)
        uri = f"http://127.0.0.1:{port}"
        storage = f"sqlite:///{workdir}/optuna.db"
        result = tune(
            RunConfig(**{**SMALL, "epochs": 1}, tracking_uri=uri),
            TuneConfig(study="served", trials=2, storage=storage),
            echo=lambda line: None,
        )
        _assert_trials_match_runs(storage, uri, "served", 2)
        client = MlflowClient(uri)
        assert "loss_curves.png" in {a.path for a in client.list_artifacts(result.retrain_run_id)}
        assert list((store / "artifacts").rglob("loss_curves.png")), (
            "artifacts landed in the server's destination"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sampler_and_pruner_choices_build_optunas_own():
    from lightning_batch.tune.study import make_pruner, make_sampler

    space = parse_space(None)
    kinds = {
        name: type(make_sampler(TuneConfig(sampler=name), space)).__name__
        for name in ("tpe", "gp", "random", "grid")
    }
    assert kinds == {"tpe": "TPESampler", "gp": "GPSampler", "random": "RandomSampler", "grid": "GridSampler"}
    pruners = {
        name: type(make_pruner(TuneConfig(pruner=name), epochs=9)).__name__
        for name in ("median", "hyperband", "none")
    }
    assert pruners == {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
    # workers get different sampler seeds, so two workers do not propose the same first points
    first = [make_sampler(TuneConfig(sampler="random"), space, worker=w) for w in (1, 2)]
    study = [optuna.create_study(sampler=s) for s in first]
    assert study[0].ask().suggest_float("x", 0, 1) != study[1].ask().suggest_float("x", 0, 1)


def _suggestions(sampler: optuna.samplers.BaseSampler, trials: int) -> list[tuple[float, int]]:
    """Run ``trials`` trials of a fixed objective with ``sampler``; the points it proposed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    points = []
    for _ in range(trials):
        trial = study.ask()
        x, k = trial.suggest_float("x", -3.0, 3.0), trial.suggest_int("k", 1, 50)
        points.append((x, k))
        study.tell(trial, (x - 1.0) ** 2 + 0.01 * k)
    return points


def test_tpe_sampler_is_seeded_and_uses_the_configured_startup_trials():
    """Same seed, same proposals; the first ``startup_trials`` are the seeded random sampler's own points and
    TPE's model takes over right after them; another seed proposes other points."""
    from lightning_batch.tune.study import make_sampler

    space = parse_space(None)
    options = TuneConfig(sampler="tpe", seed=3, startup_trials=4)
    first = _suggestions(make_sampler(options, space), 7)
    assert _suggestions(make_sampler(options, space), 7) == first
    random_points = _suggestions(optuna.samplers.RandomSampler(seed=3), 7)
    assert first[:4] == random_points[:4]
    assert all(f != r for f, r in zip(first[4:], random_points[4:], strict=True))
    assert (
        _suggestions(make_sampler(TuneConfig(sampler="tpe", seed=4, startup_trials=4), space), 4) != first[:4]
    )
    # A worker's sampler is the next seed's: its startup points are those of RandomSampler(seed + worker).
    worker = _suggestions(make_sampler(options, space, worker=2), 2)
    assert worker == _suggestions(optuna.samplers.RandomSampler(seed=5), 2)


def _prunes(pruner: optuna.pruners.BasePruner, finished: int, curve: list[float]) -> list[bool]:
    """After ``finished`` complete trials that reported 1.0 at steps 0..3 (minimising), a new trial reports
    ``curve``: whether the pruner would stop it at each step."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for _ in range(finished):
        trial = study.ask()
        for step in range(4):
            trial.report(1.0, step)
        study.tell(trial, 1.0)
    trial = study.ask()
    verdicts = []
    for step, value in enumerate(curve):
        trial.report(value, step)
        verdicts.append(trial.should_prune())
    return verdicts


def test_median_pruner_waits_for_its_startup_trials_and_the_first_epoch():
    """``startup_trials`` complete trials before it judges anything, and never at step 0 (epoch 0): a trial
    worse than the median is pruned from step 1 on, a trial better than it is not."""
    from lightning_batch.tune.study import make_pruner

    pruner = make_pruner(TuneConfig(pruner="median", startup_trials=3), epochs=4)
    bad, good = [5.0, 5.0, 5.0, 5.0], [0.5, 0.5, 0.5, 0.5]
    assert _prunes(pruner, finished=3, curve=bad) == [False, True, True, True]
    assert _prunes(pruner, finished=3, curve=good) == [False, False, False, False]
    assert _prunes(pruner, finished=2, curve=bad) == [False, False, False, False]  # still in startup
    # The option is the one that takes effect: with startup_trials=1, one finished trial is enough.
    assert _prunes(make_pruner(TuneConfig(pruner="median", startup_trials=1), 4), 1, bad) == [
        False,
        True,
        True,
        True,
    ]


def test_hyperband_pruner_spans_the_epochs_and_none_never_prunes():
    """Hyperband's resources run from 1 epoch to the run's epochs in steps of 3 (9 epochs: 3 brackets, a
    bad trial is stopped at a rung, never at step 0); ``none`` lets even a terrible trial run to the end."""
    from lightning_batch.tune.study import make_pruner

    hyperband = make_pruner(TuneConfig(pruner="hyperband"), epochs=9)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", pruner=hyperband, sampler=optuna.samplers.RandomSampler(0)
    )
    for _ in range(12):
        trial = study.ask()
        for step in range(9):
            trial.report(1.0 + 0.01 * trial.number, step)
            trial.should_prune()  # Hyperband records a trial's rungs when asked
        study.tell(trial, 1.0)
    pruned_at = []
    for _ in range(6):
        trial = study.ask()
        for step in range(9):
            trial.report(100.0, step)
            if trial.should_prune():
                pruned_at.append(step)
                break
        study.tell(
            trial,
            state=optuna.trial.TrialState.PRUNED if trial.should_prune() else None,
            values=None if trial.should_prune() else 100.0,
        )
    assert hyperband._n_brackets == 3  # floor(log_3(9 / 1)) + 1
    # rungs at 1 and 3 epochs (min_resource 1, factor 3); never at step 0 nor past the last rung
    assert pruned_at and set(pruned_at) <= {1, 3}, pruned_at
    assert _prunes(make_pruner(TuneConfig(pruner="none"), epochs=9), 5, [1e9] * 4) == [False] * 4
