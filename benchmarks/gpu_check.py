"""The checks that need a real GPU, in one prepared call (under 5 minutes on one GPU), as JSON.

Runs from the source tree (``PYTHONPATH=.``) on torch, Lightning, numpy, pandas and scikit-learn
alone: no MLflow, Optuna or psutil (the lent GPU machines have none of them), so it drives
``TaskModule``, ``TabularDataModule`` and ``DynamicBatchSize`` with a plain Trainer.

Sections (each written to the JSON as soon as it is done, so a timeout keeps the earlier ones):

a. ``probe``: the memory probe's predicted ceiling against the true largest batch, found by
   bisection with real CUDA out-of-memory errors, for the MLP (512-512) and the CNN, fp32 and
   bf16 autocast, on a card limited to ``--card-gib`` GiB (``torch.cuda.set_per_process_memory_fraction``,
   which the probe's meter honours). Goal: within 10%, in at most 3 trial steps.
b. ``oom``: a real OOM forced mid-training (the allocator's limit lowered below the step's need
   at step 20) and recovered by redoing the step in micro-batches; the run's final weights and
   validation loss against a run that never ran out of memory.
c. ``time_to_target``: 10-class classification, ~1M training rows, MLP 512-512, SGD: ``auto``
   (goodput from B=1024) against a grid of fixed (B, lr) and Lightning's ``BatchSizeFinder``;
   seconds and samples to a validation loss within 5% of the best any run reached, steps/s.
d. ``data_placement``: steps/s with the tables on the GPU (a batch is an index there, made there;
   and, as a control, the same tables with each batch's index copied from the host) against
   tables in pinned host memory copied every step.
e. ``main_path``: a fit with validation and a test, tables on the device and in pinned host
   memory: the same rows in the same order, so equal losses (the eval loaders' indices included).
f. ``sync``: the calls that make the host wait for the GPU (PyTorch's sync debug mode) over 84
   steps of TaskModule on device-resident tables, an epoch's end included, and where they are.

Without a GPU (or with ``--smoke``) a and b are skipped and c and d run small on the CPU: that
is what ``tests/test_gpu_check.py`` runs, with MLflow and Optuna made unimportable.

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import training_only_trainer  # noqa: E402
from lightning.pytorch.callbacks import BatchSizeFinder, Callback  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.plugin.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.plugin.memory import CudaMemoryMeter  # noqa: E402
from lightning_batch.plugin.probe import probe_training_ceiling  # noqa: E402
from lightning_batch.tabular.datamodule import TabularDataModule  # noqa: E402
from lightning_batch.tabular.networks import build_model  # noqa: E402
from lightning_batch.tabular.task_module import TaskModule  # noqa: E402


class Report:
    """The JSON report, rewritten after every section."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        print(f"[{key}] {json.dumps(value, default=str)[:600]}", flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            total_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
        )
    return info


def trainer(device: torch.device, **options: Any) -> pl.Trainer:
    """The benchmarks' training-only Trainer, on ``device``."""
    return training_only_trainer(accelerator="gpu" if device.type == "cuda" else "cpu", **options)


def mlp_module(prepared: Any, lr: float, **options: Any) -> TaskModule:
    """The check's network: an MLP 512-512 classifier over the prepared tables, seeded."""
    pl.seed_everything(0, verbose=False)
    return TaskModule(
        build_model("mlp", prepared.n_features, prepared.n_outputs, hidden=[512, 512]),
        task="classification",
        n_classes=prepared.n_outputs,
        lr=lr,
        **options,
    )


def free_cuda() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# a. the probe against the truth


def _network(kind: str, device: torch.device) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    if kind == "mlp":
        return build_model("mlp", 32, 10, hidden=[512, 512]).to(device), 32
    return build_model("cnn", 64, 10, channels=[32, 64]).to(device), 64


