"""Cost that grows with the data: seconds of each phase and peak memory, from 10^4 to 10^7 rows.

For each size, a Parquet file of ``rows`` x ``features`` float32 columns and a float32 target
(y = x·w + 0.1·noise) is generated once, a chunk of 10^6 rows at a time, into a cache folder
(``--cache-dir``, default ``$TMPDIR/lightning-batch-scale``; never the repository), then one fresh
process per size runs the tabular path's phases in order and times each:

1. **read**: :func:`lightning_batch.tabular.sources.load_frame` (pyarrow, a block per column);
2. **clean**: :func:`lightning_batch.tabular.cleaning.clean_frame` (target checks, dropped rows);
3. **split_scale**: :func:`~lightning_batch.tabular.splitting.split_indices`, then the train-only preprocessing
   fit and each split's float32 matrix (:class:`~lightning_batch.tabular.preprocessing.Preprocessor`), as
   :func:`~lightning_batch.tabular.prepare.prepare_data` does in memory;
4. **record_input**: :func:`lightning_batch.tracking.datasets.log_dataset_input` into a throw-away sqlite
   MLflow store (creating the store and the run is not timed);
5. **fit**: one training epoch of the linear model at batch 1024 (``TaskModule`` +
   ``TabularDataModule`` + a plain ``Trainer``: no logger, checkpoints or validation);
6. **test**: ``Trainer.test`` on the test split.

Peak memory is measured per phase: ``/proc/self/clear_refs`` resets the kernel's high-water mark
(``VmHWM``, resident set incl. file-backed pages) before each phase and ``VmHWM`` is read after it;
the process's peak is the largest. ``baseline`` is the resident set after the imports.

Writes ``benchmarks/results/scale.json`` and ``docs/scale.png`` (seconds per phase and peak RSS
against rows on log-log axes, each line's slope in the legend), and prints the table for the
README. The goals it checks: every phase's log-log slope ≤ 1.1 (over all sizes and over the last
decade), fit seconds per row constant (past the fixed cost, i.e. the smallest size's fit: the largest
and smallest per-row figures within 1.5x), and peak RSS ≤ 3x the float32 table + the smallest size's
peak (the constant: Python, torch, Lightning, MLflow). torch runs 1 intra-op thread (``--threads``).

    python benchmarks/scale.py                       # 10^4, 10^5, 10^6, 10^7 rows
    python benchmarks/scale.py --rows 10000 100000   # a quick look
    python benchmarks/scale.py --memmap 30000000     # also the memory-mapped path past memory
    python benchmarks/scale.py --report-only         # table, summary and plot again from the JSON

Not part of ``make test``: 10^7 rows take a few minutes and ~3 GB of disk for the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("read", "clean", "split_scale", "record_input", "fit", "test")
DEFAULT_ROWS = (10_000, 100_000, 1_000_000, 10_000_000)
#: Rows per generated chunk (and per Parquet row group).
CHUNK_ROWS = 1_000_000
#: The goals of issue 15.
MAX_SLOPE = 1.1
MAX_FIT_PER_ROW_RATIO = 1.5
MAX_RSS_PER_TABLE = 3.0


# -- the data ----------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "lightning-batch-scale"


def parquet_for(cache_dir: Path, rows: int, features: int, seed: int = 0) -> Path:
    """The size's Parquet file, generated a chunk at a time on first use (the table is never held)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = cache_dir / f"scale-{rows}x{features}-seed{seed}.parquet"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp-{os.getpid()}")
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=features).astype(np.float32)
    schema = pa.schema([(f"x{j}", pa.float32()) for j in range(features)] + [("y", pa.float32())])
    with pq.ParquetWriter(partial, schema, compression="snappy") as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            x = rng.standard_normal((n, features), dtype=np.float32)
            y = x @ weights + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
            columns = [pa.array(x[:, j]) for j in range(features)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    partial.rename(path)  # complete or absent: a killed run leaves only a .tmp- file
    return path


# -- one size, in a fresh process --------------------------------------------------------------------


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (VmRSS, VmHWM, RssAnon...)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure_size(data: str, batch_size: int, workdir: Path, threads: int) -> dict[str, Any]:
    """The phases on ``data`` in this process: seconds and peak RSS of each."""
    started_imports = time.perf_counter()
    # mlflow.entities and sklearn.model_selection are imported here, not inside the first phase
    # that uses them: one-time costs, not per row.
    import lightning.pytorch as pl
    import mlflow.entities  # noqa: F401
    import numpy as np
    import sklearn.model_selection  # noqa: F401
    import torch
    from mlflow import MlflowClient

    from lightning_batch.config import RunConfig
    from lightning_batch.tabular.cleaning import clean_frame
    from lightning_batch.tabular.datamodule import TabularDataModule
    from lightning_batch.tabular.preprocessing import Preprocessor
    from lightning_batch.tabular.sources import load_frame
    from lightning_batch.tabular.splitting import split_indices
    from lightning_batch.tabular.tables import PreparedData, TensorTableDataset
    from lightning_batch.tracking.datasets import log_dataset_input
    from lightning_batch.tracking.store import ensure_store, get_or_create_experiment
    from lightning_batch.training import build_module, quiet_lightning

    quiet_lightning()
    if threads > 0:
        torch.set_num_threads(threads)
    imports_seconds = time.perf_counter() - started_imports
    cfg = RunConfig(data=data, target="y", model="linear", batch_size=batch_size, epochs=1).validate()
    uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    ensure_store(uri)
    client = MlflowClient(uri)
    run_id = client.create_run(get_or_create_experiment(uri, "scale")).info.run_id

    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    resets = _reset_peak()
    baseline = _status("VmRSS")
    peaks["imports"] = _status("VmHWM")
    state: dict[str, Any] = {}

    def phase(name: str, work: Any) -> None:
        _reset_peak()
        started = time.perf_counter()
        work()
        seconds[name] = time.perf_counter() - started
        peaks[name] = _status("VmHWM")

    def read() -> None:
        state["raw"] = load_frame(cfg)

    def clean() -> None:
        raw = state["raw"]
        state["clean"] = clean_frame(raw, cfg.task, cfg.max_categories)

    def split_scale() -> None:  # as data.prepare_data does in memory
        clean_table = state["clean"]
        labels = clean_table.target if clean_table.task == "classification" else None
        train_idx, val_idx, test_idx = split_indices(
            len(clean_table.target), labels, cfg.val_fraction, cfg.test_fraction, cfg.seed
        )
        features = clean_table.features.reset_index(drop=True)
        pre = Preprocessor.fit(features, rows=train_idx)

        def dataset(idx: np.ndarray) -> TensorTableDataset:
            x = torch.from_numpy(pre.transform(features, rows=idx))
            y = torch.from_numpy(clean_table.target[idx])
            return TensorTableDataset(x, y.unsqueeze(1) if clean_table.task == "regression" else y)

        raw = state["raw"]
        state["prepared"] = PreparedData(
            train=dataset(train_idx),
            val=dataset(val_idx),
            test=dataset(test_idx),
            task=clean_table.task,
            classes=clean_table.classes,
            preprocessor=pre,
            dropped_rows=clean_table.dropped_rows,
            source=clean_table.source,
            truth=clean_table.truth,
            raw_frame=raw.frame,
            target_column=raw.target,
        )

    def record_input() -> None:
        raw = state["raw"]
        log_dataset_input(client, run_id, raw.frame, raw.source, raw.target, Path(data).stem)

    def fit() -> None:
        dm = TabularDataModule(cfg)
        dm.prepared = state["prepared"]  # setup() keeps what is there
        dm.config = dm.config.replace(task=dm.prepared.task)
        module = build_module(cfg, dm)
        trainer = pl.Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            devices=1,
        )
        trainer.fit(module, datamodule=dm)
        state.update(dm=dm, module=module, trainer=trainer)

    def test() -> None:
        state["metrics"] = state["trainer"].test(state["module"], datamodule=state["dm"], verbose=False)

    phase("read", read)
    phase("clean", clean)
    phase("split_scale", split_scale)
    phase("record_input", record_input)
    phase("fit", fit)
    phase("test", test)
    client.set_terminated(run_id)
    prepared = state["prepared"]
    trainer = state["trainer"]
    return {
        "seconds": seconds,
        "imports_seconds": imports_seconds,
        "peak_rss_bytes": peaks,
        "peak_rss_bytes_process": max(peaks.values()),
        "peak_is_per_phase": resets,
        "baseline_rss_bytes": baseline,
        "rss_after_bytes": _status("VmRSS"),
        "train_rows": len(prepared.train),
        "steps": int(trainer.global_step),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "test_metrics": {k: float(v) for k, v in (state["metrics"] or [{}])[0].items()},
    }


