"""Time to a target validation loss: the seed's plain PyTorch loop and this project (fixed batch sizes,
Lightning's BatchSizeFinder, each batch policy) side by side in one process, over several seeds.

Tasks (the data are the same in every seed: generated and split with seed 0):

- ``regression``: the seed's linear model on y = w·x + b + noise with correlated features
  (100k rows, d=32, noise 0.5, AR(1) correlation 0.5); target: a validation MSE within 0.2% of the
  closed-form least-squares solution's (fit on the training split).
- ``classification``: a 10-class synthetic problem with an MLP (64-64); target: val cross-entropy
  0.1843.
- ``digits-cnn``: scikit-learn's 8×8 digits (1,257 training images) with the CNN (32-64 channels);
  target: val cross-entropy 0.0656. Its convolutions are measured by the micro-batch fallback.

The two classification targets are fixed numbers: 1.10 × the lowest validation loss that any of
the 12 fixed (B, lr) runs of the grid below reached in 25 s in the last benchmark that derived them
from its own grid (commit 9dfb199). A target derived anew in each invocation moved with the
machine's load and needed every grid run to use its whole budget; a fixed one lets the grid race
(below) and makes invocations comparable. The report gives the lowest loss any run reached, so a
target that has become too easy or out of reach shows.

Methods, all with SGD on the same tensors (the TabularDataModule's train split):

- ``plain grid B=…, lr=…``: the seed's plain loop (``benchmarks/_common.plain_loop``) at
  every (B, lr) of the grid, the network built by the project's ``build_module``; the fastest to
  the target is the **plain-loop oracle**;
- ``grid B=…, lr=…``: this project at a fixed batch, the same grid; the fastest is the
  **Lightning oracle**;
- ``seed (B=32, lr=0.01)``: the seed's configuration in this project;
- ``BatchSizeFinder``: Lightning's ``BatchSizeFinder(mode="power")`` from B=32 with ``lr0`` (it
  doubles the batch until memory or the data runs out; it does not touch the lr);
- ``memory``, ``noise``, ``goodput`` (= ``--batch-size auto``), ``schedule``: DynamicBatchSize from
  B0=32 with ``lr0``, lr rule AdaScale.

``lr0`` is the learning rate a user would have tuned at B=32: the Lightning grid's fastest at B=32
in the first seed (if none reaches the target, the one with the lowest validation loss within the
budget); the same ``lr0`` serves every seed.

Seeds: seed ``s`` sets the model's initial weights (``seed_everything(s)`` before the network is
built) and the shuffling (permutation ``s + epoch``); the data stay fixed. At equal (B, lr, s) the
plain loop and the project start from the same weights and walk the same rows in the same order,
so they should need the same samples to the target (the report's ``paired`` check); the seconds
differ by what the framework costs. Each method runs once per seed; the report gives the number of
seeds that reached the target and the medians of seconds and of samples, a seed that missed
counting as +inf (so the median is "not reached" when most seeds missed). An oracle is the fastest
grid configuration of each seed (chosen in hindsight, seed by seed), its median over seeds.

The clock (``benchmarks/_common.TargetClock``, the same for both loops) runs from the start of
training (for the project: the callbacks' ``setup``, so BatchSizeFinder's search and the memory
probe count; before this version the finder's search ran before the clock started) and pauses
while the benchmark evaluates the validation loss, every tenth of an epoch of rows. A run stops at
the target, at a non-finite loss, or at its cap. BatchSizeFinder's search costs seconds on a CPU
whatever the model: Lightning calls ``gc.collect()`` after each trial (0.3–0.7 s each in a process
that has imported MLflow and Lightning).

The grids race. The plain grid runs in turns: the run with the least time on its clock trains to
its next evaluation while the others wait with their clocks still; the first to reach the target
caps every other at its time (past it, none can be that seed's oracle), so the race costs about
grid size × the oracle's time whatever the order. A Lightning fit cannot wait its turn, so the
project's grid runs one configuration after another, in the order of the plain race of the same
seed (fastest first, then by lowest loss), each capped at the fastest time to target an earlier
one set. Runs stopped at a rival's time say so (``pruned``). The exceptions: the first seed's B=32
row races only within itself (it sets ``lr0``), the seed configuration runs to its budget (as the
``seed`` method, and stands for its grid cell), and the plain loop at each seed's Lightning
oracle configuration is rerun uncapped if the race pruned it, for the ``paired`` check.

Grid and budgets (chosen to keep all three tasks × 3 seeds near 20 minutes on a 2-core CPU):
B ∈ {32, 256, 2048} × lr ∈ {0.01, 0.03, 0.1, 0.3}; budget per run 10 s (regression, digits-cnn)
and 20 s (classification, whose oracle took ~12 s). ``--budget`` sets one budget for all tasks.

    .venv/bin/python benchmarks/time_to_target.py                    # all tasks, 3 seeds, the JSON
    .venv/bin/python benchmarks/time_to_target.py --task regression --seeds 1 --json /tmp/r.json
    .venv/bin/python benchmarks/time_to_target.py --quick --task regression   # smoke, ~15 s

``--quick`` runs a 2×2 grid (B ∈ {32, 2048} × lr ∈ {0.01, 0.1}), a 0.5 s budget, 1 seed and at
most 2 BatchSizeFinder trials, and writes no JSON unless ``--json`` is given. Otherwise the results
go to ``benchmarks/results/time_to_target.json``, which keeps the reports of tasks not run this
time. ``--threads N`` sets torch's intra-op threads for both loops: on a machine shared with other
work, torch's default two threads wait on each other (a 65-step B=2048 plain run took 0.2 s on one
thread and 1.3 s on two here, with other processes on the cores); the report records the count.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import Point, TargetClock, plain_loop, training_only_trainer  # noqa: E402
from lightning.pytorch.callbacks import BatchSizeFinder, Callback  # noqa: E402
from torch import nn  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.plugin.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.tabular.datamodule import TabularDataModule  # noqa: E402
from lightning_batch.tabular.tables import PreparedData
from lightning_batch.tabular.task_module import NonFiniteLossError  # noqa: E402
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
#: Fixed targets (see the module docstring); regression's comes from least squares.
TARGETS: dict[str, float] = {"classification": 0.1843, "digits-cnn": 0.0656}
#: Seconds per run. Classification's Lightning oracle needed ~12 s; the others' under 1.5 s.
BUDGETS: dict[str, float] = {"regression": 10.0, "classification": 20.0, "digits-cnn": 10.0}
SEED = dict(batch_size=32, lr=0.01)
POLICIES = ("memory", "noise", "goodput", "schedule")
#: Evaluations kept per run in the JSON (a run can record over 1,000); oracles and methods only.
KEEP_POINTS = 100
#: Records a finished run (and prints its line); returns it.
Log = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Plan:
    """What one invocation runs: the grid, the seeds, and the budget (``None``: per task)."""

    batches: tuple[int, ...] = (32, 256, 2048)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    seeds: int = 3
    budget_s: float | None = None
    #: BatchSizeFinder's ``max_trials`` (Lightning's default 25). Each trial ends in a gc.collect()
    #: that costs ~0.3-0.7 s in this process, whatever the budget: the smoke run caps it.
    finder_trials: int = 25

    def budget(self, task: str) -> float:
        return self.budget_s if self.budget_s is not None else BUDGETS[task]

    def grid(self) -> list[tuple[int, float]]:
        return [(batch, lr) for batch in self.batches for lr in self.lrs]


QUICK = Plan(batches=(32, 2048), lrs=(0.01, 0.1), seeds=1, budget_s=0.5, finder_trials=2)


@dataclass
class TaskData:
    """A task's data, prepared once and shared read-only by every run (preparing costs ~0.5 s)."""

    name: str
    config: RunConfig
    prepared: PreparedData
    target: float

    def datamodule(self, seed: int, **options: Any) -> TabularDataModule:
        """A fresh module over the shared tables; ``seed`` reaches only its sampler's shuffling (the
        tables were generated and split with seed 0, and setup() prepares only when none are there).

        The seed goes through the config, not onto a sampler made here: a sampler that exists when
        BatchSizeFinder saves its checkpoint has its batch size saved too, and the finder's restore
        would put B=32 back."""
        dm = TabularDataModule(self.config, seed=seed, **options)
        dm.prepared = self.prepared
        dm.setup()
        return dm


