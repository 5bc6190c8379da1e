"""What measuring the gradient noise scale costs a training step, side by side in one run.

Three fits of the same model and data, alternating over rounds (medians reported): no callback;
``DynamicBatchSize(policy="fixed")`` with measurement off (``measure_every`` larger than the fit);
the same with measurement every ``--measure-every`` steps. The batch size never changes (policy
``fixed``, no memory probe), so the difference is the measurement itself: the per-example
gradient norms (every parameter of these models has a rule: the linear layers and, for
``--model cnn`` on the digits' 8×8 images, the convolutions), the unbiased estimate and the EMA
update. ``benchmarks/transformer_models.py overhead`` does the same for transformers.

    python benchmarks/noise_overhead.py [--batch 32 256] [--model linear|mlp|cnn] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from _common import training_only_trainer  # noqa: E402

from lightning_batch.config import RunConfig  # noqa: E402
from lightning_batch.plugin.callback import DynamicBatchSize  # noqa: E402
from lightning_batch.tabular.datamodule import TabularDataModule  # noqa: E402
from lightning_batch.training import build_module, quiet_lightning  # noqa: E402


def steps_per_second(dm: TabularDataModule, cfg: RunConfig, steps: int, measure_every: int | None) -> float:
    module = build_module(cfg, dm)
    callbacks = []
    if measure_every is not None:
        callbacks.append(
            DynamicBatchSize(
                policy="fixed",
                lr_rule="none",
                probe_memory=False,
                measure_every=measure_every,
                adjust_every=10**9,
                log_every=10**9,
            )
        )
    trainer = training_only_trainer(max_steps=steps, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--model", default="mlp", choices=["linear", "mlp", "cnn"])
    parser.add_argument("--measure-every", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    quiet_lightning()
    results = {}
    for batch in args.batch:
        data = (
            dict(data="digits", lr=0.1)
            if args.model == "cnn"
            else dict(data="synthetic-regression", rows=100_000, features=32, lr=0.01)
        )
        cfg = RunConfig(**data, batch_size=batch, model=args.model, hidden=[64, 64]).validate()
        dm = TabularDataModule(cfg)
        dm.setup()
        steps_per_second(dm, cfg, 50, args.measure_every)  # warm-up
        bare, off, on = [], [], []
        for _ in range(args.rounds):
            bare.append(steps_per_second(dm, cfg, args.steps, None))
            off.append(steps_per_second(dm, cfg, args.steps, 10**9))
            on.append(steps_per_second(dm, cfg, args.steps, args.measure_every))
        measurement = [o / m - 1 for o, m in zip(off, on, strict=True)]
        callback = [b / m - 1 for b, m in zip(bare, on, strict=True)]
        results[f"{args.model} B={batch}"] = {
            "steps_per_s_no_callback": statistics.median(bare),
            "steps_per_s_measurement_off": statistics.median(off),
            "steps_per_s_measuring": statistics.median(on),
            "measurement_overhead": statistics.median(measurement),
            "callback_overhead": statistics.median(callback),
        }
    print(
        f"{'setting':<14} {'no callback':>12} {'measure off':>12} {'measuring':>10} {'measurement cost':>17} "
        f"{'whole callback':>15}"
    )
    for name, r in results.items():
        print(
            f"{name:<14} {r['steps_per_s_no_callback']:>12.0f} {r['steps_per_s_measurement_off']:>12.0f} "
            f"{r['steps_per_s_measuring']:>10.0f} {r['measurement_overhead']:>16.1%} {r['callback_overhead']:>15.1%}"
        )
    print(
        f"(steps/s, medians of {args.rounds} alternating rounds; measuring every {args.measure_every} step(s))"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
