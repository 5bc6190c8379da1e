"""Should a run with no flags use ``--batch-size auto``? The defaults at B=32 against ``auto``.

For each bundled set and model (linear/softmax and mlp), one run with the defaults (the lr found by
the range test, early stopping) at B=32 and one at ``--batch-size auto`` (the callback's policy,
probing memory and measuring the noise scale), side by side, the same seeds: the test metric
(accuracy, r² for diabetes) and the wall seconds of the whole run. Prints a Markdown table of
medians and the ratio auto / 32 of the seconds.

    python benchmarks/default_batch.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from lightning_batch.config import RunConfig
from lightning_batch.training import train

SETS = ("diabetes", "wine", "iris", "breast_cancer", "digits")


def one_run(data: str, model: str | None, batch: int | str, seed: int, uri: str) -> tuple[float, float]:
    """(test metric, seconds) of one run with the defaults but ``batch``."""
    started = time.perf_counter()
    result = train(
        RunConfig(data=data, model=model, batch_size=batch, seed=seed, tracking_uri=uri), progress_bar=False
    )
    metric = result.metrics.get("test_acc", result.metrics.get("test_r2", float("nan")))
    return float(metric), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        for data in args.sets:
            for model in (None, "mlp"):  # None: linear or softmax, by the task
                results: dict[str, list[tuple[float, float]]] = {"32": [], "auto": []}
                for seed in args.seeds:
                    for batch in (32, "auto"):  # side by side: the machine's load hits both alike
                        results[str(batch)].append(one_run(data, model, batch, seed, uri))
                fixed = [statistics.median(v) for v in zip(*results["32"], strict=True)]
                auto = [statistics.median(v) for v in zip(*results["auto"], strict=True)]
                rows.append((data, model or "linear/softmax", fixed, auto))
    print("| data | model | metric B=32 | metric auto | seconds B=32 | seconds auto | auto / 32 |")
    print("|---|---|---|---|---|---|---|")
    for data, model, fixed, auto in rows:
        print(
            f"| {data} | {model} | {fixed[0]:.3f} | {auto[0]:.3f} | {fixed[1]:.1f} | {auto[1]:.1f} "
            f"| {auto[1] / fixed[1]:.2f} |"
        )


if __name__ == "__main__":
    main()