@functools.cache  # a task's tables are read-only: one invocation (or test session) prepares them once
def load_task(name: str) -> TaskData:
    # The raw target and no early stopping: the plain loop it is compared with has neither.
    config = RunConfig(**TASKS[name], epochs=10_000, seed=0, scale_target=False, patience=0).validate()
    dm = TabularDataModule(config)
    dm.setup()
    assert dm.prepared is not None
    target = least_squares_val_mse(dm) * 1.002 if name == "regression" else TARGETS[name]
    return TaskData(name, dm.config, dm.prepared, target)


def least_squares_val_mse(dm: TabularDataModule) -> float:
    x, y = dm.train_set.features.double().numpy(), dm.train_set.targets.double().numpy().ravel()
    design = np.hstack([x, np.ones((len(x), 1))])
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    xv, yv = dm.val_set.features.double().numpy(), dm.val_set.targets.double().numpy().ravel()
    return float(np.mean((np.hstack([xv, np.ones((len(xv), 1))]) @ solution - yv) ** 2))


class TimeToTarget(Callback):
    """Drives a :class:`TargetClock` from a Lightning fit: the clock starts at the callbacks' ``setup``.

    Not at ``on_fit_start``: Lightning moves BatchSizeFinder to the front of the callbacks, so its
    whole search (which runs in its ``on_fit_start``, with trial steps this callback never sees)
    would be over before the clock started.
    """

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, clock: TargetClock) -> None:
        self.x_val, self.y_val = x_val, y_val
        self.clock = clock

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.clock.start()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        def val_loss() -> float:
            was_training = pl_module.training
            pl_module.eval()
            with torch.no_grad():
                loss = float(pl_module.loss(pl_module(self.x_val), self.y_val))
            pl_module.train(was_training)
            return loss

        if self.clock.after_step(len(batch[0]), val_loss):
            trainer.should_stop = True


