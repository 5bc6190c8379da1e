""" "How do I choose a batch size?" answered with a run's or a study's own measurements.

For a run: the critical batch size (gradient noise scale, McCandlish et al.) over training, the
memory ceiling the probe found, the throughput model t(B) = α + β·B fitted to the logged step
rates, and the batch size that maximises goodput under that model at the end of training. For a
study: each batch policy's best validation loss and the wall time its trials took to reach a
common target. Printed as a table and logged back to the run (the study's parent run) as
``report.md`` with its charts.

Examples:
    >>> r = RunReport(run_id="abc", samples=[0, 100], noise_scale=[10.0, 40.0], batch_size=[32, 64],
    ...               ceiling=4096, alpha=1e-3, beta=1e-5, goodput_batch=64, base_batch=32)
    >>> r.rows()[0]
    ('critical batch size (gns), start → end', '10 → 40')
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_batch._extras import extra_imports
from lightning_batch.errors import UserError
from lightning_batch.store_uri import redact
from lightning_batch.tracking.run_ids import resolve_run_id

# MLflow draws a download bar per artifact; a report reads two small files.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from lightning_batch.plugin.policy import BatchGrid, ThroughputModel, goodput_argmax


@dataclass
class RunReport:
    """A run's batch-size facts (``None`` where the run did not measure them)."""

    run_id: str
    samples: list[float]
    noise_scale: list[float]
    batch_size: list[float]
    ceiling: int | None
    alpha: float | None
    beta: float | None
    goodput_batch: int | None
    base_batch: int
    probe: dict[str, Any] | None = None

    def rows(self) -> list[tuple[str, str]]:
        out = []
        gns = [g for g in self.noise_scale if math.isfinite(g)]
        if gns:
            q = np.quantile(gns, [0.25, 0.5, 0.75])
            out.append(("critical batch size (gns), start → end", f"{gns[0]:.3g} → {gns[-1]:.3g}"))
            out.append(("critical batch size quartiles", f"{q[0]:.3g} / {q[1]:.3g} / {q[2]:.3g}"))
        else:
            out.append(
                ("critical batch size (gns)", "not measured (a fixed-batch run; use --batch-size auto)")
            )
        if self.batch_size:
            out.append(
                (
                    "batch size used, start → end (max)",
                    f"{self.batch_size[0]:.0f} → {self.batch_size[-1]:.0f} ({max(self.batch_size):.0f})",
                )
            )
        out.append(
            ("memory ceiling (largest batch that fits)", str(self.ceiling) if self.ceiling else "not probed")
        )
        if self.probe:
            out.append(
                (
                    "memory probe",
                    f"{self.probe.get('trials', '?')} trial steps, predicted {self.probe.get('predicted_bytes', '?')} B, verified {self.probe.get('verified_bytes', '?')} B",
                )
            )
        if self.alpha is not None and self.beta is not None:
            out.append(
                (
                    "step time model t(B) = α + β·B",
                    f"α = {self.alpha * 1e3:.3g} ms, β = {self.beta * 1e6:.3g} µs/row",
                )
            )
            if self.beta > 0:
                out.append(("batch where fixed cost = per-row cost (α/β)", f"{self.alpha / self.beta:.0f}"))
        else:
            out.append(("step time model", "needs step times at 2 batch sizes"))
        out.append(
            ("goodput-optimal batch at the end", str(self.goodput_batch) if self.goodput_batch else "-")
        )
        return out


@dataclass
class StudyReport:
    """Per policy: trials, best val loss, and seconds its fastest trial took to reach the target."""

    study: str
    target: float
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        out = [("target val loss (1.1 × the study's best)", f"{self.target:.5g}")]
        for policy, facts in sorted(self.policies.items()):
            reach = facts["seconds_to_target"]
            out.append(
                (
                    f"policy {policy}",
                    f"{facts['trials']} trials, best val loss {facts['best']:.5g}, "
                    + (f"target reached in {reach:.1f} s" if reach is not None else "target not reached"),
                )
            )
        return out


def _history(client: Any, run_id: str, key: str) -> list[Any]:
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