def true_largest_batch(run_step: Callable[[int], None], start: int) -> tuple[int, int]:
    """The largest batch whose step runs without a CUDA OOM (to 0.5%), by growth then bisection.
    Returns (batch, trial steps)."""

    def fits(batch: int) -> bool:
        try:
            run_step(batch)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            free_cuda()

    trials = 1
    lo, hi = 0, None
    batch = max(1, start)
    while hi is None:  # grow by ×1.25 from the probe's answer (or shrink) until bracketed
        if fits(batch):
            lo, batch = batch, int(batch * 1.25) + 1
        else:
            hi = batch
            if lo == 0:
                lo_try = batch // 2
                while lo_try > 0 and not fits(lo_try):
                    trials += 1
                    hi, lo_try = lo_try, lo_try // 2
                lo = lo_try
        trials += 1
    while hi - lo > max(1, int(0.005 * lo)):
        mid = (lo + hi) // 2
        trials += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


@contextlib.contextmanager
def reserved_peaks_recorded(into: list[tuple[int, int]]):
    """Each trial step's peak *reserved* memory, beside the peak allocated memory the probe reads.

    The per-process limit caps what the caching allocator reserves, so allocated peaks understate
    what a step needs by the allocator's rounding and fragmentation: on the CNN about 7-9% at the
    limit (issue 14's GPU runs). These figures say whether reserved peaks would fit the truth better.
    """
    measure = CudaMemoryMeter.measure

    def recording(self: CudaMemoryMeter, run_step: Callable[[int], None], batch_size: int) -> int:
        peak = measure(self, run_step, batch_size)  # raises on an OOM: nothing to record then
        into.append((batch_size, int(torch.cuda.max_memory_reserved(self.device))))
        return peak

    CudaMemoryMeter.measure = recording
    try:
        yield into
    finally:
        CudaMemoryMeter.measure = measure


def peaks_at(run_step: Callable[[int], None], batch: int) -> dict[str, int] | str:
    """Peak allocated and reserved bytes of one step at ``batch``, from an empty cache."""
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    try:
        run_step(batch)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return "oom"  # the bisection's largest batch is at the edge: a rerun may not fit
    finally:
        free_cuda()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def _probe_case(kind: str, precision: str, device: torch.device) -> dict[str, Any]:
    free_cuda()
    net, features = _network(kind, device)

    def context() -> Any:
        return (
            torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )

    def sample_batch(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(index)
        return torch.randn(rows, features, device=device), torch.randint(0, 10, (rows,), device=device)

    def trial_loss(index: torch.Tensor) -> torch.Tensor:
        x, y = sample_batch(index)
        with context():
            return torch.nn.functional.cross_entropy(net(x), y)

    def run_step(batch: int) -> None:
        x, y = sample_batch(torch.empty(batch))
        with context():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        net.zero_grad(set_to_none=True)

    reserved: list[tuple[int, int]] = []
    started = time.perf_counter()
    with reserved_peaks_recorded(reserved):
        probe = probe_training_ceiling(trial_loss, net, 10**9, device, 1.0)
    probe_s = time.perf_counter() - started
    free_cuda()
    truth, truth_trials = true_largest_batch(run_step, probe.ceiling)
    return {
        "model": kind,
        "precision": precision,
        "predicted_ceiling": probe.ceiling,
        "true_largest": truth,
        "ratio": probe.ceiling / truth if truth else None,
        "within_10pct": bool(truth and abs(probe.ceiling / truth - 1) <= 0.10),
        "probe_trial_steps": len(probe.steps),
        "probe_steps": probe.steps,
        "probe_steps_reserved": reserved,
        "peaks_at_true_largest": peaks_at(run_step, truth) if truth else None,
        "budget_bytes": probe.budget_bytes,
        "probe_seconds": round(probe_s, 3),
        "bisection_trial_steps": truth_trials,
        "bytes_per_row": probe.bytes_per_sample,
    }


def section_probe(device: torch.device, card_gib: float) -> dict[str, Any]:
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_gib * 2**30 / total), device)
    results = []
    try:
        for kind in ("mlp", "cnn"):
            for precision in ("fp32", "bf16"):
                try:
                    results.append(_probe_case(kind, precision, device))
                except Exception as exc:  # noqa: BLE001 -- one case's failure must not lose the others
                    results.append(
                        {"model": kind, "precision": precision, "error": f"{type(exc).__name__}: {exc}"}
                    )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        free_cuda()
    return {"card_gib": card_gib, "runs": results}