def outcome(
    method: str, framework: str, seed: int, clock: TargetClock, budget_s: float, **extra: Any
) -> dict[str, Any]:
    """One run's record: where it first reached the target, and whether a rival's time cut it short."""
    reach = first_reach(clock.points, clock.target)
    return {
        "method": method,
        "framework": framework,
        "seed": seed,
        "reached": reach is not None,
        "seconds": reach[0] if reach else None,
        "samples": reach[1] if reach else None,
        # None when no evaluation was finite (a run that diverged at once): the JSON stays strict.
        "lowest_loss": min((p[2] for p in clock.points if math.isfinite(p[2])), default=None),
        "cap_s": clock.budget_s,
        "pruned": reach is None and clock.budget_s < budget_s,
        "points": clock.points,
        **extra,
    }


def run_lightning(
    data: TaskData, method: dict[str, Any], seed: int, cap_s: float, budget_s: float, finder_trials: int = 25
) -> dict[str, Any]:
    dm = data.datamodule(seed, **method["config"])
    cfg = dm.config
    pl.seed_everything(seed, verbose=False)  # the initial weights
    module = build_module(cfg, dm)
    clock = TargetClock(len(dm.train_set), data.target, cap_s)
    callbacks: list[Callback] = [TimeToTarget(dm.val_set.features, dm.val_set.targets, clock)]
    if method.get("finder"):
        callbacks.append(
            BatchSizeFinder(
                mode="power", init_val=cfg.batch_size, steps_per_trial=3, max_trials=finder_trials
            )
        )
    if cfg.dynamic:
        callbacks.append(build_resizer(cfg))
    diverged = False
    with tempfile.TemporaryDirectory() as root:
        trainer = training_only_trainer(max_epochs=cfg.epochs, callbacks=callbacks, default_root_dir=root)
        try:
            trainer.fit(module, datamodule=dm)
        except NonFiniteLossError:  # on_nan="fail": the run ends where the plain loop's would
            diverged = True
    resizer = next((c for c in callbacks if isinstance(c, DynamicBatchSize)), None)
    sizes = [
        dm.initial_batch_size(),
        int(dm.batch_size),
        *(d["to"] for d in (resizer.decisions if resizer else [])),
    ]
    return outcome(
        method["name"],
        "lightning",
        seed,
        clock,
        budget_s,
        grid=bool(method.get("grid")),
        batch_size=method.get("batch_size"),
        lr=cfg.lr,
        diverged=diverged,
        final_batch=int(dm.batch_size),
        max_batch=max(sizes),
    )