def report_of_run(client: Any, run_id: str) -> RunReport:
    """Read a run's batch-size metrics and artifacts back from MLflow."""
    run = client.get_run(run_id)
    params = run.data.params
    gns = _history(client, run_id, "gns")
    sizes = _history(client, run_id, "batch_size")
    samples = {m.step: m.value for m in _history(client, run_id, "samples_seen")}
    throughput = {m.step: m.value for m in _history(client, run_id, "throughput")}
    decisions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "batch_size_decisions.json", tmp)
            decisions = json.loads(Path(path).read_text())
        except Exception:  # a fixed-batch run has no decisions
            decisions = {}
    probe = decisions.get("probe") or None
    ceiling = probe.get("ceiling") if probe else None
    model = ThroughputModel(window=10_000, max_sizes=64)
    by_step = {m.step: m.value for m in sizes}
    for step, rate in throughput.items():
        b = by_step.get(step)
        if b and rate and math.isfinite(rate) and rate > 0:
            model.observe(int(b), b / rate)
    alpha = beta = None
    if model.is_fitted:
        alpha, beta = model.coefficients  # type: ignore[misc]
    base = int(float(params.get("base_batch", 32)))
    goodput_batch = None
    final_gns = next((m.value for m in reversed(gns) if math.isfinite(m.value)), None)
    if alpha is not None and beta is not None and final_gns is not None:
        hi = int(ceiling) if ceiling else int(float(params.get("n_train", 0)) or 0) or None
        grid = BatchGrid(lo=max(1, int(float(params.get("min_batch", 1)))), hi=hi, multiple=8)
        goodput_batch = goodput_argmax(alpha, beta, final_gns, base, grid)
    return RunReport(
        run_id=run_id,
        samples=[samples.get(m.step, float(m.step)) for m in gns],
        noise_scale=[m.value for m in gns],
        batch_size=[m.value for m in sizes],
        ceiling=int(ceiling) if ceiling else None,
        alpha=alpha,
        beta=beta,
        goodput_batch=goodput_batch,
        base_batch=base,
        probe=probe,
    )


def report_of_study(client: Any, study: Any) -> StudyReport:
    """Compare the policies a study tried, from its trials' child runs."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError(f"study {study.study_name!r} has no complete trial to report on")
    target = min(t.value for t in complete) * 1.1
    report = StudyReport(study=study.study_name, target=target)
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id or trial.state.name not in ("COMPLETE", "PRUNED"):
            continue
        policy = str(trial.params.get("policy", "fixed"))
        facts = report.policies.setdefault(policy, {"trials": 0, "best": math.inf, "seconds_to_target": None})
        facts["trials"] += 1
        if trial.value is not None:
            facts["best"] = min(facts["best"], trial.value)
        run = client.get_run(run_id)
        for metric in _history(client, run_id, "val_loss"):
            if metric.value <= target:
                seconds = (metric.timestamp - run.info.start_time) / 1000
                best = facts["seconds_to_target"]
                facts["seconds_to_target"] = seconds if best is None else min(best, seconds)
                break
    return report


def plot_noise_scale(report: RunReport, path: Path) -> None:
    """Critical batch size and the batch size used, against samples seen."""
    with extra_imports("tracking", "plotting"):
        import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    axis.plot(report.samples, report.noise_scale, label="critical batch size (gns)")
    if report.ceiling:
        axis.axhline(report.ceiling, color="grey", linestyle="--", label="memory ceiling")
    if report.goodput_batch:
        axis.axhline(report.goodput_batch, color="green", linestyle=":", label="goodput-optimal batch (end)")
    axis.set_xlabel("samples seen")
    axis.set_ylabel("batch size")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title("How large a batch is worth it")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def to_markdown(title: str, rows: list[tuple[str, str]], images: list[str]) -> str:
    lines = [f"# {title}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def make_report(target: str, tracking_uri: str, storage: str) -> tuple[str, list[tuple[str, str]], str]:
    """(title, rows, run id it was logged to) for a run id or a study name; logs ``report.md`` + PNGs."""
    with extra_imports("tracking", "the batch-size report"):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    target = resolve_run_id(client, target, redact(tracking_uri))
    run_exists = True
    try:
        client.get_run(target)
    except MlflowException:
        run_exists = False
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images: list[str] = []
        if run_exists:
            report = report_of_run(client, target)
            rows, title, log_to = report.rows(), f"Batch-size report for run {target}", target
            if any(math.isfinite(g) for g in report.noise_scale):
                plot_noise_scale(report, folder / "report_noise_scale.png")
                images.append("report_noise_scale.png")
        else:
            with extra_imports("tune", "a study's report"):
                import optuna

            try:
                study = optuna.load_study(study_name=target, storage=storage)
            except Exception as exc:
                raise UserError(
                    f"{target!r} is neither a run id in {tracking_uri} nor a study in {storage}; "
                    "pass a run id from the MLflow UI or a --study name"
                ) from exc
            log_to = str(study.user_attrs.get("mlflow_parent_run_id") or "")
            if not log_to:
                raise UserError(f"study {target!r} has no MLflow parent run to report on")
            report_s = report_of_study(client, study)
            rows, title = report_s.rows(), f"Batch-size report for study {target}"
        (folder / "report.md").write_text(to_markdown(title, rows, images))
        client.log_artifacts(log_to, str(folder), "report")
    return title, rows, log_to
