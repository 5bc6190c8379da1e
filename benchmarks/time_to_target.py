"""Time to a target validation loss: fixed batch sizes, Lightning's BatchSizeFinder and this project's
policies, side by side in one process.

Tasks:

- ``regression``: the seed's linear model on y = w·x + b + noise with correlated features
  (100k rows, d=32, noise 0.5, AR(1) correlation 0.5); target: a validation MSE within 0.2% of the
  closed-form least-squares solution's (fit on the training split).
- ``classification``: a 10-class synthetic problem with an MLP (64-64); target: 1.10 × the lowest
  validation cross-entropy that any fixed (B, lr) grid run reaches within the budget.
- ``digits-cnn``: scikit-learn's 8×8 digits (1,257 training images) with the CNN (32-64 channels);
  target as for classification. Its convolutions are measured by the micro-batch fallback.

Methods, every one from the same seed, on the same data, with SGD:

- ``grid B=…, lr=…``: fixed batch sizes × learning rates, run first; the fastest is the oracle;
- ``seed``: the seed's configuration, B=32, lr=0.01;
- ``BatchSizeFinder``: Lightning's ``BatchSizeFinder(mode="power")`` from B=32 with ``lr0`` (it
  doubles the batch until memory or the data runs out; it does not touch the lr);
- ``memory``, ``noise``, ``goodput`` (= ``--batch-size auto``), ``schedule``: DynamicBatchSize from
  B0=32 with ``lr0``, lr rule AdaScale.

``lr0`` is the learning rate a user would have tuned at B=32: the grid's fastest at B=32. That is
the premise of AdaScale and Pollux (lr tuned at a base batch, then scaled with the batch).

The clock runs from ``on_fit_start`` (so BatchSizeFinder's search and the memory probe count) and
pauses while the benchmark itself evaluates the validation loss (every tenth of an epoch of rows).
A run stops at the target or at the time budget.

    python benchmarks/time_to_target.py [--task regression classification digits-cnn] [--budget 30] [--json PATH]

The JSON file keeps the reports of tasks not run this time, so one task can be rerun alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import training_only_trainer  # noqa: E402
from lightning.pytorch.callbacks import BatchSizeFinder, Callback  # noqa: E402

from lightning_batch.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.data import TabularDataModule  # noqa: E402
from lightning_batch.training import build_module, build_resizer, quiet_lightning  # noqa: E402

TASKS: dict[str, dict[str, Any]] = {
    "regression": dict(
        data="synthetic-regression", rows=100_000, features=32, noise=0.5, correlation=0.5, model="linear"
    ),
    "classification": dict(
        data="synthetic-classification", rows=100_000, features=20, classes=10, model="mlp", hidden=[64, 64]
    ),
    "digits-cnn": dict(data="digits", model="cnn", channels=[32, 64]),
}
SEED = dict(batch_size=32, lr=0.01)
GRID_BATCHES = (32, 256, 2048)
GRID_LRS = (0.01, 0.03, 0.1, 0.3)
POLICIES = ("memory", "noise", "goodput", "schedule")
#: The classification target: this much above the lowest validation loss any grid run reaches.
TARGET_SLACK = 1.10


class TimeToTarget(Callback):
    """Records (seconds, samples, val loss) every tenth of an epoch; stops at the target or the budget."""

    def __init__(
        self, x_val: torch.Tensor, y_val: torch.Tensor, target: float | None, budget_s: float
    ) -> None:
        self.x_val, self.y_val = x_val, y_val
        self.target = target
        self.budget_s = budget_s
        self.points: list[tuple[float, int, float]] = []
        self.paused = 0.0
        self.rows = 0
        self.next_eval = 0
        self.started = 0.0

    def on_fit_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows += len(batch[0])
        if self.rows < self.next_eval:
            if self.elapsed() > self.budget_s:
                trainer.should_stop = True
            return
        pause = time.perf_counter()
        seconds = self.elapsed()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            loss = float(pl_module.loss(pl_module(self.x_val), self.y_val))
        pl_module.train(was_training)
        self.points.append((seconds, self.rows, loss))
        epoch_rows = len(trainer.datamodule.train_set)
        self.next_eval = self.rows + max(1, epoch_rows // 10)
        self.paused += time.perf_counter() - pause
        if (
            (self.target is not None and loss <= self.target)
            or seconds > self.budget_s
            or not math.isfinite(loss)
        ):
            trainer.should_stop = True


def run_method(task: dict[str, Any], method: dict[str, Any], target: float | None, budget_s: float) -> dict:
    cfg = RunConfig(**task, **method["config"], epochs=10_000, seed=0).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    pl.seed_everything(0, verbose=False)
    module = build_module(cfg, dm)
    clock = TimeToTarget(dm.val_set.features, dm.val_set.targets, target, budget_s)
    callbacks: list[Callback] = [clock]
    if method.get("finder"):
        callbacks.append(BatchSizeFinder(mode="power", init_val=cfg.batch_size, steps_per_trial=3))
    if cfg.dynamic:
        callbacks.append(build_resizer(cfg))
    with tempfile.TemporaryDirectory() as root:
        trainer = training_only_trainer(max_epochs=cfg.epochs, callbacks=callbacks, default_root_dir=root)
        trainer.fit(module, datamodule=dm)
    resizer = next((c for c in callbacks if isinstance(c, DynamicBatchSize)), None)
    sizes = [
        dm.initial_batch_size(),
        int(dm.batch_size),
        *(d["to"] for d in (resizer.decisions if resizer else [])),
    ]
    return {
        "method": method["name"],
        "points": clock.points,
        "final_batch": int(dm.batch_size),
        "max_batch": max(sizes),
    }


def least_squares_val_mse(task: dict[str, Any]) -> float:
    dm = TabularDataModule(RunConfig(**task, seed=0).validate())
    dm.setup()
    x, y = dm.train_set.features.double().numpy(), dm.train_set.targets.double().numpy().ravel()
    design = np.hstack([x, np.ones((len(x), 1))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    xv, yv = dm.val_set.features.double().numpy(), dm.val_set.targets.double().numpy().ravel()
    return float(np.mean((np.hstack([xv, np.ones((len(xv), 1))]) @ solution - yv) ** 2))


def first_reach(points: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    for seconds, rows, loss in points:
        if loss <= target:
            return seconds, rows
    return None


def thin_points(report: dict[str, Any], keep: int = 200) -> None:
    """Keep at most ``keep`` evenly spaced (seconds, samples, loss) points per run, always with the
    first one at the target: the curves stay plottable and the JSON stays small (a run can record
    over 1,000 evaluations). The summary figures are computed before thinning."""
    for result in report["results"]:
        points = result["points"]
        if len(points) <= keep:
            continue
        chosen = set(range(0, len(points), math.ceil(len(points) / keep))) | {len(points) - 1}
        reach = next((i for i, p in enumerate(points) if p[2] <= report["target"]), None)
        if reach is not None:
            chosen.add(reach)
        result["points"] = [points[i] for i in sorted(chosen)]


def grid_methods() -> list[dict[str, Any]]:
    return [
        {"name": f"grid B={batch}, lr={lr}", "config": dict(batch_size=batch, lr=lr), "grid": True}
        for batch in GRID_BATCHES
        for lr in GRID_LRS
    ]


def other_methods(lr0: float) -> list[dict[str, Any]]:
    """The seed as written, then BatchSizeFinder and each policy from B0=32 with ``lr0``."""
    out: list[dict[str, Any]] = [
        {"name": "seed (B=32, lr=0.01)", "config": dict(SEED)},
        {"name": f"BatchSizeFinder (lr={lr0})", "config": dict(batch_size=32, lr=lr0), "finder": True},
    ]
    for policy in POLICIES:
        extra: dict[str, Any] = {"milestones": [1, 2, 3, 4, 6, 8]} if policy == "schedule" else {}
        name = "auto (goodput)" if policy == "goodput" else f"policy {policy}"
        out.append({"name": name, "config": dict(batch_size=32, lr=lr0, policy=policy, **extra)})
    return out


def run_task(name: str, budget_s: float) -> dict[str, Any]:
    task = TASKS[name]
    target = least_squares_val_mse(task) * 1.002 if name == "regression" else None
    results: list[dict[str, Any]] = []

    def run(method: dict[str, Any]) -> None:
        result = run_method(task, method, target, budget_s)
        result["grid"] = bool(method.get("grid"))
        results.append(result)
        print(f"  {name:<14} {method['name']:<28} {len(result['points']):>4} evaluations", flush=True)

    for method in grid_methods():
        run(method)
    if target is None:  # classification: a level the best fixed run reaches (10% above its best)
        target = min(p[2] for r in results for p in r["points"]) * TARGET_SLACK
    # The dynamic methods start from B0=32 with the lr a user would have tuned there: the grid's best at B=32.
    at_base = [r for r in results if r["method"].startswith("grid B=32,")]
    best_base = min(  # the fastest to the target; if none gets there, the lowest loss reached
        at_base,
        key=lambda r: (
            (first_reach(r["points"], target) or (math.inf, 0))[0],
            min(p[2] for p in r["points"]),
        ),
    )
    lr0 = float(best_base["method"].split("lr=")[1])
    for method in other_methods(lr0):
        run(method)
    for r in results:
        reach = first_reach(r["points"], target)
        r["reached"] = reach is not None
        r["seconds"], r["samples"] = reach if reach else (None, None)
    oracle = min((r for r in results if r["grid"] and r["reached"]), key=lambda r: r["seconds"])
    seed = next(r for r in results if r["method"].startswith("seed"))
    for r in results:
        r["vs_oracle"] = r["seconds"] / oracle["seconds"] if r["reached"] else None
        r["seed_vs_this"] = (seed["seconds"] / r["seconds"]) if (r["reached"] and seed["reached"]) else None
    results.sort(key=lambda r: r["grid"])  # the table lists the methods first, then the grid
    return {
        "task": name,
        "target": target,
        "budget_s": budget_s,
        "oracle": oracle["method"],
        "lr0": lr0,
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['task']}: target val loss {report['target']:.5f}; budget {report['budget_s']:.0f} s; "
        f"oracle = {report['oracle']}"
    )
    print(f"{'method':<28} {'reached':>7} {'seconds':>8} {'samples':>10} {'× oracle':>9} {'max batch':>9}")
    for r in report["results"]:
        if r["grid"] and r["method"] != report["oracle"]:
            continue
        seconds = f"{r['seconds']:.2f}" if r["reached"] else f">{report['budget_s']:.0f}"
        samples = f"{r['samples']:,}" if r["reached"] else "-"
        ratio = f"{r['vs_oracle']:.2f}" if r["vs_oracle"] else "-"
        print(
            f"{r['method']:<28} {'yes' if r['reached'] else 'no':>7} {seconds:>8} {samples:>10} {ratio:>9} "
            f"{r['max_batch']:>9}"
        )
    grid = [r for r in report["results"] if r["grid"]]
    reached = sum(r["reached"] for r in grid)
    print(f"(grid: {reached}/{len(grid)} fixed (B, lr) runs reached the target; the fastest is the oracle)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--budget", type=float, default=30.0, help="seconds per run")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "time_to_target.json"
    )
    args = parser.parse_args()
    quiet_lightning()
    reports = [run_task(name, args.budget) for name in args.task]
    for report in reports:
        print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.json.read_text()) if args.json.exists() else []
    reports = [r for r in kept if r["task"] not in args.task] + reports
    for report in reports:
        thin_points(report)
    args.json.write_text(json.dumps(reports, indent=2))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
