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
    assert report["sync"] == {"skipped": "no CUDA device"}
    ttt = report["time_to_target"]
    assert "error" not in ttt, ttt
    methods = [row["method"] for row in ttt["summary"]]
    assert any(m.startswith("auto") for m in methods) and any(
        m.startswith("BatchSizeFinder") for m in methods
    )
    assert all(row["steps_per_s"] > 0 for row in ttt["summary"])
    assert set(ttt["targets"]) == {"best_any_x1.05", "best_fixed_x1.05"}
    for race in ttt["targets"].values():
        assert [row["method"] for row in race["runs"]] == methods
        for row in race["runs"]:  # a run that reached the target did so at a loss at or under it
            if row["seconds_to_target"] is not None:
                curve = ttt["curves"][row["method"]]
                assert any(
                    s == row["seconds_to_target"] and loss <= race["target_val_loss"] for s, _, loss in curve
                )
        if race["best_fixed"] is not None:
            oracle = next(row for row in race["runs"] if row["method"] == race["best_fixed"])
            assert oracle["x_best_fixed"] == 1.0
    assert ttt["targets"]["best_fixed_x1.05"]["best_fixed"] is not None, (
        "the best fixed run reaches 1.05x its own best"
    )
    placement = report["data_placement"]
    assert "error" not in placement, placement
    assert placement["B=64"]["on_device"]["placement"] == "host"  # no accelerator: the tables stay put
    assert {"on_device", "on_device_host_index", "host_copied"} <= set(placement["B=64"])
    main_path = report["main_path"]
    assert main_path["equal"] is True, main_path
    assert main_path["on_device"]["placement"] == "host" and main_path["on_device"]["index_device"] == "None"
