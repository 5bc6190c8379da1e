"""Per-step cost of each layer, side by side in one run: a plain PyTorch loop, bare Lightning, this project.

Every column trains the same linear model with SGD on the same in-memory tensors at a fixed batch
size, validation off (it is the training step that is compared):

- ``plain``: the seed's loop (a permutation each epoch, index slicing, the loss read each step);
- ``bare Lightning``: a minimal LightningModule (automatic optimization, ``training_step`` returns
  the loss) in a Trainer with no logger, fed by a plain DataLoader over a ``TensorDataset`` of the
  same tensors, in the two ways users write it: ``batched`` (a ``BatchSampler`` as the sampler and
  ``batch_size=None``, so each batch is one fancy-indexing read) and ``per-row`` (``batch_size=B,
  shuffle=True``: B ``__getitem__`` calls and the default collate);
- ``project``: the real path (TabularDataModule → TaskModule → Lightning Trainer →
  BufferedMLFlowLogger on a sqlite store, per-step metrics every ``log_every`` steps).

Lightning columns are timed from the first step's start to the end of training (a fit's one-off
set-up, such as creating the MLflow run, is not per-step cost). The ratios are against the faster
bare Lightning column; its difference to the plain loop is what
Lightning costs, the project's difference to it what this project adds. Rounds alternate between
the columns and medians are reported, because this machine is shared and noisy.

    python benchmarks/overhead.py [--rows 200000] [--rounds 5] [--steps 1500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import plain_step, training_only_trainer  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.tabular.datamodule import TabularDataModule  # noqa: E402
from lightning_batch.tracking.logger import BufferedMLFlowLogger
from lightning_batch.tracking.store import ensure_store  # noqa: E402
from lightning_batch.training import build_module, quiet_lightning  # noqa: E402


def plain_loop_steps_per_second(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int) -> float:
    """The seed's section-5 loop (shuffled each epoch like ours), timed over ``steps`` steps."""
    model = nn.Linear(x.shape[1], 1)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    done = 0
    start = time.perf_counter()
    while done < steps:
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            index = order[i : i + batch_size]
            plain_step(model, criterion, optimizer, x[index], y[index])
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


class LoopClock(pl.Callback):
    """Seconds from the first training step's start to the end of training: the steps, without a
    fit's one-off set-up (creating the MLflow run, the first sqlite writes), which is not per step."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.started is not None
        self.seconds = time.perf_counter() - self.started


class BareRegression(pl.LightningModule):
    """The smallest LightningModule a user would write for the seed's linear model."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.model = nn.Linear(features, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def bare_lightning_steps_per_second(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, *, batched: bool
) -> float:
    """Bare Lightning over a plain DataLoader of ``TensorDataset(x, y)`` (see the module docstring)."""
    dataset = TensorDataset(x, y)
    if batched:
        sampler = BatchSampler(RandomSampler(dataset), batch_size, drop_last=False)
        loader = DataLoader(dataset, sampler=sampler, batch_size=None)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    clock = LoopClock()
    trainer = training_only_trainer(max_steps=steps, callbacks=[clock])
    trainer.fit(BareRegression(x.shape[1]), loader)
    assert trainer.global_step == steps
    return steps / clock.seconds


def project_steps_per_second(dm: TabularDataModule, cfg: RunConfig, steps: int, uri: str) -> float:
    module = build_module(cfg, dm)  # logs per-step metrics every cfg.log_every steps
    logger = BufferedMLFlowLogger(experiment_name="overhead", tracking_uri=uri)
    clock = LoopClock()
    trainer = training_only_trainer(max_steps=steps, logger=logger, callbacks=[clock])
    trainer.fit(module, datamodule=dm)
    logger.finalize("success")
    assert trainer.global_step == steps
    return steps / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500, help="steps per timed fit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_lightning()
    torch.manual_seed(0)
    uri = f"sqlite:///{tempfile.mkdtemp()}/overhead.db"
    ensure_store(uri)
    results = {}
    for batch_size, log_every in ((32, 10), (2048, 10), (32, 1)):
        cfg = RunConfig(
            data="synthetic-regression",
            rows=args.rows,
            features=args.features,
            batch_size=batch_size,
            lr=0.01,
            log_every=log_every,
        ).validate()
        dm = TabularDataModule(cfg)
        dm.setup()
        x, y = dm.train_set.features, dm.train_set.targets
        columns: dict[str, Callable[[], float]] = {
            "plain": partial(plain_loop_steps_per_second, x, y, batch_size, args.steps),
            "bare_batched": partial(
                bare_lightning_steps_per_second, x, y, batch_size, args.steps, batched=True
            ),
            "bare_per_row": partial(
                bare_lightning_steps_per_second, x, y, batch_size, args.steps, batched=False
            ),
            "project": partial(project_steps_per_second, dm, cfg, args.steps, uri),
        }
        # Warm-up: imports, first sqlite writes, the allocator's first large blocks.
        project_steps_per_second(dm, cfg, 50, uri)
        bare_lightning_steps_per_second(x, y, batch_size, 50, batched=True)
        rounds: dict[str, list[float]] = {name: [] for name in columns}
        ratios: list[float] = []
        for _ in range(args.rounds):
            for name, run in columns.items():
                rounds[name].append(run())
            bare = max(rounds["bare_batched"][-1], rounds["bare_per_row"][-1])
            ratios.append(bare / rounds["project"][-1])
        us = {name: 1e6 / statistics.median(v) for name, v in rounds.items()}
        bare_us = min(us["bare_batched"], us["bare_per_row"])
        results[f"B={batch_size}, log_every={log_every}"] = {
            "us_per_step": us,
            "lightning_us": bare_us - us["plain"],
            "project_us": us["project"] - bare_us,
            "project_vs_bare_lightning_median": statistics.median(ratios),
            "project_vs_bare_lightning_per_round": ratios,
            "bare_lightning_vs_plain": bare_us / us["plain"],
            "steps_per_s_per_round": rounds,
        }
    print(
        f"{'setting':<22} {'plain':>8} {'bare L batched':>15} {'bare L per-row':>15} {'project':>9}"
        f" {'project / bare L':>17}   (microseconds a step, medians)"
    )
    for name, r in results.items():
        u = r["us_per_step"]
        print(
            f"{name:<22} {u['plain']:>8.0f} {u['bare_batched']:>15.0f} {u['bare_per_row']:>15.0f} "
            f"{u['project']:>9.0f} {r['project_vs_bare_lightning_median']:>16.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
