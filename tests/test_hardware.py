"""Placement options (--accelerator, --devices, --strategy, --num-nodes, --precision,
--device-data-budget): an impossible combination is one ``error:`` line and exit 2 before any MLflow
run exists; a possible one resolves as Lightning would and is recorded on the run.

GPUs are faked in-process (``torch.cuda.*`` patched), so these checks say the same on a machine
with or without one. The CLI cases run ``cli.main`` in-process (each a few milliseconds); one
subprocess of ``experiments/run.py`` checks the real exit status on this machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from lightning_batch import placement as hardware
from lightning_batch.cli import main
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.placement import Placement, resolve_placement

from .conftest import RUN_PY, subprocess_env


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """``machine(gpus=0, bf16=True, mps=False, node_rank=None)``: what torch sees, faked in-process."""

    def fake(gpus: int = 0, bf16: bool = True, mps: bool = False, node_rank: str | None = None) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake Tesla T4")
        monkeypatch.setattr(hardware, "_mps_available", lambda: mps)
        for name in hardware.NODE_RANK_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        if node_rank is not None:
            monkeypatch.setenv("NODE_RANK", node_rank)

    fake()
    return fake


def _assert_no_run(workdir: Path) -> None:
    """Nothing written: no MLflow database, or one without runs (read with MLflow's own client)."""
    db = workdir / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(experiments), "an impossible placement must not leave a run behind"


#: name -> (flags after ``train --data iris --epochs 1``, the faked machine, a fragment of the message)
IMPOSSIBLE: dict[str, tuple[list[str], dict, str]] = {
    "gpu without a GPU": (["--accelerator", "gpu"], {}, "--accelerator gpu, but torch sees no GPU"),
    "16-mixed on the CPU": (
        ["--accelerator", "cpu", "--precision", "16-mixed"],
        {},
        "--precision 16-mixed needs a CUDA GPU",
    ),
    "16-mixed where auto finds no GPU": (["--precision", "16-mixed"], {}, "16-mixed needs a CUDA GPU"),
    "bf16-mixed on a GPU without bf16": (
        ["--precision", "bf16-mixed"],
        {"gpus": 1, "bf16": False},
        "Fake Tesla T4 has no bfloat16 support; use --precision 16-mixed",
    ),
    "ddp with one device": (
        ["--accelerator", "cpu", "--strategy", "ddp"],
        {},
        "--strategy ddp needs more than one process",
    ),
    "ddp_spawn with one device": (
        ["--accelerator", "cpu", "--strategy", "ddp_spawn", "--devices", "1"],
        {},
        "--strategy ddp_spawn needs more than one process",
    ),
    "ddp with one GPU of one": (["--strategy", "ddp"], {"gpus": 1}, "needs more than one process"),
    "4 devices on 2 GPUs": (
        ["--accelerator", "gpu", "--devices", "4"],
        {"gpus": 2},
        "--devices 4, but torch sees 2 GPUs; pass --devices 2",
    ),
    "2 devices on the one GPU auto finds": (["--devices", "2"], {"gpus": 1}, "torch sees 1 GPU;"),
    "devices 0": (["--devices", "0"], {}, "--devices must be a positive integer or auto, got '0'"),
    "devices -1": (["--devices", "-1"], {}, "--devices must be a positive integer"),
    "devices abc": (["--devices", "abc"], {}, "--devices must be a positive integer or auto, got 'abc'"),
    "devices 2.5": (["--devices", "2.5"], {}, "--devices must be a positive integer"),
    "2 nodes without NODE_RANK": (
        ["--accelerator", "cpu", "--num-nodes", "2"],
        {},
        "--num-nodes 2 needs each node started with NODE_RANK",
    ),
    "0 nodes": (["--num-nodes", "0"], {}, "--num-nodes must be a positive integer"),
    "unknown accelerator": (
        ["--accelerator", "tpu"],
        {},
        "--accelerator must be one of auto|cpu|gpu|mps, got 'tpu'",
    ),
    "unknown strategy": (
        ["--strategy", "fsdp"],
        {},
        "--strategy must be one of auto|ddp|ddp_spawn, got 'fsdp'",
    ),
    "unknown precision": (
        ["--precision", "bf16"],
        {},
        "--precision must be one of 32-true|16-mixed|bf16-mixed, got 'bf16'",
    ),
    "accelerator names are exact": (
        ["--accelerator", "GPU"],
        {},
        "--accelerator must be one of auto|cpu|gpu|mps, got 'GPU'",
    ),
    "mps without MPS": (["--accelerator", "mps"], {}, "no Apple MPS device"),
    "mps on two devices": (
        ["--accelerator", "mps", "--devices", "2"],
        {"mps": True},
        "MPS trains on one device",
    ),
    "mixed precision on MPS": (
        ["--accelerator", "mps", "--precision", "bf16-mixed"],
        {"mps": True},
        "mixed precision on MPS",
    ),
    "device data budget 1.5": (["--device-data-budget", "1.5"], {}, "in [0, 1], got 1.5"),
    "device data budget below 0": (
        ["--device-data-budget", "-0.1"],
        {},
        "--device-data-budget must be in [0, 1], got -0.1",
    ),
    "device data budget nan": (
        ["--device-data-budget", "nan"],
        {},
        "--device-data-budget must be a number in [0, 1], got nan",
    ),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_an_impossible_placement_is_one_error_line_and_exit_2(
    case: str, machine, workdir: Path, capsys: pytest.CaptureFixture
):
    flags, faked, fragment = IMPOSSIBLE[case]
    machine(**faked)
    status = main(["train", "--data", "iris", "--epochs", "1", *flags])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    _assert_no_run(workdir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this check is about a machine without a GPU")
def test_run_py_train_on_a_gpu_this_machine_lacks_exits_2(workdir: Path):
    """The real thing, once: the process, this machine's torch, and nothing in the store."""
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "train", "--data", "iris", "--epochs", "1", "--accelerator", "gpu"],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        f"error: --accelerator gpu, but torch sees no GPU (torch {torch.__version__}, "
    )
    assert not (workdir / "mlruns").exists(), "no store, no run"


# -- in-process: resolve_placement and RunConfig.validate ----------------------------------------------


def test_bf16_on_a_gpu_without_bf16_is_refused_where_one_with_it_is_not(machine):
    machine(gpus=1, bf16=False)
    with pytest.raises(UserError, match=r"bf16-mixed, but Fake Tesla T4 has no bfloat16 support"):
        resolve_placement(RunConfig(precision="bf16-mixed"))
    with pytest.raises(UserError, match="no bfloat16 support"):
        resolve_placement(RunConfig(accelerator="gpu", precision="bf16-mixed"))
    assert resolve_placement(RunConfig(precision="16-mixed")).precision == "16-mixed"  # what it suggests
    assert resolve_placement(RunConfig(accelerator="cpu", precision="bf16-mixed")).precision == "bf16-mixed"
    machine(gpus=1, bf16=True)
    assert resolve_placement(RunConfig(precision="bf16-mixed")) == Placement(
        "gpu", 1, "auto", 1, "bf16-mixed"
    )


@pytest.mark.parametrize(
    ("faked", "options", "expected"),
    [
        ({}, {}, ("cpu", 1, "auto", 1, "32-true")),
        ({"gpus": 2}, {}, ("gpu", 1, "auto", 1, "32-true")),
        ({"gpus": 2}, {"devices": "auto"}, ("gpu", 2, "ddp", 1, "32-true")),
        ({"gpus": 2}, {"devices": 2, "strategy": "ddp_spawn"}, ("gpu", 2, "ddp_spawn", 1, "32-true")),
        ({"gpus": 4}, {"devices": "3", "precision": "16-mixed"}, ("gpu", 3, "ddp", 1, "16-mixed")),
        ({}, {"devices": "auto"}, ("cpu", 1, "auto", 1, "32-true")),
        ({}, {"accelerator": "cpu", "devices": 2}, ("cpu", 2, "ddp", 1, "32-true")),
        ({"gpus": 2}, {"accelerator": "cpu", "devices": 4}, ("cpu", 4, "ddp", 1, "32-true")),
        ({"node_rank": "1"}, {"accelerator": "cpu", "num_nodes": 2}, ("cpu", 1, "ddp", 2, "32-true")),
        ({"mps": True}, {}, ("mps", 1, "auto", 1, "32-true")),
        ({"gpus": 1, "mps": True}, {}, ("gpu", 1, "auto", 1, "32-true")),
    ],
)
def test_possible_placements_resolve_as_lightning_would(machine, faked, options, expected):
    machine(**faked)
    placement = resolve_placement(RunConfig(**options))
    assert placement == Placement(*expected)
    assert placement.trainer_options() == dict(
        zip(("accelerator", "devices", "strategy", "num_nodes", "precision"), expected, strict=True)
    )
    assert placement.world_size == expected[1] * expected[3]


def test_resolve_placement_checks_even_an_unvalidated_config(machine):
    """``resolve_placement`` is also called on configs that skipped validate(): it stands alone."""
    for options, fragment in [
        ({"devices": 0}, "--devices must be a positive integer"),
        ({"devices": True}, "--devices must be a positive integer"),
        ({"num_nodes": 0}, "--num-nodes must be a positive integer"),
        ({"num_nodes": 1.0}, "--num-nodes must be a positive integer"),
        ({"accelerator": "xla"}, "--accelerator must be one of"),
        ({"strategy": "deepspeed"}, "--strategy must be one of"),
        ({"precision": 16}, "--precision must be one of"),
    ]:
        with pytest.raises(UserError, match=fragment):
            resolve_placement(RunConfig(**options))


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"devices": True}, "--devices must be a positive integer"),
        ({"devices": 1.5}, "--devices must be a positive integer"),
        ({"devices": [0, 1]}, "--devices must be a positive integer"),
        ({"devices": "all"}, "--devices must be a positive integer"),
        ({"num_nodes": "2"}, "--num-nodes must be a positive integer"),
        ({"num_nodes": False}, "--num-nodes must be a positive integer"),
        ({"device_data_budget": float("inf")}, "--device-data-budget must be a number in [0, 1], got inf"),
        ({"device_data_budget": "half"}, "--device-data-budget must be a number in [0, 1], got 'half'"),
        ({"device_data_budget": 1.0000001}, "in [0, 1]"),
        ({"accelerator": None}, "--accelerator must be one of auto|cpu|gpu|mps, got None"),
        ({"precision": "16"}, "--precision must be one of 32-true|16-mixed|bf16-mixed, got '16'"),
    ],
)
def test_yaml_values_the_cli_cannot_give_are_refused_by_validate(options, fragment):
    with pytest.raises(UserError) as raised:
        RunConfig(**options).validate()
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_validate_accepts_the_edges():
    assert RunConfig(devices=" 2 ").validate().devices == 2  # YAML/CLI text becomes the int
    assert RunConfig(devices="auto").validate().devices == "auto"
    for budget in (0, 0.0, 1, 1.0):
        RunConfig(device_data_budget=budget).validate()


