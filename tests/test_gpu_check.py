"""The prepared GPU check runs on the lent GPU machines' stack: torch and Lightning, no MLflow,
Optuna or psutil. Here (no GPU) its CUDA sections are skipped and the others run small on the CPU,
in a process where those three packages cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

BLOCK_AND_RUN = """
import runpy, sys
for name in ("mlflow", "optuna", "psutil"):
    sys.modules[name] = None  # import fails as if the package were not installed
sys.argv = ["gpu_check.py", "--smoke", "--out", sys.argv[1]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
loaded = sorted(m for m in ("mlflow", "optuna", "psutil") if sys.modules.get(m) is not None)
assert not loaded, loaded
"""


@pytest.mark.slow  # the whole GPU check's CPU path in a fresh process: ~45 s; CI runs the slow suite after `make test`
def test_gpu_check_runs_without_mlflow_optuna_or_psutil(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-c", BLOCK_AND_RUN, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["probe"] == {"skipped": "no CUDA device"}
    assert report["oom"] == {"skipped": "no CUDA device"}
    ttt = report["time_to_target"]
    assert "error" not in ttt, ttt
    methods = [row["method"] for row in ttt["summary"]]
    assert any(m.startswith("auto") for m in methods) and any(
        m.startswith("BatchSizeFinder") for m in methods
    )
    assert all(row["steps_per_s"] > 0 for row in ttt["summary"])
    placement = report["data_placement"]
    assert "error" not in placement, placement
    assert placement["B=64"]["on_device"]["placement"] == "host"  # no accelerator: the tables stay put
