"""Per-step cost of this project's training against a plain PyTorch loop, side by side in one run.

Both sides train the same linear model with SGD on the same in-memory tensors at a fixed batch
size; this project's side is the real path (TabularDataModule → TaskModule → Lightning Trainer
→ BufferedMLFlowLogger on a sqlite store, per-step metrics on). Validation is off on both sides:
it is the training step that is compared. Rounds alternate between the two and the medians are
reported, because this machine is shared and noisy.

    python benchmarks/overhead.py [--rows 200000] [--rounds 5] [--json out.json]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import training_only_trainer  # noqa: E402
from torch import nn  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.data import TabularDataModule  # noqa: E402
from lightning_batch.tracking import BufferedMLFlowLogger, ensure_store  # noqa: E402
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
            optimizer.zero_grad()
            loss = criterion(model(x[index]), y[index])
            loss.backward()
            optimizer.step()
            float(loss.detach())  # the loop reads the loss each step, as a user printing it would
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


def project_steps_per_second(dm: TabularDataModule, cfg: RunConfig, steps: int, uri: str) -> float:
    module = build_module(cfg, dm)  # logs per-step metrics every cfg.log_every steps
    logger = BufferedMLFlowLogger(experiment_name="overhead", tracking_uri=uri)
    trainer = training_only_trainer(max_steps=steps, logger=logger)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    logger.finalize("success")
    assert trainer.global_step == steps
    return steps / seconds


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
    for batch_size, log_every in ((32, 10), (1024, 10), (32, 1)):
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
        ours, plain = [], []
        project_steps_per_second(dm, cfg, 50, uri)  # warm-up: imports, first sqlite writes
        for _ in range(args.rounds):
            plain.append(plain_loop_steps_per_second(x, y, batch_size, args.steps))
            ours.append(project_steps_per_second(dm, cfg, args.steps, uri))
        ratios = [p / o for p, o in zip(plain, ours, strict=True)]
        results[f"B={batch_size}, log_every={log_every}"] = {
            "plain_steps_per_s": statistics.median(plain),
            "project_steps_per_s": statistics.median(ours),
            "slowdown_median": statistics.median(ratios),
            "slowdown_per_round": ratios,
        }
    print(
        f"{'setting':<22} {'plain loop steps/s':>19} {'lightning-batch steps/s':>24} {'slowdown (median)':>18}"
    )
    for name, r in results.items():
        print(
            f"{name:<22} {r['plain_steps_per_s']:>19.0f} {r['project_steps_per_s']:>24.0f} "
            f"{r['slowdown_median']:>17.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