# ------------------------------------------------------------------------------------------------
# b. a real OOM mid-training, recovered


class LowerTheLimitAt(Callback):
    """At ``step``, lower the allocator's limit below what a step at the current batch needs."""

    def __init__(self, step: int, keep: float = 0.6) -> None:
        self.step, self.keep = step, keep
        self.step_extra = 0
        self.limited = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:  # the step before the forced OOM measured its need
            torch.cuda.synchronize()
            self.step_extra = torch.cuda.max_memory_allocated() - self._base
            free_cuda()
            total = torch.cuda.get_device_properties(0).total_memory
            limit = torch.cuda.memory_allocated() + int(self.keep * self.step_extra)
            torch.cuda.set_per_process_memory_fraction(limit / total)
            self.limited = True

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_per_process_memory_fraction(1.0)


def _fit_fixed(
    device: torch.device, prepared: Any, batch: int, steps: int, callbacks: list[Callback]
) -> tuple[TaskModule, dict[str, torch.Tensor], float]:
    dm = datamodule_over(prepared, batch, 0.5)
    module = mlp_module(prepared, lr=0.1, momentum=0.9)
    trainer(device, max_steps=steps, callbacks=callbacks).fit(module, datamodule=dm)
    weights = {k: v.detach().double().cpu() for k, v in module.model.state_dict().items()}
    module.to(device).eval()
    with torch.no_grad():
        x, y = prepared.val.features.to(device), prepared.val.targets.to(device)
        val_loss = float(module.loss(module(x), y))
    return module, weights, val_loss


def section_oom(device: torch.device, prepared: Any, batch: int, steps: int) -> dict[str, Any]:
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products: the comparison is to ~1e-6
    try:
        _, clean_weights, clean_loss = _fit_fixed(device, prepared, batch, steps, [])
        free_cuda()
        limiter = LowerTheLimitAt(step=20)
        module, oom_weights, oom_loss = _fit_fixed(device, prepared, batch, steps, [limiter])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
        torch.cuda.set_per_process_memory_fraction(1.0)
        free_cuda()
    diff = max(float((clean_weights[k] - oom_weights[k]).abs().max()) for k in clean_weights)
    scale = max(float(v.abs().max()) for v in clean_weights.values())
    return {
        "batch": batch,
        "steps": steps,
        "limit_lowered": limiter.limited,
        "step_bytes": limiter.step_extra,
        "oom_recoveries": module.oom_recoveries,
        "rows_per_pass_after": module.max_rows_per_pass,
        "val_loss_clean": clean_loss,
        "val_loss_after_oom": oom_loss,
        "val_loss_rel_diff": abs(oom_loss - clean_loss) / clean_loss,
        "max_abs_weight_diff": diff,
        "max_abs_weight": scale,
        "equal": module.oom_recoveries >= 1 and diff <= 1e-4 * max(scale, 1.0),
    }


# ------------------------------------------------------------------------------------------------
# c. time to target, d. data placement


class Clock(Callback):
    """(seconds, samples, val loss) every ``every_rows`` trained rows, the evaluation's own time
    left out; stops the fit after ``budget_s`` seconds of training."""

    def __init__(self, x_val: torch.Tensor, y_val: torch.Tensor, every_rows: int, budget_s: float) -> None:
        self.x_val, self.y_val = x_val, y_val
        self.every_rows, self.budget_s = every_rows, budget_s
        self.points: list[tuple[float, int, float]] = []
        self.rows = self.steps = 0
        self.next_eval = 0
        self.started = self.paused = 0.0

    def on_fit_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows += len(batch[0])
        self.steps += 1
        if self.rows < self.next_eval:
            if self.steps % 50 == 0 and self.elapsed() > self.budget_s:
                trainer.should_stop = True
            return
        pause = time.perf_counter()
        seconds = self.elapsed()
        pl_module.eval()
        with torch.no_grad():
            x, y = self.x_val.to(pl_module.device), self.y_val.to(pl_module.device)
            loss = float(pl_module.loss(pl_module(x), y))
        pl_module.train()
        self.points.append((round(seconds, 4), self.rows, loss))
        self.next_eval = self.rows + self.every_rows
        self.paused += time.perf_counter() - pause
        if seconds > self.budget_s or not math.isfinite(loss):
            trainer.should_stop = True