# -- a possible placement is recorded ----------------------------------------------------------------


def test_a_cpu_run_records_its_placement_as_params_and_the_machine_as_tags(workdir: Path, tracking_uri: str):
    from lightning_batch.training import train

    cfg = RunConfig(data="iris", epochs=1, tracking_uri=tracking_uri, experiment="placed")
    result = train(cfg)
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert {k: params[k] for k in ("accelerator", "devices", "strategy", "num_nodes", "precision")} == {
        "accelerator": "auto",
        "devices": "1",
        "strategy": "auto",
        "num_nodes": "1",
        "precision": "32-true",
    }
    assert float(params["device_data_budget"]) == cfg.device_data_budget
    # ...and what auto became on this machine.
    expected = "gpu" if torch.cuda.is_available() else "cpu"
    assert (params["accelerator_resolved"], params["devices_resolved"], params["world_size"]) == (
        expected,
        "1",
        "1",
    )
    tags = run.data.tags
    assert tags["device_name"].strip()
    assert tags["device_count"] == "1"
    assert tags["torch_version"] == torch.__version__
    assert tags["cuda_version"] == (torch.version.cuda or "none")
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_tune_refuses_several_devices_per_trial(machine, workdir: Path, capsys: pytest.CaptureFixture):
    """Lightning's DDP launcher would re-run the whole tuner per device: trials run side by side instead."""
    status = main(
        ["tune", "--data", "iris", "--epochs", "1", "--trials", "1", "--accelerator", "cpu", "--devices", "2"]
    )
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert "run.py tune trains each trial on one device" in lines[0] and "--workers K" in lines[0]
    _assert_no_run(workdir)
