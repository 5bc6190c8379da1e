"""The commands behind ``python experiments/run.py``.

- no arguments: the demo (the seed's linear regression and a classification example);
- ``train``: one run from flags and/or ``--config FILE.yaml`` (flags win over the file);
- ``tune``: an Optuna study over lr and batch size (and policy); every trial a child MLflow run;
- ``ui``: the MLflow UI on 127.0.0.1 against the project's store;
- ``dashboard``: optuna-dashboard on 127.0.0.1 against the studies' storage;
- ``report``: how to choose the batch size, from a run's or a study's measurements;
- ``runs``: the store's runs and their states; ``--reap`` ends FAILED those whose process died;
- ``predict``: a run's (or registered) MLflow Model on a raw CSV/Parquet file.

Bad input prints one ``error: ...`` line and exits with status 2. Only ``experiments/run.py``
imports this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning_batch._extras import MissingExtraError, check
from lightning_batch.config import RunConfig, load_yaml_config
from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import FLAG
from lightning_batch.plugin.options import OptionInfo, default_of, option_fields
from lightning_batch.tune.space import TuneConfig, parse_space

EXIT_BAD_INPUT = 2

_DATA = ("data", ("pandas", "sklearn"))
_TRACKING = ("tracking", ("mlflow", "matplotlib", "rich"))
_TUNE = ("tune", ("optuna", "optuna_integration"))
#: What each command imports beyond torch and Lightning (extra, import names), checked before it
#: starts: a missing package is one ``error:`` line naming the extra, not a traceback mid-run.
COMMAND_EXTRAS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "demo": (_DATA, _TRACKING),
    "train": (_DATA, _TRACKING),
    "tune": (_DATA, _TRACKING, _TUNE),
    "report": (_TRACKING, _TUNE),
    "dashboard": (("tune", ("optuna", "optuna_integration", "optuna_dashboard")),),
    "ui": (("tracking", ("mlflow",)),),
    "server": (("tracking", ("mlflow", "flask_wtf")),),
    "runs": (("tracking", ("mlflow", "rich")),),
    "predict": (("data", ("pandas",)), ("tracking", ("mlflow", "rich"))),
}

#: Every character ``str.splitlines()`` breaks a line on, mapped to its escape (``\n``, ``\x85``, ...).
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(message: str) -> str:
    """``message`` with every line break escaped: an ``error:`` line is one line whatever text it quotes.

    >>> one_line("column a\\nb, c\\u2028d")
    'column a\\\\nb, c\\\\u2028d'
    """
    return message.translate(_LINE_BREAKS)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


#: The order of the help's sections.
HELP_GROUPS = ("data", "model", "optimisation", "batch size", "hardware", "tracking", "study")
#: Python's annotation -> how argparse reads the flag (the options' own checks do the rest).
_NUMBER_TYPES = {"int": int, "float": float}


def option_dest(f: dataclasses.Field[Any], info: OptionInfo) -> str:
    """argparse's name for a declared option: the field's, or its own flag's where the flag is renamed.

    ``tune``'s ``--study-seed`` (``TuneConfig.seed``) is ``study_seed``, so it cannot overwrite the
    run's ``--seed`` on the same command line.
    """
    return info.flag.removeprefix("--").replace("-", "_") if info.flag else f.name


def _argparse_kwargs(f: dataclasses.Field[Any], info: OptionInfo) -> dict[str, Any]:
    """How argparse reads the flag of a declared option, from its annotation, default and help."""
    annotation = str(f.type).replace(" ", "")
    kinds = [part for part in annotation.split("|") if part != "None"]
    kwargs: dict[str, Any] = {"dest": option_dest(f, info)}
    if kinds == ["bool"]:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif annotation.startswith(("list[", "tuple[")):
        kwargs["nargs"] = "+"
        item = annotation.split("[", 1)[1].split(",")[0].rstrip("]")
        if item in _NUMBER_TYPES:
            kwargs["type"] = _NUMBER_TYPES[item]
    elif len(kinds) == 1 and kinds[0] in _NUMBER_TYPES:
        kwargs["type"] = _NUMBER_TYPES[kinds[0]]
    names = info.names()
    if names:
        kwargs["metavar"] = "|".join(names)
    default = default_of(f)
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
    kwargs["help"] = info.help.replace("%", "%%") + (
        f" (default {shown})" if shown not in (None, "", ()) and kinds != ["bool"] else ""
    )
    return kwargs


def add_option_flags(parser: argparse.ArgumentParser, options: Any) -> None:
    """One flag per declared option of dataclass ``options`` (``--adjust-every``), in its help group."""
    declared = [(f, info) for f, info in option_fields(options) if info.cli]
    order = [g for g in HELP_GROUPS if any(info.group == g for _, info in declared)]
    groups = {name: parser.add_argument_group(name) for name in order}
    for f, info in declared:
        group = groups.get(info.group) or groups.setdefault(info.group, parser.add_argument_group(info.group))
        group.add_argument(info.flag or FLAG.name(f.name), **_argparse_kwargs(f, info))


def _train_arguments(parser: argparse.ArgumentParser, resumable: bool = True) -> None:
    """The run options (from their declarations, defaults from RunConfig) and the command's own flags."""
    add_option_flags(parser, RunConfig)
    parser.add_argument(
        "--register",
        metavar="NAME",
        help="register the run's model (tune: the refit's) as a version of NAME in MLflow's Model Registry; "
        "alias champion moves to it when its val loss beats the holder's",
    )
    parser.add_argument("--config", dest="config_file", metavar="FILE.yaml", help="options from a YAML file")
    if resumable:
        parser.add_argument(
            "--resume",
            metavar="RUN_ID",
            help="continue a stopped run from its last checkpoint, on the same MLflow run (the id, its first "
            "8+ characters, or the path of its last.ckpt)",
        )
    parser.add_argument("--verbose", action="store_true", help="show Lightning's own messages")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="progress bar with batch size, lr and noise scale (default: on in a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="run.py", description="lightning-batch: train, record in MLflow, compare batch sizes."
    )
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = commands.add_parser("train", help="train one configuration", argument_default=argparse.SUPPRESS)
    _train_arguments(train)
    tune = commands.add_parser(
        "tune", help="Optuna study over lr and batch size", argument_default=argparse.SUPPRESS
    )
    _train_arguments(tune, resumable=False)
    add_option_flags(tune, TuneConfig)
    tune.add_argument("--space", metavar="FILE.yaml", help="search space (default: lr, batch_size, policy)")
    report = commands.add_parser("report", help="batch-size report of a run (id) or a study (name)")
    report.add_argument(
        "target", metavar="RUN_ID_OR_STUDY", help="a run id (or its first 8+ characters) or a study"
    )
    report.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    report.add_argument(
        "--storage", help="Optuna storage of the study (default: optuna.db beside the MLflow store)"
    )
    dashboard = commands.add_parser("dashboard", help="start optuna-dashboard on 127.0.0.1")
    dashboard.add_argument(
        "--storage", help="Optuna storage URL (default: optuna.db beside the MLflow store)"
    )
    dashboard.add_argument("--tracking-uri", help="only to find the default storage")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)"
    )
    _runs_arguments(
        commands.add_parser("runs", help="list runs and their states; --reap ends lost ones FAILED")
    )
    predict = commands.add_parser("predict", help="predict a CSV/Parquet file with a run's MLflow Model")
    predict.add_argument(
        "model",
        metavar="RUN_ID_OR_MODEL_URI",
        help="a run id (or its first 8+ characters), models:/NAME@champion, models:/NAME/VERSION, runs:/RUN_ID/model or a model folder",
    )
    predict.add_argument("--data", required=True, metavar="FILE", help="raw rows: a .csv or .parquet file")
    predict.add_argument(
        "--output", metavar="FILE", help="predictions to this .csv/.parquet (default: stdout)"
    )
    predict.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")
    server = commands.add_parser(
        "server",
        help="the team's MLflow tracking server: users sign in, artifacts served, 127.0.0.1 by default",
    )
    server.add_argument(
        "--tracking-uri",
        metavar="STORE",
        help="the store it serves: sqlite:///mlruns/mlflow.db (default) or postgresql://USER@HOST/DB "
        "(the password from PGPASSWORD or ~/.pgpass, never the URL)",
    )
    server.add_argument("--port", type=int, default=5000)
    server.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for other machines)"
    )
    server.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="the server's worker processes (default: MLflow's, 4; ~250 MB each)",
    )
    server.add_argument(
        "--insecure",
        action="store_true",
        help="no sign-in (a lab's choice); refused unless --host is loopback",
    )
    server.add_argument(
        "--add-user",
        metavar="NAME",
        help="create a user (password from the prompt or stdin) instead of serving",
    )
    ui = commands.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--tracking-uri")
    ui.add_argument(
        "--experiment",
        help="the experiment whose runs the printed URL opens (default: that of the newest run)",
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    return parser


def _runs_arguments(parser: argparse.ArgumentParser) -> None:
    from lightning_batch.tracking.run_owners import RUN_STATES

    parser.add_argument(
        "--experiment",
        action="append",
        metavar="NAME",
        help="only this experiment (or study); repeat for several (default: all)",
    )
    parser.add_argument("--status", choices=RUN_STATES, help="only runs in this state")
    parser.add_argument("--limit", type=int, default=50, help="newest N runs (default 50)")
    parser.add_argument(
        "--reap",
        action="store_true",
        help="first end FAILED the RUNNING runs whose process on this host is gone "
        "(train and tune do this at start)",
    )
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig defaults, then the YAML file, then the flags given on the command line."""
    given = dict(vars(args))
    for key in ("command", "config_file", "verbose", "progress", "resume", "register", *TUNE_FLAGS):
        given.pop(key, None)
    values: dict[str, Any] = {}
    config_file = getattr(args, "config_file", None)
    if config_file:
        from_file = load_yaml_config(config_file)
        RunConfig.from_mapping(from_file, origin=repr(config_file))  # unknown keys are reported here
        values.update({str(k).replace("-", "_"): v for k, v in from_file.items()})
    values.update(given)
    return RunConfig.from_mapping(values, origin="flags").validate()


#: ``tune`` flags that are study options, not run options: argparse's name -> the TuneConfig field.
TUNE_FLAGS = {option_dest(f, info): f.name for f, info in option_fields(TuneConfig) if info.cli} | {
    "space": "space"
}


def tune_config_from_args(args: argparse.Namespace) -> TuneConfig:
    """Study options from the flags; ``--space`` is read from its YAML file (a ``space:`` key or the mapping)."""
    values = {name: getattr(args, dest) for dest, name in TUNE_FLAGS.items() if hasattr(args, dest)}
    if "space" in values:
        raw = load_yaml_config(values["space"])
        values["space"] = raw.get("space", raw) if isinstance(raw, dict) else raw
        parse_space(values["space"], origin=repr(str(args.space)))  # errors name the file
    return TuneConfig(**values).validate()


def _print_tune_summary(result: Any) -> None:
    from rich.table import Table

    from lightning_batch.store_uri import redact

    console = _console()
    table = Table(title=f"study {result.study}")
    table.add_column("")
    table.add_column("value")
    for name, value in result.best_params.items():
        table.add_row(f"best {name}", f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row(
        "best val loss",
        f"{result.best_value:.5g}" if result.best_value is not None else "- (no trial completed)",
    )
    table.add_row("best trial", str(result.best_trial))
    for name, value in sorted(result.test_metrics.items()):
        table.add_row(f"refit {name}", f"{value:.5g}")
    table.add_row("trials", ", ".join(f"{n} {s.lower()}" for s, n in result.states.items() if n))
    table.add_row("compute", f"{result.trial_epochs} trial-epochs, {result.seconds:.1f} s")
    table.add_row("MLflow study run", result.parent_run_id)
    if result.retrain_run_id:
        table.add_row("MLflow refit run", result.retrain_run_id)
    console.print(table)
    console.print(
        "Open the MLflow UI:      [bold]python experiments/run.py ui"
        + (
            f" --tracking-uri {shlex.quote(redact(result.tracking_uri))}"
            if result.tracking_uri != "sqlite:///mlruns/mlflow.db"
            else ""
        )
        + "[/bold]\n"
        + "Open optuna-dashboard:  [bold]python experiments/run.py dashboard"
        + (
            f" --storage {shlex.quote(redact(result.storage))}"
            if result.storage != "sqlite:///mlruns/optuna.db"
            else ""
        )
        + "[/bold]",
        soft_wrap=True,
    )


#: A run id is what users copy next (``--resume``, ``report``, ``predict``): it never wraps, and the
#: other columns shrink or fold around it.
RUN_ID_COLUMN: dict[str, Any] = {"no_wrap": True, "min_width": 32, "overflow": "ignore"}


def _console(stderr: bool = False) -> Any:
    """A rich console as wide as the terminal (or ``$COLUMNS``); 160 columns when output is piped."""
    from rich.console import Console

    piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS", "").isdigit()
    return Console(stderr=stderr, width=160 if piped else None)


def _print_summary(results: Sequence[Any]) -> None:
    from rich.table import Table

    from lightning_batch.store_uri import redact

    table = Table(title="lightning-batch runs")
    for column in (
        "dataset",
        "model",
        "batch size",
        "epochs",
        "val loss",
        "test loss",
        "test metric",
        "seconds",
    ):
        table.add_column(column)
    table.add_column("MLflow run id", **RUN_ID_COLUMN)
    for r in results:
        metric = (
            f"acc {r.metrics['test_acc']:.3f}"
            if "test_acc" in r.metrics
            else f"rmse {r.metrics.get('test_rmse', 0):.4g}, r² {r.metrics.get('test_r2', math.nan):.3f}"
            + (" ⚠ worse than the mean" if r.poor_fit else "")
        )
        sizes = (
            f"{r.batch_size_start}"
            if r.batch_size_start == r.batch_size_end == r.batch_size_max
            else f"{r.batch_size_start} → {r.batch_size_end} (max {r.batch_size_max})"
        )
        table.add_row(
            r.dataset,
            r.model,
            sizes,
            str(r.epochs),
            f"{r.metrics['best_val_loss']:.4f}",
            f"{r.metrics['test_loss']:.4f}",
            metric,
            f"{r.seconds:.1f}",
            r.run_id,
        )
    console = _console()
    console.print(table)
    if any(r.target_scaled for r in results):
        console.print("Regression losses are in the standardised target's units; rmse and r² in its own.")
    uri = results[0].tracking_uri if results else ""
    console.print(
        (
            # A tracking server is its own UI.
            f"Open the MLflow UI:  {redact(uri)}"
            if uri.startswith(("http://", "https://"))
            else "Open the MLflow UI:  [bold]python experiments/run.py ui[/bold]"
            + (
                f" --tracking-uri {shlex.quote(redact(uri))}"
                if uri and uri != "sqlite:///mlruns/mlflow.db"
                else ""
            )
            + f"\n   (or: mlflow ui --backend-store-uri {shlex.quote(redact(uri))} --host 127.0.0.1)"
        ),
        soft_wrap=True,
    )


DEMO_RUNS: tuple[dict[str, Any], ...] = (
    # The seed: y = w·x + b + noise, mini-batch SGD at B=32, lr=0.01 ...
    dict(
        data="synthetic-regression",
        rows=50_000,
        features=16,
        noise=0.5,
        correlation=0.5,
        model="linear",
        batch_size=32,
        lr=0.01,
        epochs=4,
        experiment="demo",
        run_name="seed-fixed-32",
    ),
    # ... and the same problem with the batch size left to the run (goodput policy, AdaScale lr).
    dict(
        data="synthetic-regression",
        rows=50_000,
        features=16,
        noise=0.5,
        correlation=0.5,
        model="linear",
        batch_size="auto",
        lr=0.01,
        epochs=4,
        experiment="demo",
        run_name="seed-auto",
    ),
    # Classification: 8×8 digit images as 64 tabular features, an MLP with Adam, batch size auto; the
    # lr found by the range test and the length by early stopping (the defaults).
    dict(
        data="digits",
        model="mlp",
        hidden=[64],
        optimizer="adam",
        batch_size="auto",
        experiment="demo",
        run_name="digits-mlp-auto",
    ),
    # The same images through a small CNN (conv layers: the noise scale's micro-batch fallback); at
    # most 20 epochs to keep the demo short.
    dict(
        data="digits",
        model="cnn",
        batch_size="auto",
        epochs=20,
        experiment="demo",
        run_name="digits-cnn-auto",
    ),
)


def run_demo(tracking_uri: str | None = None) -> int:
    from lightning_batch.training import train

    results = []
    for options in DEMO_RUNS:
        cfg = RunConfig.from_mapping({**options, "tracking_uri": tracking_uri}).validate()
        results.append(train(cfg))
    _print_summary(results)
    return 0


def _resume_run_id(value: str | None, tracking_uri: str | None) -> str | None:
    """``--resume`` takes a run id, a unique prefix of one (8 characters or more) among the runs with
    checkpoints, or the path of its ``last.ckpt`` (``.../checkpoints/RUN_ID/last.ckpt``)."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise UserError(f"checkpoint not found: {value!r}; pass the run id or the path of its last.ckpt")
        return path.resolve().parent.name
    from lightning_batch.store_uri import resolve_tracking_uri
    from lightning_batch.tracking.run_ids import resolve_checkpointed_run_id
    from lightning_batch.tracking.run_record import checkpoint_dir

    checkpoints = checkpoint_dir(resolve_tracking_uri(tracking_uri), "")
    return resolve_checkpointed_run_id(checkpoints, value)


def run_train(args: argparse.Namespace) -> int:
    from lightning_batch.training import train

    cfg = config_from_args(args)
    register = _register_name(args)
    result = train(
        cfg,
        progress_bar=getattr(args, "progress", None),
        verbose=getattr(args, "verbose", False),
        resume_run_id=_resume_run_id(getattr(args, "resume", None), cfg.tracking_uri),
    )
    if result.rank == 0:  # under DDP every rank returns here; the run is rank 0's to report
        _print_summary([result])
        if register:
            from lightning_batch.tracking.model_registry import register_run

            print(register_run(result.tracking_uri, register, result.run_id).describe(), flush=True)
    return 0


def _register_name(args: argparse.Namespace) -> str | None:
    """``--register NAME``, checked before anything trains."""
    name = getattr(args, "register", None)
    if name is None:
        return None
    from lightning_batch.tracking.model_registry import check_model_name

    return check_model_name(name)


def run_tune(args: argparse.Namespace) -> int:
    from lightning_batch.tune.study import tune

    cfg = config_from_args(args)
    options = tune_config_from_args(args)
    register = _register_name(args)
    if register and options.retrain == "none":
        raise UserError(
            "--register registers the study's refit, and --retrain none skips it; drop one of them"
        )
    result = tune(cfg, options, echo=lambda line: print(line, flush=True))
    _print_tune_summary(result)
    if register:
        if not result.retrain_run_id:
            print(f"nothing registered as {register!r}: no trial completed, so nothing was refit", flush=True)
            return 0
        from lightning_batch.tracking.model_registry import register_run

        # A refit on train+val has seen the validation rows: the best trial's held-out loss judges it.
        held_out = options.retrain == "train+val" and result.best_value is not None
        registration = register_run(
            result.tracking_uri,
            register,
            result.retrain_run_id,
            val_loss=result.best_value if held_out else None,
            tags={
                "study": result.study,
                "study_run_id": result.parent_run_id,
                "best_trial": str(result.best_trial),
                **({"metric_source": f"best trial {result.best_trial}'s val_loss"} if held_out else {}),
            },
        )
        print(registration.describe(), flush=True)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    """``run.py predict``: predictions to ``--output`` (or stdout), a summary of what was read."""
    import mlflow  # noqa: F401  -- it sets up its loggers on import: quiet them after that
    from rich.table import Table

    from lightning_batch.store_uri import resolve_tracking_uri  # not tracking: no Lightning import
    from lightning_batch.tracking.prediction import check_output_path, predict_file, write_predictions

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    check_output_path(args.output)
    result = predict_file(args.model, args.data, resolve_tracking_uri(args.tracking_uri))
    if args.output:
        write_predictions(result.frame, args.output)
    else:
        result.frame.to_csv(sys.stdout, index=False)
    table = Table(title="predictions")
    table.add_column("")
    table.add_column("value", overflow="fold")
    table.add_row("model", result.model_uri)
    table.add_row("task", result.task)
    table.add_row("rows", str(len(result.frame)))
    table.add_row("columns used", f"{len(result.used)}: " + ", ".join(result.used))
    if result.ignored:
        table.add_row("ignored (not model inputs)", f"{len(result.ignored)}: " + ", ".join(result.ignored))
    table.add_row("empty cells imputed", str(result.imputed))
    table.add_row("output", args.output or "stdout")
    # With the predictions on stdout, the summary goes to stderr so that a pipe gets only the table.
    console = _console(stderr=not args.output)
    console.print(table)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lightning_batch.store_uri import resolve_tracking_uri
    from lightning_batch.tracking.report import make_report
    from lightning_batch.tune.study import resolve_storage

    uri = resolve_tracking_uri(args.tracking_uri)
    title, rows, logged_to = make_report(args.target, uri, resolve_storage(args.storage, uri))
    table = Table(title=title)
    table.add_column("")
    table.add_column("measured")
    for name, value in rows:
        table.add_row(name, value)
    console = _console()
    console.print(table)
    console.print(f"logged as report/report.md on MLflow run {logged_to}")
    return 0


def run_runs(args: argparse.Namespace) -> int:
    """``run.py runs``: a table of the newest runs with their state and owner; ``--reap`` first."""
    from mlflow import MlflowClient
    from rich.table import Table

    from lightning_batch.store_uri import resolve_tracking_uri, sqlite_path  # not tracking: no Lightning
    from lightning_batch.tracking import run_owners

    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    uri = resolve_tracking_uri(args.tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # reading must not create a store
        raise UserError(
            f"no runs yet: {str(db)!r} does not exist; run `run.py train` first or pass --tracking-uri"
        )
    client = MlflowClient(uri)
    names = run_owners.experiment_names(client)
    ids = list(names)
    if args.experiment:
        by_name = {name: eid for eid, name in names.items()}
        unknown = [n for n in args.experiment if n not in by_name]
        if unknown:
            known = ", ".join(sorted(by_name)[:20]) or "none"
            raise UserError(f"no experiment named {unknown[0]!r} in {uri}; known: {known}")
        ids = [by_name[n] for n in args.experiment]
    reaped = run_owners.reap_lost_runs(client, ids) if args.reap else []
    runs, more = run_owners.list_runs(client, ids, args.status, args.limit)

    console = _console()
    # Below 120 columns the table keeps what identifies a run (id, name, state, start) and leaves
    # out experiment, owner and note, which would otherwise fold into a column of fragments.
    wide = console.width >= 120
    table = Table(title=f"runs in {uri}")
    table.add_column("run id", **RUN_ID_COLUMN)
    for column in ("experiment", "name", "state", "started", "owner", "note"):
        if wide or column in ("name", "state", "started"):
            table.add_column(column, overflow="fold", no_wrap=column == "started")
    style = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}
    lost = []
    for run in runs:
        owner = run_owners.Owner.from_tags(run.data.tags)
        state = run.info.status
        liveness = owner.state() if owner is not None and state == "RUNNING" else None
        if liveness == "gone":
            lost.append(run.info.run_id)
        started = time.strftime(
            "%Y-%m-%d %H:%M" if wide else "%m-%d %H:%M", time.localtime(run.info.start_time / 1000)
        )
        cells = {
            "experiment": names.get(run.info.experiment_id, run.info.experiment_id),
            "name": run.info.run_name or "",
            "state": f"[{style.get(state, '')}]{state}[/]"
            + (" (process lost)" if liveness == "gone" else ""),
            "started": started,
            "owner": (str(owner) + (f", {liveness}" if liveness else "")) if owner else "-",
            "note": run.data.tags.get(run_owners.ERROR_TAG, "").split("\n")[0][:300],
        }
        table.add_row(run.info.run_id, *(cells[c.header] for c in table.columns[1:]))  # type: ignore[index]
    console.print(table)
    if not wide:
        console.print("(experiment, owner and note need 120 columns)")
    if more:
        console.print(f"(the newest {args.limit}; --limit N shows more)")
    if reaped:
        ended = ", ".join(r.info.run_id for r in reaped)
        console.print(f"marked FAILED (process lost): {ended}; `run.py train --resume RUN_ID` continues one")
    elif lost:
        console.print(
            f"{len(lost)} RUNNING run(s) whose process on this host is gone: "
            "`run.py runs --reap` marks them FAILED (train and tune do so at start)"
        )
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from lightning_batch.store_uri import redact, resolve_tracking_uri
    from lightning_batch.tune.study import resolve_storage

    storage = resolve_storage(args.storage, resolve_tracking_uri(args.tracking_uri))
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no studies yet: {storage!r} does not exist; run `run.py tune` first or pass --storage"
        )
    command = [
        sys.executable,
        "-c",
        "import sys; from optuna_dashboard._cli import main; sys.exit(main())",
        storage,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(
        f"optuna-dashboard for {redact(storage)} on http://{args.host}:{args.port}  (Ctrl-C stops it)",
        flush=True,
    )
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def training_runs_url(tracking_uri: str, host: str, port: int, experiment: str | None = None) -> str:
    """The MLflow UI's page of an experiment's training runs, in its Model training view.

    MLflow 3 keeps the GenAI / Model training toggle in the browser's local storage and starts on
    GenAI (Traces, Judges, "Evaluation runs" around a training run; mlflow/mlflow#24498). The
    ``workflowType`` query parameter overrides that for the page it opens. The experiment is
    ``experiment`` (a name), else that of the newest run, else none (the experiments list).
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from lightning_batch.store_uri import redact

    client = MlflowClient(tracking_uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(
                f"no experiment named {experiment!r} in {redact(tracking_uri)}; `run.py runs` lists them"
            )
        experiment_id: str | None = found.experiment_id
    else:
        experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        newest = (
            client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
            if experiments
            else []
        )
        experiment_id = newest[0].info.experiment_id if newest else None
    # A browser cannot open the wildcard address a server binds.
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/#/experiments"
    page = f"{base}/{experiment_id}/runs" if experiment_id is not None else base
    return f"{page}?workflowType=machine_learning"


def run_server_command(args: argparse.Namespace) -> int:
    """``run.py server``: serve the store with sign-in, or ``--add-user NAME``."""
    from lightning_batch.store_uri import resolve_tracking_uri, warn_if_password
    from lightning_batch.tracking.server import add_user, read_new_password, run_server

    store = args.tracking_uri or resolve_tracking_uri(None)
    if store.startswith(("http://", "https://")):
        raise UserError(
            f"the server serves a store, not another server: --tracking-uri {store!r} is one; pass "
            "sqlite:///PATH or postgresql://USER@HOST/DB (or unset MLFLOW_TRACKING_URI)"
        )
    warn_if_password(store, "--tracking-uri")
    if args.add_user:
        add_user(store, args.add_user, read_new_password(args.add_user))
        print(
            f"user {args.add_user!r} added; they set MLFLOW_TRACKING_USERNAME={args.add_user} and "
            "MLFLOW_TRACKING_PASSWORD in their environment",
            flush=True,
        )
        return 0
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    return run_server(store, args.host, args.port, args.insecure, args.workers)


def run_ui(args: argparse.Namespace) -> int:
    from lightning_batch.store_uri import resolve_tracking_uri
    from lightning_batch.tracking.store import ensure_store

    uri = resolve_tracking_uri(args.tracking_uri)
    ensure_store(uri)
    url = training_runs_url(uri, args.host, args.port, args.experiment)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI, training runs: {url}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def _rank_prefix() -> str:
    """``"rank N: "`` in a DDP process other than global rank 0 (each rank reports its own error), else ``""``.

    The rank is Lightning's (``rank_zero_only.rank``), set once ``train`` knows the placement; this
    module does not import Lightning for it.
    """
    if "lightning.pytorch" not in sys.modules:
        return ""
    from lightning.pytorch.utilities import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    return f"rank {rank}: " if rank else ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        for extra, modules in COMMAND_EXTRAS.get(args.command or "demo", ()):
            check(modules, extra, f"run.py {args.command or '(the demo)'}")
        if args.command is None:
            return run_demo(os.environ.get("MLFLOW_TRACKING_URI"))
        if args.command == "train":
            return run_train(args)
        if args.command == "tune":
            return run_tune(args)
        if args.command == "report":
            return run_report(args)
        if args.command == "dashboard":
            return run_dashboard(args)
        if args.command == "ui":
            return run_ui(args)
        if args.command == "server":
            return run_server_command(args)
        if args.command == "runs":
            return run_runs(args)
        if args.command == "predict":
            return run_predict(args)
        raise UserError(f"unknown command {args.command!r}")
    except (UserError, MissingExtraError) as exc:
        print(f"error: {_rank_prefix()}{one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MemoryError, FloatingPointError) as exc:
        # The run existed and is marked FAILED (error tag); the user needs the reason, not a traceback.
        message = one_line(" ".join(str(exc).split()))
        prefix = _rank_prefix()
        where = "" if prefix else " (the run is marked FAILED in MLflow)"  # by rank 0, not this rank
        print(f"error: {prefix}{message}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the run was marked KILLED in MLflow", file=sys.stderr)
        return 130


def run() -> None:
    """The ``lightning-batch`` console script (``[project.scripts]``): :func:`main`, its status the exit code."""
    sys.exit(main())
