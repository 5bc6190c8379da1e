"""Past memory: a table larger than the in-memory budget trains from the memory-mapped data cache.

A Parquet file of ``rows`` x ``features`` float32 columns and a float32 target is generated in
10^6-row chunks (the generator never holds the table), then the real training path
(:func:`lightning_batch.training.train`: MLflow run on a sqlite store, checkpoints, validation and
test) trains one epoch on it with ``--data-memory-budget`` set so that the budget is
``budget_bytes``, below the table's size. Each run is a fresh process that samples ``RssAnon`` and
``RssFile`` from ``/proc/self/status`` every 10 ms:

1. **first run**: the table is over the budget, so it is streamed into the data cache (one column at a
   time, then row chunks), then trained from the memory-mapped files; peaks per phase;
2. **second run**: a new process reuses the cache (no preparation) and trains;
3. **constant**: the same path on a 10^5-row file, trained in memory: what the run costs without the
   table (Python, torch, Lightning, MLflow, sqlite) — the "constant" of ``budget + constant``.

The check: the peak anonymous memory of runs 1 and 2 stays under ``budget_bytes`` + run 3's peak.
The cache's pages are file-backed (``RssFile``): the page cache's, which the OS drops under pressure.

    python benchmarks/scale_memmap.py [--rows 30000000] [--features 32] [--budget-gb 2] [--json OUT]

``run_memmap_benchmark(rows, budget_bytes)`` is the same as a function (for benchmarks/scale.py).
Not part of ``make test``: at 3*10^7 rows it writes ~8 GB and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Rows per generated chunk (and per Parquet row group).
CHUNK_ROWS = 1_000_000


def generate_parquet(path: Path, rows: int, features: int, seed: int = 0) -> float:
    """y = x·w + 0.1·noise, x ~ N(0, 1), all float32, written a chunk at a time; returns seconds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=features).astype(np.float32)
    names = [f"x{i}" for i in range(features)]
    schema = pa.schema([(name, pa.float32()) for name in names] + [("y", pa.float32())])
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            x = rng.standard_normal((n, features), dtype=np.float32)
            y = x @ weights + np.float32(0.1) * rng.standard_normal(n, dtype=np.float32)
            columns = [pa.array(x[:, j]) for j in range(features)] + [pa.array(y)]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return time.perf_counter() - started


# -- the measured process ----------------------------------------------------------------------------


class MemorySampler:
    """Peak RssAnon / RssFile of this process, sampled every ``every`` seconds, per named phase."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    key, amount, _ = line.split()
                    values[key.rstrip(":")] = int(amount) * 1024
        return values

    def _record(self) -> None:
        now = self.read()
        peak = self.peaks.setdefault(self.phase, {})
        for key, value in now.items():
            peak[key] = max(peak.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            time.sleep(self.every)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def enter(self, phase: str) -> None:
        self._record()
        self.phase = phase
        self._record()

    def stop(self) -> dict[str, dict[str, int]]:
        self._record()
        self._stop.set()
        self._thread.join()
        return self.peaks


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured run (in a fresh process): optionally prepare first, then train one epoch."""
    sampler = MemorySampler().start()
    sampler.enter("imports")
    from lightning_batch.config import RunConfig
    from lightning_batch.tabular.cache import available_memory
    from lightning_batch.tabular.datamodule import TabularDataModule
    from lightning_batch.training import train

    available = available_memory()
    fraction = min(1.0, spec["budget_bytes"] / available) if spec["budget_bytes"] else 0.25
    cfg = RunConfig(
        data=spec["data"],
        target="y",
        epochs=1,
        batch_size=spec["batch_size"],
        data_memory_budget=fraction,
        tracking_uri=spec["tracking_uri"],
        experiment="scale-memmap",
        log_every=50,
        checkpoint_every=5000,
    ).validate()
    seconds: dict[str, float] = {}
    if spec["prepare_first"]:
        sampler.enter("prepare")
        started = time.perf_counter()
        dm = TabularDataModule(cfg)
        dm.setup()
        seconds["prepare"] = time.perf_counter() - started
        memory_mapped = dm.prepared is not None and dm.prepared.raw_frame is None
        del dm
    sampler.enter("train")
    started = time.perf_counter()
    result = train(cfg, verbose=False, progress_bar=False)
    seconds["train"] = time.perf_counter() - started
    peaks = sampler.stop()
    return {
        "available_bytes": available,
        "data_memory_budget": fraction,
        "budget_bytes": int(fraction * available),
        "seconds": seconds,
        "peaks": peaks,
        "memory_mapped": memory_mapped if spec["prepare_first"] else None,
        "metrics": {k: v for k, v in result.metrics.items() if k in ("val_loss", "test_loss", "test_r2")},
        "max_rss_bytes": _maxrss(),
    }


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    spec_file, out_file = folder / "spec.json", folder / "out.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, __file__, "--child", str(spec_file), str(out_file)], check=True, env=env, cwd=folder
    )
    return json.loads(out_file.read_text())