@dataclass
class PlainRun:
    """A plain-loop run that advances one evaluation at a time, its clock still in between."""

    batch_size: int
    lr: float
    seed: int
    clock: TargetClock
    steps: Generator[None, None, bool]
    rows_per_step: int
    diverged: bool = False

    def advance(self) -> bool:
        """Train to the next evaluation; True when the run is over (stopped by its clock or diverged)."""
        if self.clock.elapsed() > self.clock.budget_s:  # a rival's time, set while this one waited
            self.steps.close()
            return True
        try:
            next(self.steps)
        except StopIteration as stop:
            self.diverged = bool(stop.value)
            return True
        return False

    def outcome(self, budget_s: float) -> dict[str, Any]:
        return outcome(
            grid_name(self.batch_size, self.lr, "plain"),
            "plain",
            self.seed,
            self.clock,
            budget_s,
            grid=True,
            batch_size=self.batch_size,
            lr=self.lr,
            diverged=self.diverged,
            final_batch=self.rows_per_step,
            max_batch=self.rows_per_step,
        )


def start_plain(data: TaskData, batch_size: int, lr: float, seed: int, cap_s: float) -> PlainRun:
    dm = data.datamodule(seed, batch_size=batch_size, lr=lr)
    pl.seed_everything(seed, verbose=False)
    # The project's own network, from the same seed: the same architecture and initial weights.
    model = build_module(dm.config, dm).model
    criterion = nn.MSELoss() if dm.task == "regression" else nn.CrossEntropyLoss()
    clock = TargetClock(len(dm.train_set), data.target, cap_s)
    steps = plain_loop(
        model,
        criterion,
        (dm.train_set.features, dm.train_set.targets),
        (dm.val_set.features, dm.val_set.targets),
        batch_size=batch_size,
        lr=lr,
        shuffle_seed=seed,
        clock=clock,
    )
    return PlainRun(batch_size, lr, seed, clock, steps, min(batch_size, len(dm.train_set)))


def run_plain(
    data: TaskData, batch_size: int, lr: float, seed: int, cap_s: float, budget_s: float
) -> dict[str, Any]:
    """One plain-loop run alone, to the target or ``cap_s``."""
    run = start_plain(data, batch_size, lr, seed, cap_s)
    while not run.advance():
        pass
    return run.outcome(budget_s)


def first_reach(points: list[Point], target: float | None) -> tuple[float, int] | None:
    for seconds, rows, loss in points:
        if target is not None and loss <= target:
            return seconds, rows
    return None


def grid_name(batch_size: int, lr: float, framework: str) -> str:
    return f"{'plain ' if framework == 'plain' else ''}grid B={batch_size}, lr={lr}"


def grid_method(batch_size: int, lr: float) -> dict[str, Any]:
    return {
        "name": grid_name(batch_size, lr, "lightning"),
        "config": dict(batch_size=batch_size, lr=lr),
        "grid": True,
        "batch_size": batch_size,
    }


def other_methods(lr0: float) -> list[dict[str, Any]]:
    """BatchSizeFinder and each policy from B0=32 with ``lr0`` (the seed configuration runs apart)."""
    out: list[dict[str, Any]] = [
        {"name": f"BatchSizeFinder (lr={lr0})", "config": dict(batch_size=32, lr=lr0), "finder": True},
    ]
    for policy in POLICIES:
        extra: dict[str, Any] = {"milestones": [1, 2, 3, 4, 6, 8]} if policy == "schedule" else {}
        name = "auto (goodput)" if policy == "goodput" else f"policy {policy}"
        out.append({"name": name, "config": dict(batch_size=32, lr=lr0, policy=policy, **extra)})
    return out


def progress(run: dict[str, Any]) -> tuple[float, float]:
    """How far a run got: its time to target, else the lowest loss it reached (smaller is better)."""
    lowest = run["lowest_loss"]
    return (run["seconds"] if run["reached"] else math.inf, math.inf if lowest is None else lowest)


def race_order(runs: Sequence[dict[str, Any]]) -> list[tuple[int, float]]:
    """Configurations, likeliest oracle first: by time to target, then by the lowest loss reached."""
    ranked = sorted(runs, key=progress)
    return [(r["batch_size"], r["lr"]) for r in ranked]


def race_cap(rivals: Sequence[dict[str, Any]], budget_s: float) -> float:
    """A grid run that takes longer than a rival already took cannot be the oracle: stop it there."""
    return min([budget_s, *(r["seconds"] for r in rivals if r["reached"])])


