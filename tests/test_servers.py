"""Every server the project starts listens on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from .conftest import RUN_PY, free_port, stop_process_tree, subprocess_env, wait_for


def _listening_addresses(process: psutil.Process, port: int) -> set[str]:
    """The local addresses on ``port`` that ``process`` or its children listen on."""
    pids = {process.pid, *(child.pid for child in process.children(recursive=True))}
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid in pids
    }


@pytest.mark.slow  # CI runs the slow suite after `make test` (.ci/run)
@pytest.mark.parametrize("command", ["ui", "dashboard"])
def test_servers_bind_to_loopback_by_default(workdir: Path, command: str):
    if command == "dashboard":
        (workdir / "mlruns").mkdir()
        optuna.create_study(study_name="s", storage=f"sqlite:///{workdir}/mlruns/optuna.db")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(RUN_PY), command, "--port", str(port)],
        cwd=workdir,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/", 120)
        deadline = time.monotonic() + 10
        addresses: set[str] = set()
        while not addresses and time.monotonic() < deadline:
            addresses = _listening_addresses(psutil.Process(server.pid), port)
            time.sleep(0.2)
        assert addresses == {"127.0.0.1"}, addresses
    finally:
        stop_process_tree(server)


def test_dashboard_without_studies_is_a_one_line_error(workdir: Path):
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "dashboard"],
        cwd=workdir,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no studies yet")