def _fit_for_time(
    device: torch.device,
    prepared: Any,
    *,
    batch_size: int | str,
    lr: float,
    budget_s: float,
    finder: bool = False,
    eval_every_rows: int,
    val_rows: int,
) -> dict[str, Any]:
    cfg = RunConfig(
        data="synthetic-classification",
        batch_size=batch_size,
        base_batch=1024 if batch_size == "auto" else 32,
        lr=lr,
        seed=0,
        epochs=10_000,
    ).validate()
    dm = TabularDataModule(cfg)
    dm.prepared = prepared
    module = mlp_module(prepared, lr=lr, log_every=50)
    clock = Clock(
        prepared.val.features[:val_rows], prepared.val.targets[:val_rows], eval_every_rows, budget_s
    )
    callbacks: list[Callback] = [clock]
    resizer = None
    if finder:
        callbacks.append(BatchSizeFinder(mode="power", init_val=int(batch_size), steps_per_trial=3))
    if cfg.dynamic:
        resizer = DynamicBatchSize(policy=cfg.resolved_policy, lr_rule=cfg.resolved_lr_rule, log_every=50)
        callbacks.append(resizer)
    trainer(device, max_epochs=cfg.epochs, callbacks=callbacks).fit(module, datamodule=dm)
    seconds = clock.elapsed()
    return {
        "points": clock.points,
        "steps": clock.steps,
        "steps_per_s": clock.steps / seconds if seconds > 0 else None,
        "final_batch": int(dm.batch_size),
        "max_batch": max([int(dm.batch_size), *(d["to"] for d in (resizer.decisions if resizer else []))]),
        "ceiling": resizer.ceiling if resizer else None,
        "data_placement": dm.data_placement,
        **(_measurement_figures(resizer, seconds) if resizer else {}),
    }


def _measurement_figures(resizer: DynamicBatchSize, seconds: float) -> dict[str, Any]:
    """What the noise measurements cost against the 2% budget, and the probe's timed cost a row
    (the throughput model's starting slope)."""
    probe = resizer.probe
    return {
        "noise_measurements": resizer.ema.num_updates,
        "measurement_seconds": round(resizer.clock.budget.spent, 4),
        "measurement_share": resizer.clock.budget.spent / seconds if seconds > 0 else None,
        "probe_seconds_per_row": probe.seconds_per_row() if probe is not None else None,
        "decisions": [(d["step"], d["from"], d["to"], d["reason"]) for d in resizer.decisions],
    }


