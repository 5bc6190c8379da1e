"""Which batch should a run with no flags use? The defaults at B=32 against the policies.

For each bundled set and model (linear/softmax and mlp), one run with the defaults (the lr found by
the range test, early stopping) per variant, side by side, the same seeds:

- ``32``: the seed's fixed B=32;
- ``goodput``: ``--batch-size auto --policy goodput`` (throughput x statistical efficiency; its
  throughput model reads measured step times);
- ``noise``: ``--batch-size auto --policy noise --measure-every 4`` (B_noise from gradient statistics
  only, measured every 4 steps rather than by a share of the clock).

It prints a Markdown table of medians: the test metric (accuracy, r² for diabetes), the wall
seconds of the whole run, the ratio to B=32, and with ``--repeat`` whether a second run of the same
command and seed trained the same batch sequence to the same metric (``same``) or not.

    python benchmarks/default_batch.py --seeds 0 1 2 --repeat
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

from lightning_batch.config import RunConfig
from lightning_batch.training import train

SETS = ("diabetes", "wine", "iris", "breast_cancer", "digits")
VARIANTS: dict[str, dict[str, Any]] = {
    "32": {"batch_size": 32},
    "goodput": {"batch_size": "auto", "policy": "goodput"},
    "noise": {"batch_size": "auto", "policy": "noise", "measure_every": 4},
}


def one_run(
    data: str, model: str | None, options: dict[str, Any], seed: int, uri: str
) -> tuple[float, float, tuple]:
    """(test metric, seconds, what must repeat) of one run with the defaults but ``options``."""
    started = time.perf_counter()
    result = train(
        RunConfig(data=data, model=model, seed=seed, tracking_uri=uri, **options), progress_bar=False
    )
    metric = float(result.metrics.get("test_acc", result.metrics.get("test_r2", float("nan"))))
    fingerprint = (round(metric, 6), result.batch_size_start, result.batch_size_end, result.samples_seen)
    return metric, time.perf_counter() - started, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--models", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeat", action="store_true", help="run each twice: is the result the same?")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for data in args.sets:
            for model in args.models:
                net = None if model == "linear" else model  # None: linear or softmax, by the task
                metrics: dict[str, list[float]] = {v: [] for v in args.variants}
                seconds: dict[str, list[float]] = {v: [] for v in args.variants}
                same: dict[str, list[bool]] = {v: [] for v in args.variants}
                for seed in args.seeds:
                    for variant in args.variants:  # side by side: the machine's load hits all alike
                        metric, took, fingerprint = one_run(data, net, VARIANTS[variant], seed, uri)
                        metrics[variant].append(metric)
                        seconds[variant].append(took)
                        if args.repeat:
                            same[variant].append(
                                one_run(data, net, VARIANTS[variant], seed, uri)[2] == fingerprint
                            )
                rows.append((data, model, metrics, seconds, same))
    head = ["data", "model"]
    for variant in args.variants:
        head += [f"metric {variant}", f"s {variant}"]
        head += [f"{variant} / 32"] if variant != "32" and "32" in args.variants else []
        head += [f"{variant} same"] if args.repeat else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for data, model, metrics, seconds, same in rows:
        cells = [data, model]
        base = statistics.median(seconds["32"]) if "32" in seconds else None
        for variant in args.variants:
            took = statistics.median(seconds[variant])
            cells += [f"{statistics.median(metrics[variant]):.3f}", f"{took:.1f}"]
            cells += [f"{took / base:.2f}"] if variant != "32" and base else []
            cells += [f"{sum(same[variant])}/{len(same[variant])}"] if args.repeat else []
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
