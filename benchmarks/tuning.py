"""TPE + median pruning vs a full grid over the same lr × batch-size space, on the seed's regression.

Both searches run through ``lightning_batch.tune.study.tune`` (real Optuna storage, real MLflow runs, in a
throw-away folder) on the same data and model:

- ``grid``: every point of an 8 (lr, log-spaced over [1e-4, 1]) × 6 (batch 16 … 512) grid, each
  trained for the full number of epochs, no pruning;
- ``tpe``: 20 trials of TPE over the continuous ranges those grid values span (lr log-uniform,
  batch size log-int), median pruning on val_loss after each epoch; repeated for a few sampler seeds.

Compute is counted in trial-epochs (a pruned trial counts the epochs it ran), the measure that does
not depend on how busy this machine is. It prints, per TPE seed and as the median, the best
validation loss relative to the grid's best and the compute relative to the grid's, and writes JSON.

    python benchmarks/tuning.py [--seeds 0 1 2] [--trials 20] [--epochs 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.tune.space import TuneConfig, parse_space  # noqa: E402
from lightning_batch.tune.study import tune  # noqa: E402

TASK = dict(data="synthetic-regression", rows=20_000, features=16, noise=0.5, correlation=0.5, model="linear")
LR_RANGE = {"low": 1e-4, "high": 1.0, "log": True}
BATCH_RANGE = {"low": 16, "high": 512, "log": True}
GRID_LRS = 8
GRID_BATCHES = [16, 32, 64, 128, 256, 512]


def run_study(name: str, options: TuneConfig, epochs: int, root: Path) -> dict:
    base = RunConfig(**TASK, epochs=epochs, tracking_uri=f"sqlite:///{root}/mlflow.db")
    options.storage = f"sqlite:///{root}/optuna.db"
    options.study = name
    options.retrain = "none"
    started = time.perf_counter()
    result = tune(base, options, echo=lambda line: None)
    return {
        "study": name,
        "best_val_loss": result.best_value,
        "best_params": result.best_params,
        "trial_epochs": result.trial_epochs,
        "states": result.states,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "tuning.json"))
    args = parser.parse_args()

    lrs = parse_space({"lr": LR_RANGE})["lr"].grid(GRID_LRS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        grid_space = {"lr": lrs, "batch_size": GRID_BATCHES}
        grid_trials = len(lrs) * len(GRID_BATCHES)
        print(
            f"grid: {len(lrs)} lrs x {len(GRID_BATCHES)} batch sizes = {grid_trials} trials x {args.epochs} epochs",
            flush=True,
        )
        grid = run_study(
            "grid",
            TuneConfig(trials=grid_trials, sampler="grid", pruner="none", space=grid_space),
            args.epochs,
            root,
        )
        print(
            f"  best val loss {grid['best_val_loss']:.5f} at {grid['best_params']}, {grid['trial_epochs']} trial-epochs",
            flush=True,
        )
        tpe_runs = []
        for seed in args.seeds:
            run = run_study(
                f"tpe-{seed}",
                TuneConfig(
                    trials=args.trials,
                    sampler="tpe",
                    pruner="median",
                    seed=seed,
                    space={"lr": LR_RANGE, "batch_size": BATCH_RANGE},
                ),
                args.epochs,
                root,
            )
            run["loss_vs_grid"] = run["best_val_loss"] / grid["best_val_loss"]
            run["compute_vs_grid"] = run["trial_epochs"] / grid["trial_epochs"]
            tpe_runs.append(run)
            print(
                f"tpe seed {seed}: best val loss {run['best_val_loss']:.5f} ({run['loss_vs_grid']:.4f}x grid), "
                f"{run['trial_epochs']} trial-epochs ({run['compute_vs_grid']:.3f}x grid), "
                f"{run['states']['PRUNED']} pruned",
                flush=True,
            )
    summary = {
        "task": TASK,
        "epochs": args.epochs,
        "grid": grid,
        "tpe": tpe_runs,
        "median_loss_vs_grid": statistics.median(r["loss_vs_grid"] for r in tpe_runs),
        "median_compute_vs_grid": statistics.median(r["compute_vs_grid"] for r in tpe_runs),
    }
    print(
        f"\nTPE + median pruning, {args.trials} trials (median of {len(tpe_runs)} seeds): best val loss "
        f"{summary['median_loss_vs_grid']:.4f}x the grid's best (goal <= 1.02) at "
        f"{summary['median_compute_vs_grid']:.3f}x its trial-epochs (goal <= 0.333)"
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