def plain_grid(data: TaskData, plan: Plan, seed: int, log: Log) -> dict[tuple[int, float], dict[str, Any]]:
    """The plain grid, raced in turns: the run with the least time on its clock trains to its next
    evaluation while the others wait with their clocks still. The first to reach the target caps
    every other at its time, so the race costs about (grid size × the oracle's time) whatever the
    order, and every loser stops at the same clock time, its lowest loss comparable to the others'."""
    budget_s = plan.budget(data.name)
    running = [start_plain(data, batch, lr, seed, budget_s) for batch, lr in plan.grid()]
    done: dict[tuple[int, float], dict[str, Any]] = {}
    while running:
        run = min(running, key=lambda r: r.clock.elapsed())
        if run.advance():
            running.remove(run)
            result = done[run.batch_size, run.lr] = log(run.outcome(budget_s))
            if result["reached"]:
                for rival in running:
                    rival.clock.budget_s = min(rival.clock.budget_s, result["seconds"])
    return done


def lightning_grid(
    data: TaskData,
    plan: Plan,
    seed: int,
    order: list[tuple[int, float]],
    seed_run: dict[str, Any],
    sets_lr0: bool,
    log: Log,
) -> dict[tuple[int, float], dict[str, Any]]:
    """The project's grid, raced. ``seed_run`` (the seed configuration, run to its budget) stands for
    its grid cell. With ``sets_lr0`` the B=32 row races only within itself: it picks ``lr0``."""
    budget_s = plan.budget(data.name)
    base = SEED["batch_size"]
    done: dict[tuple[int, float], dict[str, Any]] = {}
    if (SEED["batch_size"], SEED["lr"]) in plan.grid():
        done[SEED["batch_size"], SEED["lr"]] = seed_run
    for batch, lr in order:
        if (batch, lr) in done:
            continue
        rivals = [r for (b, _), r in done.items() if not (sets_lr0 and batch == base) or b == base]
        cap = race_cap(rivals, budget_s)
        done[batch, lr] = log(run_lightning(data, grid_method(batch, lr), seed, cap, budget_s))
    return done


def pick_lr0(grid: dict[tuple[int, float], dict[str, Any]]) -> float:
    """The B=32 row's fastest to the target; if none gets there, the one with the lowest loss."""
    base = [r for (batch, _), r in grid.items() if batch == SEED["batch_size"]]
    best = min(base, key=progress)
    return float(best["lr"])


def oracle_of(grid: dict[tuple[int, float], dict[str, Any]]) -> dict[str, Any] | None:
    reached = [r for r in grid.values() if r["reached"]]
    return min(reached, key=lambda r: r["seconds"]) if reached else None


