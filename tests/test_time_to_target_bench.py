"""Smoke test of ``benchmarks/time_to_target.py --quick``: the report's structure, and the plain loop
against the project at the same (B, lr, seed). No timing is asserted: which runs reach the target
within the quick budget depends on the machine, so every check below holds whatever they did."""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    """The benchmark script as a module (it is not a package member); in-process, so the test does
    not pay a second import of Lightning. One torch thread while it runs: on a shared 2-core machine
    two threads wait on each other (a 65-step run took 6x longer), and nothing here is timed."""
    spec = importlib.util.spec_from_file_location("time_to_target", ROOT / "benchmarks" / "time_to_target.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def quick_report(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ttt") / "report.json"
    (report,) = bench.main(["--quick", "--task", "regression", "--json", str(out)])
    assert out.exists()
    return report


@pytest.mark.slow  # every method of the quick benchmark: ~15 s
def test_quick_report_has_every_method_and_both_oracles(bench: ModuleType, quick_report: dict) -> None:
    names = [row["method"] for row in quick_report["rows"]]
    assert names[0].startswith("seed (B=32")
    assert any(name.startswith("BatchSizeFinder") for name in names)
    assert {"policy memory", "policy noise", "auto (goodput)", "policy schedule"} <= set(names)
    assert names[-2:] == ["plain-loop oracle", "Lightning oracle"]
    assert quick_report["seeds"] == 1
    grid = {(b, lr) for b in bench.QUICK.batches for lr in bench.QUICK.lrs}
    for framework in ("plain", "lightning"):
        tried = {(r["batch_size"], r["lr"]) for r in quick_report["runs"] if r["framework"] == framework}
        assert grid <= tried, f"{framework} grid incomplete: {grid - tried}"
    for row in quick_report["rows"]:
        assert 0 <= row["seeds_reached"] <= row["seeds"] == 1
        for measure in ("seconds", "samples"):
            reached = row[measure] is not None
            assert reached == (row["seeds_reached"] == 1)  # one seed: the median is that seed's
            for oracle in ("plain", "lightning"):
                ratio = row[f"{measure}_vs_{oracle}_oracle"]
                assert ratio is None or (ratio > 0 and math.isfinite(ratio))
    for run in quick_report["runs"]:
        assert run["reached"] == (run["seconds"] is not None) == (run["samples"] is not None)
        assert not (run["reached"] and run["pruned"])
        # A diverged evaluation's loss is written as null (JSON has no NaN): never at the target.
        at_target = [p for p in run["points"] if p[2] is not None and p[2] <= quick_report["target"]]
        if run["points"]:  # losing grid runs keep only their summary
            assert (at_target[0][:2] if at_target else (None, None)) == (run["seconds"], run["samples"])


def test_plain_loop_and_project_take_the_same_steps(bench: ModuleType) -> None:
    """Same weights, same row order, same SGD: the same validation loss at every evaluation, hence
    the same samples to the target (the budget is only a safety net; the target is reached by
    samples, about 65 steps of B=2048)."""
    data = bench.load_task("regression")
    ours = bench.run_lightning(data, bench.grid_method(2048, 0.1), seed=1, cap_s=120.0, budget_s=120.0)
    plain = bench.run_plain(data, 2048, 0.1, seed=1, cap_s=120.0, budget_s=120.0)
    check = bench.paired(ours, plain)
    assert ours["reached"] and plain["reached"]
    assert 0.5 <= check["samples_ratio"] <= 2.0
    assert check["common_evaluations"] >= 2
    assert check["max_loss_gap"] < 1e-4
