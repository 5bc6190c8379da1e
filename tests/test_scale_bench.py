"""The data-size benchmarks run end to end at small sizes, so they do not rot between their real
runs (10⁷ rows; 3·10⁷ past memory), which take minutes to hours and are not part of any suite.

The memory-mapped benchmark trains a float32 Parquet file through ``train`` twice: it found that
such a file failed its run at the model's logging (tests/test_model_export.py has the unit test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # two sizes, each in a fresh process: ~35 s
def test_scale_benchmark_times_every_phase_and_plots(tmp_path: Path):
    out, plot = tmp_path / "scale.json", tmp_path / "scale.png"
    done = _bench(
        "scale.py", "--rows", "10000", "20000", "--cache-dir", str(tmp_path / "files"),
        "--json", str(out), "--plot", str(plot), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [size["rows"] for size in report["sizes"]] == [10_000, 20_000]
    phases = {"read", "clean", "split_scale", "record_input", "fit", "test"}
    assert all(set(size["seconds"]) == phases for size in report["sizes"])
    assert all(size["seconds"]["fit"] > 0 and size["peak_rss_bytes_process"] > 0 for size in report["sizes"])
    assert plot.stat().st_size > 10_000


@pytest.mark.slow  # three training processes: ~55 s
def test_memmap_benchmark_trains_past_its_budget_from_the_cache_twice(tmp_path: Path):
    out = tmp_path / "memmap.json"
    done = _bench(
        "scale_memmap.py", "--rows", "200000", "--budget-gb", "0.01", "--workdir", "work",
        "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    first, second = report["first_run"], report["second_run"]
    assert first["memory_mapped"] is True, "the table over the budget trained from the data cache"
    assert "prepare" not in second["seconds"], "the second run read the cache the first one wrote"
    assert first["metrics"] == second["metrics"] and first["metrics"]["test_r2"] > 0.9
    assert not (tmp_path / "work").exists(), "the benchmark's folder is removed unless --keep"