def paired(lightning: dict[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    """The same (B, lr, seed) in both loops: the same SGD steps, so the same losses at the same rows."""
    ours = {rows: loss for _, rows, loss in lightning["points"]}
    common = [(loss, ours[rows]) for _, rows, loss in plain["points"] if rows in ours]
    gaps = [abs(p - o) / max(abs(o), 1e-12) for p, o in common if math.isfinite(p) and math.isfinite(o)]
    both = lightning["reached"] and plain["reached"]
    return {
        "seed": lightning["seed"],
        "batch_size": lightning["batch_size"],
        "lr": lightning["lr"],
        "lightning_samples": lightning["samples"],
        "plain_samples": plain["samples"],
        "samples_ratio": plain["samples"] / lightning["samples"] if both else None,
        "lightning_seconds": lightning["seconds"],
        "plain_seconds": plain["seconds"],
        "seconds_ratio": lightning["seconds"] / plain["seconds"] if both else None,
        "common_evaluations": len(common),
        "max_loss_gap": max(gaps, default=None),
    }


def median_with_misses(values: Sequence[float | None]) -> float | None:
    """Median over seeds with a miss as +inf: ``None`` ("not reached") when most seeds missed."""
    middle = statistics.median([math.inf if v is None else float(v) for v in values])
    return None if math.isinf(middle) else middle


def summarize(
    name: str, framework: str, runs: Sequence[dict[str, Any] | None], oracle: bool = False
) -> dict[str, Any]:
    """One table row from one run per seed; for an oracle, ``None`` is a seed whose grid never reached
    the target, and the row names each seed's configuration."""
    done = [r for r in runs if r is not None]
    return {
        "method": name,
        "framework": framework,
        "seeds": len(runs),
        "seeds_reached": sum(r["reached"] for r in done),
        "seconds": median_with_misses([r["seconds"] if r else None for r in runs]),
        "samples": median_with_misses([r["samples"] if r else None for r in runs]),
        "configs": [f"B={r['batch_size']}, lr={r['lr']}" if r else "none" for r in runs] if oracle else None,
        "max_batch": max((r["max_batch"] for r in done), default=None),
    }


def add_ratios(row: dict[str, Any], oracles: dict[str, dict[str, Any]]) -> None:
    for framework, oracle in oracles.items():
        for measure in ("seconds", "samples"):
            mine, theirs = row[measure], oracle[measure]
            row[f"{measure}_vs_{framework}_oracle"] = mine / theirs if mine and theirs else None


def run_seed(data: TaskData, plan: Plan, seed: int, lr0: float | None, log: Log) -> dict[str, Any]:
    """Every method of one seed; ``lr0`` is ``None`` in the first seed, whose B=32 row sets it."""
    budget_s = plan.budget(data.name)
    seed_method = {
        "name": f"seed (B={SEED['batch_size']}, lr={SEED['lr']})",
        "config": dict(SEED),
        "batch_size": SEED["batch_size"],
    }
    seed_run = log(run_lightning(data, seed_method, seed, budget_s, budget_s))
    plain = plain_grid(data, plan, seed, log)
    ours = lightning_grid(data, plan, seed, race_order(list(plain.values())), seed_run, lr0 is None, log)
    lr0 = pick_lr0(ours) if lr0 is None else lr0
    ours_oracle = oracle_of(ours)
    check = None
    if ours_oracle is not None:
        cell = (ours_oracle["batch_size"], ours_oracle["lr"])
        if plain[cell]["pruned"]:  # rerun it whole: the paired check needs its samples to target
            plain[cell] = log(run_plain(data, *cell, seed, budget_s, budget_s))
        check = paired(ours_oracle, plain[cell])
    methods = {
        m["name"]: log(run_lightning(data, m, seed, budget_s, budget_s, plan.finder_trials))
        for m in other_methods(lr0)
    }
    return {
        "lr0": lr0,
        "seed_run": seed_run,
        "methods": methods,
        "plain_oracle": oracle_of(plain),
        "lightning_oracle": ours_oracle,
        "paired": check,
    }


def run_task(name: str, plan: Plan) -> dict[str, Any]:
    data = load_task(name)
    runs: list[dict[str, Any]] = []

    def log(result: dict[str, Any]) -> dict[str, Any]:
        runs.append(result)
        status = (
            f"{result['seconds']:.2f} s, {result['samples']:,} samples"
            if result["reached"]
            else f"pruned at {result['cap_s']:.2f} s"
            if result["pruned"]
            else "not reached"
        )
        print(f"  {name:<14} seed {result['seed']} {result['method']:<30} {status}", flush=True)
        return result

    per_seed: list[dict[str, Any]] = []
    for seed in range(plan.seeds):
        per_seed.append(run_seed(data, plan, seed, per_seed[0]["lr0"] if per_seed else None, log))

    oracles = {
        "plain": summarize("plain-loop oracle", "plain", [s["plain_oracle"] for s in per_seed], oracle=True),
        "lightning": summarize(
            "Lightning oracle", "lightning", [s["lightning_oracle"] for s in per_seed], oracle=True
        ),
    }
    rows = [summarize(per_seed[0]["seed_run"]["method"], "lightning", [s["seed_run"] for s in per_seed])]
    for method in per_seed[0]["methods"]:
        rows.append(summarize(method, "lightning", [s["methods"][method] for s in per_seed]))
    rows += list(oracles.values())
    for row in rows:
        add_ratios(row, oracles)
    keep = {id(s[k]) for s in per_seed for k in ("plain_oracle", "lightning_oracle") if s[k]}
    for run in runs:
        if run["grid"] and id(run) not in keep:
            run["points"] = []  # a losing grid run's curve is not worth its bytes; its summary stays
        thin_points(run, data.target)
        # A diverged run's NaN would make the JSON non-standard: such a loss is written as null.
        run["points"] = [(t, n, loss if math.isfinite(loss) else None) for t, n, loss in run["points"]]
    return {
        "task": name,
        "target": data.target,
        "budget_s": plan.budget(name),
        "seeds": plan.seeds,
        "grid": {"batches": list(plan.batches), "lrs": list(plan.lrs)},
        "lr0": per_seed[0]["lr0"],
        "lowest_loss": min((r["lowest_loss"] for r in runs if r["lowest_loss"] is not None), default=None),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "paired": [s["paired"] for s in per_seed if s["paired"]],
        "runs": runs,
    }


def thin_points(run: dict[str, Any], target: float, keep: int = KEEP_POINTS) -> None:
    """Keep at most ``keep`` evenly spaced points of a run, always with the first one at the target:
    the curves stay plottable and the JSON small. The summary figures are computed before thinning."""
    points = run["points"]
    if len(points) <= keep:
        return
    chosen = set(range(0, len(points), math.ceil(len(points) / keep))) | {len(points) - 1}
    reach = next((i for i, p in enumerate(points) if p[2] <= target), None)
    if reach is not None:
        chosen.add(reach)
    run["points"] = [points[i] for i in sorted(chosen)]


def print_table(report: dict[str, Any]) -> None:
    seeds = report["seeds"]
    print(
        f"\n{report['task']}: target val loss {report['target']:.5f} (lowest reached "
        f"{report['lowest_loss'] or math.nan:.5f}); budget {report['budget_s']:g} s a run; {seeds} seed(s); "
        f"lr0 = {report['lr0']}"
    )
    header = (
        f"{'method':<26} {'reached':>7} {'seconds':>8} {'samples':>11} {'s×plain':>8} {'s×Ltng':>7} "
        f"{'n×plain':>8} {'n×Ltng':>7} {'max B':>6}"
    )
    print(header)

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    for row in report["rows"]:
        seconds = f"{row['seconds']:.2f}" if row["seconds"] is not None else f">{report['budget_s']:g}"
        samples = f"{row['samples']:,.0f}" if row["samples"] is not None else "-"
        print(
            f"{row['method']:<26} {row['seeds_reached']:>4}/{row['seeds']:<2} {seconds:>8} {samples:>11} "
            f"{ratio(row['seconds_vs_plain_oracle']):>8} {ratio(row['seconds_vs_lightning_oracle']):>7} "
            f"{ratio(row['samples_vs_plain_oracle']):>8} {ratio(row['samples_vs_lightning_oracle']):>7} "
            f"{row['max_batch'] if row['max_batch'] is not None else '-':>6}"
        )
    for row in report["rows"]:
        if row["configs"]:
            print(f"  {row['method']} per seed: {'; '.join(row['configs'])}")
    for check in report["paired"]:
        samples = ratio(check["samples_ratio"])
        gap = f"{check['max_loss_gap']:.1e}" if check["max_loss_gap"] is not None else "-"
        print(
            f"  paired seed {check['seed']} at B={check['batch_size']}, lr={check['lr']}: samples plain/"
            f"Lightning {samples}, seconds Lightning/plain {ratio(check['seconds_ratio'])}, largest val-loss "
            f"gap at equal rows {gap} over {check['common_evaluations']} evaluations"
        )
    print(
        "(medians over seeds, a miss counting as +inf; ×plain / ×Ltng: over the plain-loop / Lightning oracle)"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--seeds", type=int, help="model-init/shuffling seeds per method (default 3; quick: 1)"
    )
    parser.add_argument("--budget", type=float, help="seconds per run (default: per task, see BUDGETS)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="2×2 grid, 0.5 s budget, 1 seed: a smoke run")
    parser.add_argument(
        "--json", type=Path, help="default: benchmarks/results/time_to_target.json (none if --quick)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1, got {args.seeds}")
        plan = replace(plan, seeds=args.seeds)
    if args.budget is not None:
        if not args.budget > 0:
            parser.error(f"--budget must be positive seconds, got {args.budget}")
        plan = replace(plan, budget_s=args.budget)
    if args.threads is not None:
        # Both loops share the setting. With other processes on the cores, torch's default threads
        # wait on each other: a 65-step B=2048 run took 0.2 s on 1 thread and 1.3 s on 2 here.
        torch.set_num_threads(args.threads)
    out = args.json or (None if args.quick else Path(__file__).parent / "results" / "time_to_target.json")
    quiet_lightning()
    reports = [run_task(name, plan) for name in args.task]
    for report in reports:
        print_table(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        kept = json.loads(out.read_text()) if out.exists() else []
        # Reports written before the plain loop and the seeds (a "results" list, no "rows") are not
        # kept beside new ones: one file, one format.
        kept = [r for r in kept if r["task"] not in args.task and "rows" in r]
        out.write_text(json.dumps(kept + reports, indent=1))
        print(f"\nwritten: {out}")
    return reports


if __name__ == "__main__":
    main()