# -- the driver ---------------------------------------------------------------------------------------


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(ys) on log(xs)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sxx


def machine() -> dict[str, Any]:
    import psutil

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
    }


def run_size(rows: int, features: int, batch_size: int, cache_dir: Path, threads: int) -> dict[str, Any]:
    """Generate (once) and measure one size in a fresh process."""
    started = time.perf_counter()
    path = parquet_for(cache_dir, rows, features)
    generated = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="scale-run-") as workdir:
        out = Path(workdir) / "out.json"
        command = [
            sys.executable,
            __file__,
            "--child",
            str(path),
            str(batch_size),
            workdir,
            str(out),
            str(threads),
        ]
        subprocess.run(command, check=True, cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)})
        result = json.loads(out.read_text())
    table = rows * (features + 1) * 4
    result.update(
        rows=rows,
        table_bytes_float32=table,
        parquet_bytes=path.stat().st_size,
        generate_seconds=generated,
        fit_microseconds_per_row=1e6 * result["seconds"]["fit"] / result["train_rows"],
    )
    return result


def summarise(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [s["rows"] for s in sizes]
    slopes = {p: slope(rows, [s["seconds"][p] for s in sizes]) for p in PHASES}
    last = {p: slope(rows[-2:], [s["seconds"][p] for s in sizes[-2:]]) for p in PHASES}
    rss = [s["peak_rss_bytes_process"] for s in sizes]
    constant = rss[0]  # the smallest size: the process without the table
    # Fit seconds per row past the fixed cost (Trainer start, first steps): the smallest size's fit
    # is that cost; each larger size's extra seconds over its extra training rows.
    first = sizes[0]
    per_row = {
        s["rows"]: 1e6
        * (s["seconds"]["fit"] - first["seconds"]["fit"])
        / (s["train_rows"] - first["train_rows"])
        for s in sizes[1:]
    }
    rss_ratio = [(s["peak_rss_bytes_process"] - constant) / s["table_bytes_float32"] for s in sizes[1:]]
    phase_slopes_ok = all(v is None or v <= MAX_SLOPE for v in [*slopes.values(), *last.values()])
    return {
        "slopes": slopes,
        "slopes_last_decade": last,
        "peak_rss_slope": slope(rows, rss),
        "peak_rss_slope_last_decade": slope(rows[-2:], rss[-2:]),
        "fit_microseconds_per_row_past_fixed_cost": per_row,
        "constant_rss_bytes": constant,
        "rss_above_constant_per_table_byte": dict(
            zip([s["rows"] for s in sizes[1:]], rss_ratio, strict=True)
        ),
        "goals": {
            "phase_slopes_at_most_1.1": phase_slopes_ok,
            "fit_seconds_per_row_constant": max(per_row.values()) / min(per_row.values())
            <= MAX_FIT_PER_ROW_RATIO
            if len(per_row) > 1
            else None,
            "peak_rss_at_most_3x_table_plus_constant": all(r <= MAX_RSS_PER_TABLE for r in rss_ratio)
            if rss_ratio
            else None,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    rows = [s["rows"] for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name in PHASES:
        values = [s["seconds"][name] for s in sizes]
        k, k_last = result["summary"]["slopes"][name], result["summary"]["slopes_last_decade"][name]
        left.loglog(rows, values, marker="o", label=f"{name} (slope {k:.2f}; last decade {k_last:.2f})")
    left.set_xlabel("rows")
    left.set_ylabel("seconds")
    left.set_title("seconds per phase")
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    gb = 1e9
    rss = [s["peak_rss_bytes_process"] / gb for s in sizes]
    table = [s["table_bytes_float32"] / gb for s in sizes]
    constant = result["summary"]["constant_rss_bytes"] / gb
    k = result["summary"]["peak_rss_slope"]
    k_last = result["summary"]["peak_rss_slope_last_decade"]
    right.loglog(rows, rss, marker="o", label=f"peak RSS (slope {k:.2f}; last decade {k_last:.2f})")
    right.loglog(
        rows, table, marker="s", linestyle="--", label=f"float32 table (slope {slope(rows, table):.2f})"
    )
    above = [r - constant for r in rss]
    k_above = slope(rows[1:], above[1:]) if all(a > 0 for a in above[1:]) else None
    if k_above is not None:  # two sizes or more past the smallest
        right.loglog(rows[1:], above[1:], marker="^", label=f"peak RSS - constant (slope {k_above:.2f})")
    limit = [3 * t + constant for t in table]
    right.loglog(rows, limit, linestyle=":", color="grey", label="goal: 3 x table + constant")
    right.set_xlabel("rows")
    right.set_ylabel("GB")
    right.set_title("peak resident memory of the process")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(
        f"{result['features']} float32 features, linear model, batch {result['batch_size']}: {result['machine']['cpu']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_markdown(result: dict[str, Any]) -> str:
    """The README's table."""
    head = "| rows | read | clean | split + scale | record input | fit (1 epoch) | test | peak RSS | float32 table |"
    lines = [head, "|" + "---|" * 9]
    for s in result["sizes"]:
        sec = s["seconds"]
        cells = [f"{s['rows']:,}"] + [f"{sec[p]:.2f} s" for p in PHASES]
        cells += [f"{s['peak_rss_bytes_process'] / 1e9:.2f} GB", f"{s['table_bytes_float32'] / 1e9:.3f} GB"]
        lines.append("| " + " | ".join(cells) + " |")
    summary = result["summary"]
    slopes = " | ".join(f"{summary['slopes'][p]:.2f}" for p in PHASES)
    lines.append(f"| log-log slope | {slopes} | {summary['peak_rss_slope']:.2f} | 1.00 |")
    return "\n".join(lines)


def run_memmap(rows: int, budget_gb: float) -> dict[str, Any] | None:
    """--memmap: the memory-mapped path past memory (benchmarks/scale_memmap.py), when it exists."""
    try:
        import lightning_batch.tabular.cache  # noqa: F401
        from benchmarks.scale_memmap import run_memmap_benchmark
    except ImportError:
        print("--memmap: the memory-mapped path is not available yet")
        return None
    # An absolute working folder (generated file, cache, store; removed afterwards), outside the repository.
    workdir = Path(tempfile.mkdtemp(prefix="scale-memmap-")).resolve()
    return run_memmap_benchmark(rows, int(budget_gb * 1e9), workdir=workdir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS), help="sizes to run")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the Parquet files are kept")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "scale.png")
    # Hook for the memory-mapped path (lightning_batch/tabular/cache.py, benchmarks/scale_memmap.py):
    # a table of ROWS rows trained with the in-memory budget set below its size.
    parser.add_argument(
        "--memmap", type=int, metavar="ROWS", help="also run the memory-mapped path at ROWS rows"
    )
    parser.add_argument("--memmap-budget-gb", type=float, default=2.0, help="in-memory budget for --memmap")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: a 32->1 linear step is too small "
        "to gain from more, and on a busy machine their spin-waits made a step 50x slower (12 ms, not 0.25)",
    )
    parser.add_argument("--report-only", action="store_true", help="redo summary, table and plot from --json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        data, batch_size, workdir, out, threads = args.child
        Path(out).write_text(json.dumps(measure_size(data, int(batch_size), Path(workdir), int(threads))))
        return 0

    if args.report_only:
        result = json.loads(args.json.read_text())
        result["summary"] = summarise(result["sizes"])
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, args.plot)
        print(table_markdown(result))
        print(json.dumps(result["summary"], indent=2))
        return 0
    cache_dir = args.cache_dir or default_cache_dir()
    sizes = []
    for rows in sorted(args.rows):
        print(f"{rows:,} rows ...", flush=True)
        size = run_size(rows, args.features, args.batch_size, cache_dir, args.threads)
        sizes.append(size)
        timing = ", ".join(f"{p} {size['seconds'][p]:.2f} s" for p in PHASES)
        print(f"  {timing}; peak RSS {size['peak_rss_bytes_process'] / 1e9:.2f} GB", flush=True)
    result: dict[str, Any] = {
        "features": args.features,
        "batch_size": args.batch_size,
        "torch_threads": args.threads,
        "machine": machine(),
        "sizes": sizes,
        "summary": summarise(sizes),
    }
    if args.memmap:
        result["memmap"] = run_memmap(args.memmap, args.memmap_budget_gb)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if len(sizes) > 1:
        plot(result, args.plot)
        print(table_markdown(result))
    print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