def run_memmap_benchmark(
    rows: int,
    budget_bytes: int,
    *,
    features: int = 32,
    batch_size: int = 1024,
    workdir: str | Path | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Generate the table, train it past memory twice and once small; the figures as a dict."""
    # Absolute: each measurement runs in a child process whose working directory is this folder.
    base = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="scale-memmap-", dir="."))
    ).resolve()
    base.mkdir(parents=True, exist_ok=True)
    try:
        data = base / f"table-{rows}x{features}.parquet"
        generate_seconds = generate_parquet(data, rows, features) if not data.exists() else 0.0
        small = base / f"table-100000x{features}.parquet"
        if not small.exists():
            generate_parquet(small, 100_000, features)
        store = f"sqlite:///{(base / 'mlruns' / 'mlflow.db').resolve()}"
        common = {"tracking_uri": store, "batch_size": batch_size}
        first = _measure(
            {**common, "data": str(data.resolve()), "budget_bytes": budget_bytes, "prepare_first": True}, base
        )
        second = _measure(
            {**common, "data": str(data.resolve()), "budget_bytes": budget_bytes, "prepare_first": False},
            base,
        )
        constant = _measure(
            {**common, "data": str(small.resolve()), "budget_bytes": 0, "prepare_first": True}, base
        )
        cache = base / "mlruns" / "data-cache"
        constant_anon = max(p["RssAnon"] for p in constant["peaks"].values())
        table_bytes = rows * (features + 1) * 4

        def peak(run: dict[str, Any], phase: str) -> int:
            return run["peaks"].get(phase, {}).get("RssAnon", 0)

        limit = first["budget_bytes"] + constant_anon
        return {
            "rows": rows,
            "features": features,
            "batch_size": batch_size,
            "table_bytes_float32": table_bytes,
            "parquet_bytes": data.stat().st_size,
            "cache_bytes": sum(f.stat().st_size for f in cache.rglob("*.npy")),
            "generate_seconds": generate_seconds,
            "budget_bytes": first["budget_bytes"],
            "available_bytes": first["available_bytes"],
            "constant_anon_bytes": constant_anon,
            "limit_bytes": limit,
            "first_run": first,
            "second_run": second,
            "constant_run": constant,
            "peak_anon_prepare": peak(first, "prepare"),
            "peak_anon_train_first": peak(first, "train"),
            "peak_anon_train_second": peak(second, "train"),
            "peak_file_train_second": second["peaks"].get("train", {}).get("RssFile", 0),
            "under_limit": max(peak(first, "prepare"), peak(first, "train"), peak(second, "train")) <= limit,
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _gb(value: float) -> str:
    return f"{value / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--budget-gb", type=float, default=2.0, help="in-memory budget (below the table)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--workdir", help="where the file, cache and store go (default: a temporary folder here)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(_child(spec)))
        return 0
    out = run_memmap_benchmark(
        args.rows,
        int(args.budget_gb * 1e9),
        features=args.features,
        batch_size=args.batch_size,
        workdir=args.workdir,
        keep=args.keep,
    )
    print(
        f"{out['rows']:,} rows x {out['features']} float32 features: table {_gb(out['table_bytes_float32'])}, "
        f"budget {_gb(out['budget_bytes'])}, constant {_gb(out['constant_anon_bytes'])}"
    )
    first, second = out["first_run"], out["second_run"]
    print(
        f"first run:  prepare {first['seconds']['prepare']:.0f} s (peak RssAnon {_gb(out['peak_anon_prepare'])}), "
        f"train {first['seconds']['train']:.0f} s (peak RssAnon {_gb(out['peak_anon_train_first'])})"
    )
    print(
        f"second run: train {second['seconds']['train']:.0f} s (peak RssAnon {_gb(out['peak_anon_train_second'])}, "
        f"RssFile {_gb(out['peak_file_train_second'])})"
    )
    print(f"limit budget + constant {_gb(out['limit_bytes'])}: {'under' if out['under_limit'] else 'OVER'}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