def _first_reach(points: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    return next(((s, rows) for s, rows, loss in points if loss <= target), None)


def section_time_to_target(
    device: torch.device,
    prepared: Any,
    grid_batches: tuple[int, ...],
    grid_lrs: tuple[float, ...],
    budget_s: float,
    eval_every_rows: int,
    val_rows: int,
) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    common = dict(budget_s=budget_s, eval_every_rows=eval_every_rows, val_rows=val_rows)
    for batch in grid_batches:
        for lr in grid_lrs:
            runs[f"fixed B={batch}, lr={lr}"] = _fit_for_time(
                device, prepared, batch_size=batch, lr=lr, **common
            )
            free_cuda()
    # lr0: the lr a user tuned at the smallest batch (AdaScale and Pollux start from there).
    small = grid_batches[0]
    lr0 = min(
        grid_lrs,
        key=lambda lr: min((p[2] for p in runs[f"fixed B={small}, lr={lr}"]["points"]), default=math.inf),
    )
    runs[f"auto (goodput from B={small}, lr={lr0})"] = _fit_for_time(
        device, prepared, batch_size="auto", lr=lr0, **common
    )
    free_cuda()
    runs[f"BatchSizeFinder (from B={small}, lr={lr0})"] = _fit_for_time(
        device, prepared, batch_size=small, lr=lr0, finder=True, **common
    )
    free_cuda()
    best = min(p[2] for r in runs.values() for p in r["points"])
    best_fixed = min(
        (p[2] for name, r in runs.items() if name.startswith("fixed") for p in r["points"]), default=math.inf
    )
    summary = []
    for name, run in runs.items():
        summary.append(
            {
                "method": name,
                "best_val_loss": min((p[2] for p in run["points"]), default=None),
                "steps_per_s": run["steps_per_s"],
                "final_batch": run["final_batch"],
                "max_batch": run["max_batch"],
                "ceiling": run["ceiling"],
                "measurement_share": run.get("measurement_share"),
                "noise_measurements": run.get("noise_measurements"),
            }
        )
    return {
        "train_rows": len(prepared.train),
        "best_val_loss": best,
        "best_fixed_val_loss": best_fixed,
        "budget_s": budget_s,
        # Two targets: 5% above the best loss any run reached (favours whoever reached it), and 5%
        # above the best a fixed configuration reached (what a user tuning by hand could have had).
        "targets": {
            label: _race(runs, summary, target)
            for label, target in (("best_any_x1.05", best * 1.05), ("best_fixed_x1.05", best_fixed * 1.05))
        },
        "summary": summary,
        "curves": {name: run["points"] for name, run in runs.items()},
    }


def _race(runs: dict[str, dict[str, Any]], summary: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Seconds and samples each run took to reach ``target``, and each against the fastest fixed run."""
    reached = {name: _first_reach(run["points"], target) for name, run in runs.items()}
    fixed = {name: r for name, r in reached.items() if name.startswith("fixed") and r is not None}
    oracle = min(fixed, key=lambda name: fixed[name][0]) if fixed else None
    rows = []
    for entry in summary:
        reach = reached[entry["method"]]
        rows.append(
            {
                "method": entry["method"],
                "seconds_to_target": reach[0] if reach else None,
                "samples_to_target": reach[1] if reach else None,
                "x_best_fixed": reach[0] / fixed[oracle][0] if reach and oracle else None,
            }
        )
    return {"target_val_loss": target, "best_fixed": oracle, "runs": rows}


class StepRate(Callback):
    """Steps per second after ``warmup`` steps (synchronised with the device at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started: float | None = None
        self.steps = 0
        self.seconds = 0.0
        self.placement = ""

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module):
        self.placement = trainer.datamodule.data_placement  # teardown moves the tables back afterwards

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.started = time.perf_counter()
        elif self.started is not None:
            self.steps += 1

    def on_train_end(self, trainer, pl_module):
        self._sync(pl_module)
        if self.started is not None:
            self.seconds = time.perf_counter() - self.started


def datamodule_over(
    prepared: Any, batch: int, device_data_budget: float, module_class: type = TabularDataModule
) -> TabularDataModule:
    """A data module over ``prepared``'s tables, with table objects of its own: placing them on a
    device moves its copies, and the other runs' stay where they are."""
    local = copy.copy(prepared)
    local.train, local.val, local.test = (copy.copy(t) for t in (prepared.train, prepared.val, prepared.test))
    dm = module_class(
        data="synthetic-classification", batch_size=batch, seed=0, device_data_budget=device_data_budget
    )
    dm.prepared = local
    return dm


def section_data_placement(
    device: torch.device, prepared: Any, batches: tuple[int, ...], steps: int, repeats: int = 3
) -> dict[str, Any]:
    return {f"B={batch}": _data_placement(device, prepared, batch, steps, repeats) for batch in batches}


def _data_placement(
    device: torch.device, prepared: Any, batch: int, steps: int, repeats: int
) -> dict[str, Any]:
    # The three placements take turns, round after round, so that a drift of the machine's clocks
    # over the section (a GPU ramping up, a neighbour's load) falls on all of them alike.
    labels = {"on_device": 0.5, "on_device_host_index": 0.5, "host_copied": 0.0}
    results: dict[str, list[float | None]] = {label: [] for label in labels}
    placements: dict[str, str] = {}
    for _ in range(repeats):
        for label, budget in labels.items():
            module_class = HostIndexDataModule if label == "on_device_host_index" else TabularDataModule
            dm = datamodule_over(prepared, batch, budget, module_class)
            module = mlp_module(prepared, lr=0.05, log_every=50)
            rate = StepRate(warmup=20)
            trainer(device, max_steps=steps, callbacks=[rate]).fit(module, datamodule=dm)
            results[label].append(rate.steps / rate.seconds if rate.seconds else None)
            placements[label] = rate.placement
            free_cuda()
    rates: dict[str, Any] = {}
    for label, values in results.items():
        clean = sorted(r for r in values if r)
        rates[label] = {
            "placement": placements[label],
            "steps_per_s": values,
            "median": clean[len(clean) // 2],
        }
    rates["speedup"] = rates["on_device"]["median"] / rates["host_copied"]["median"]
    rates["speedup_of_device_index"] = rates["on_device"]["median"] / rates["on_device_host_index"]["median"]
    return rates


class HostIndexDataModule(TabularDataModule):
    """Tables on the device but each batch's index made on the host and copied per step (how the
    data path worked before the sampler's index_device): the control for the index's own copy."""

    def _index_device(self, dataset):
        return None


# ------------------------------------------------------------------------------------------------
# e. the main path's data on the device: validation and test too


class PlacementSeen(Callback):
    """Where the tables were while training (the fit's teardown moves them back to the host)."""

    placement = ""

    def on_train_start(self, trainer, pl_module):
        self.placement = trainer.datamodule.data_placement


def section_main_path(device: torch.device, prepared: Any, epochs: int = 2) -> dict[str, Any]:
    """A fit with validation after each epoch and a test, once with the tables on the device (every
    loader's indices made there) and once in pinned host memory: the same rows in the same order,
    so the losses must agree to float rounding."""
    runs: dict[str, dict[str, Any]] = {}
    for label, budget in (("on_device", 0.5), ("host_copied", 0.0)):
        dm = datamodule_over(prepared, 4096, budget)
        module = mlp_module(prepared, lr=0.05, log_every=50)
        seen = PlacementSeen()
        fit = trainer(device, max_epochs=epochs, limit_val_batches=1.0, callbacks=[seen])
        fit.fit(module, datamodule=dm)
        val_loss = float(fit.callback_metrics["val_loss"])
        index_device = str(dm.train_batch_sampler.index_device)
        (tested,) = fit.test(module, datamodule=dm, verbose=False)
        runs[label] = {
            "placement": seen.placement,
            "index_device": index_device,
            "val_loss": val_loss,
            "test_loss": float(tested["test_loss"]),
            "samples_seen": int(module.samples_seen),
        }
        free_cuda()
    a, b = runs["on_device"], runs["host_copied"]
    rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in ("val_loss", "test_loss"))
    return {
        **runs,
        "max_rel_diff": rel,
        "equal": rel <= 1e-4 and a["samples_seen"] == b["samples_seen"] == epochs * len(prepared.train),
    }


# ------------------------------------------------------------------------------------------------
# f. synchronising calls on the device path


class SyncWatch(Callback):
    """Counts the CUDA calls that make the host wait for the device between two steps (PyTorch's
    sync debug mode warns at each), by where they come from: the innermost frame of this project
    or, failing that, of Lightning."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.sites: dict[str, int] = {}
        self._context: Any = None

    def _count(self, message, category, filename, lineno, file=None, line=None) -> None:
        # The warning's own location is PyTorch's C++; its Python caller is on the stack.
        import traceback

        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if "lightning_batch" in f.filename or "lightning/pytorch" in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        key = where if "synchroniz" in str(message) else f"other warning at {where}"
        self.sites[key] = self.sites.get(key, 0) + 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.first:
            self._context = warnings.catch_warnings()
            self._context.__enter__()
            warnings.simplefilter("always")  # every call, not once per C++ location
            warnings.showwarning = self._count
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.last:
            self._stop()

    def on_train_end(self, trainer, pl_module):
        self._stop()

    def _stop(self) -> None:
        if self._context is not None:
            torch.cuda.set_sync_debug_mode(0)
            self._context.__exit__(None, None, None)  # puts the filters and showwarning back
            self._context = None


def section_sync(device: torch.device, prepared: Any, batch: int = 16384, steps: int = 90) -> dict[str, Any]:
    """Synchronising calls in a fit of TaskModule on device-resident tables, over steps that cross
    an epoch's end (the permutation's copy): the data path itself should add none."""
    dm = datamodule_over(prepared, batch, 0.5)
    module = mlp_module(prepared, lr=0.05, log_every=50)
    watch = SyncWatch(first=5, last=steps - 1)
    seen = PlacementSeen()
    trainer(device, max_steps=steps, callbacks=[watch, seen]).fit(module, datamodule=dm)
    free_cuda()
    return {
        "placement": seen.placement,
        "steps_watched": steps - 1 - 5,
        "epoch_steps": math.ceil(len(prepared.train) / batch),
        "synchronising_calls": sum(n for site, n in watch.sites.items() if not site.startswith("other")),
        "sites": watch.sites,
    }


# ------------------------------------------------------------------------------------------------


#: The sections a to f, in the order they run (``--only`` picks some).
SECTIONS = ("probe", "oom", "time_to_target", "data_placement", "main_path", "sync")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("OUT", "benchmarks")) / "gpu_check.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; the GPU-only sections skipped")
    parser.add_argument("--card-gib", type=float, default=8.0, help="memory the probe section may use")
    parser.add_argument(
        "--budget", type=float, default=6.0, help="seconds of training per time-to-target run"
    )
    parser.add_argument("--rows", type=int, default=1_500_000, help="rows of the classification task")
    parser.add_argument("--only", nargs="+", choices=SECTIONS)
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    rows = args.rows if not args.smoke else 6_000
    report = Report(args.out)
    report.put("environment", environment(device))
    wanted = set(args.only or SECTIONS)
    started = time.perf_counter()

    def run(name: str, fn: Callable[[], Any]) -> None:
        if name not in wanted:
            return
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 -- one section's failure must not lose the others
            value = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        if isinstance(value, dict):
            value["section_seconds"] = round(time.perf_counter() - t0, 1)
        report.put(name, value)

    if gpu:
        run("probe", lambda: section_probe(device, args.card_gib))
    else:
        report.put("probe", {"skipped": "no CUDA device"})
    t0 = time.perf_counter()
    cfg = RunConfig(data="synthetic-classification", rows=rows, features=32, classes=10, seed=0).validate()
    dm = TabularDataModule(cfg)
    dm.setup()
    prepared = dm.prepared
    report.put(
        "data",
        {
            "rows": rows,
            "train_rows": len(prepared.train),
            "prepare_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    if gpu:
        run("oom", lambda: section_oom(device, prepared, batch=16384, steps=60))
    else:
        report.put("oom", {"skipped": "no CUDA device"})
    if gpu:
        run(
            "time_to_target",
            lambda: section_time_to_target(
                device, prepared, (1024, 8192, 65536), (0.1, 0.4), args.budget, 100_000, 50_000
            ),
        )
        run(
            "data_placement",
            lambda: section_data_placement(device, prepared, (4096, 65536), steps=300, repeats=5),
        )
    else:
        run(
            "time_to_target",
            lambda: section_time_to_target(
                device, prepared, (32,), (0.05,), min(args.budget, 0.5), 1_000, 500
            ),
        )
        run("data_placement", lambda: section_data_placement(device, prepared, (64,), steps=30, repeats=1))
    run("main_path", lambda: section_main_path(device, prepared, epochs=2 if gpu else 1))
    if gpu:
        run("sync", lambda: section_sync(device, prepared))
    else:
        report.put("sync", {"skipped": "no CUDA device"})
    report.put("total_seconds", round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
