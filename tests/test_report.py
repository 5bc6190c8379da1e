"""`run.py report`: the batch-size answer read back from a run's or a study's own records."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlflow import MlflowClient

from lightning_batch.cli import main
from lightning_batch.config import RunConfig
from lightning_batch.training import train
from lightning_batch.tune.space import TuneConfig
from lightning_batch.tune.study import tune


def test_report_of_an_auto_run_prints_and_logs_its_measurements(tracking_uri: str, workdir: Path, capsys):
    result = train(
        RunConfig(
            data="synthetic-regression", rows=6000, batch_size="auto", epochs=2, tracking_uri=tracking_uri
        )
    )
    capsys.readouterr()
    assert main(["report", result.run_id, "--tracking-uri", tracking_uri]) == 0
    out = capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    gns = [m.value for m in sorted(client.get_metric_history(result.run_id, "gns"), key=lambda m: m.step)]
    gns = [g for g in gns if math.isfinite(g)]
    assert f"{gns[0]:.3g} → {gns[-1]:.3g}" in out
    decisions = json.loads(
        Path(client.download_artifacts(result.run_id, "batch_size_decisions.json", str(workdir))).read_text()
    )
    assert f"│ {decisions['probe']['ceiling']}" in out
    assert "α =" in out and "goodput-optimal batch at the end" in out
    logged = {a.path for a in client.list_artifacts(result.run_id, "report")}
    assert {"report/report.md", "report/report_noise_scale.png"} <= logged
    markdown = Path(client.download_artifacts(result.run_id, "report/report.md", str(workdir))).read_text()
    assert "critical batch size" in markdown and "![report_noise_scale.png]" in markdown


def test_report_of_a_study_compares_its_policies(tracking_uri: str, workdir: Path, capsys):
    storage = f"sqlite:///{workdir}/mlruns/optuna.db"
    base = RunConfig(data="synthetic-regression", rows=3000, features=4, epochs=2, tracking_uri=tracking_uri)
    space = {"lr": [0.05], "batch_size": [32], "policy": ["fixed", "goodput"]}
    result = tune(
        base,
        TuneConfig(
            study="pol", trials=2, storage=storage, sampler="grid", pruner="none", retrain="none", space=space
        ),
        echo=lambda line: None,
    )
    capsys.readouterr()
    assert main(["report", "pol", "--tracking-uri", tracking_uri, "--storage", storage]) == 0
    out = capsys.readouterr().out
    assert "policy fixed" in out and "policy goodput" in out and "target val loss" in out
    logged = {a.path for a in MlflowClient(tracking_uri).list_artifacts(result.parent_run_id, "report")}
    assert "report/report.md" in logged


def test_report_of_something_unknown_is_a_one_line_error(tracking_uri: str, capsys):
    assert main(["report", "no-such-thing", "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither a run id" in err[0]
