"""Who owns a RUNNING MLflow run, and ending the runs whose owner died ("process lost").

A run ends FINISHED, FAILED or KILLED only if its own process gets to say so; one SIGKILLed, OOM-killed
or on a machine that lost power leaves it RUNNING for ever. So the process that owns a run (the one
that created it, or the one that resumed it; rank 0 under DDP) records itself in three run tags:

- ``lightning_batch.owner.host``: the machine's host name;
- ``lightning_batch.owner.machine``: its ``/etc/machine-id`` where it has one, so that two machines
  given the same host name (cloned images, default names) do not take each other's runs for theirs;
- ``lightning_batch.owner.pid``: the process id;
- ``lightning_batch.owner.started``: when that process started, so that a pid the kernel has since
  handed to another process is not mistaken for the owner. On Linux ``BOOT_ID/TICKS`` (the boot's id
  and the start time in clock ticks since boot, from ``/proc/<pid>/stat``: exact, and immune to
  clock changes); elsewhere psutil's ``create_time`` in seconds (compared to within a second).

:func:`reap_lost_runs` finds the RUNNING runs owned on this host (one ``search_runs`` query) and
ends FAILED those whose owner is gone (no such process, a zombie, or a process with the same pid
but another start), with the tags ``lightning_batch.process_lost`` (who noticed, when) and
``error`` (``process lost: ...`` and how to resume). Runs owned on other hosts, and runs without
owner tags (made before these tags, or by other tools), are never touched: nothing here can tell
whether their process lives. ``train`` and ``tune`` reap at start (:func:`reap_quietly`),
``run.py runs --reap`` on demand. A reaped run keeps its checkpoint folder, so ``--resume`` still
continues it; resuming claims it for the new process (:func:`claim_for_resume`; refused while a
live owner of this host trains it) and clears the error.

Examples:
    >>> owner = Owner.of_this_process()
    >>> owner.state()
    'alive'
    >>> Owner.from_tags(owner.tags()) == owner
    True
    >>> Owner(owner.host, owner.pid, "0/0").state()  # the same pid with another start: reused
    'gone'
    >>> Owner("some-other-machine", 1, None).state()
    'elsewhere'
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from lightning_batch.errors import UserError

OWNER_HOST_TAG = "lightning_batch.owner.host"
OWNER_PID_TAG = "lightning_batch.owner.pid"
OWNER_STARTED_TAG = "lightning_batch.owner.started"
OWNER_MACHINE_TAG = "lightning_batch.owner.machine"
#: Set when a run is reaped: ``pid P on HOST; noticed by pid Q at ISO-TIME``. Kept after a resume.
PROCESS_LOST_TAG = "lightning_batch.process_lost"
#: The tag a FAILED run carries its reason in (as ``training.mark_run_failed`` writes it).
ERROR_TAG = "error"
PROCESS_LOST = "process lost"

Liveness = Literal["alive", "gone", "elsewhere"]


def machine_id() -> str | None:
    """This machine's systemd/D-Bus machine id (stable across reboots, distinct per installation)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            value = Path(path).read_text().strip()
            if value:
                return value
    return None


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as the ``owner.started`` tag records it; None if it is not running.

    A zombie (killed, not yet waited for by its parent) counts as not running.

    >>> process_start(os.getpid()) == process_start(os.getpid()) is not None
    True
    """
    boot = _boot_id()
    if boot is not None:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # The command name (field 2) may hold spaces and parentheses: fields are counted after its ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, start_ticks = fields[0], fields[19]  # fields 3 and 22 of proc(5)
        return None if state in ("Z", "X") else f"{boot}/{start_ticks}"
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{process.create_time():.2f}"
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:  # it exists, owned by someone else; its start is unknown
        return ""


def _same_start(recorded: str, now: str) -> bool:
    if "/" in recorded or "/" in now:  # Linux BOOT_ID/TICKS: exact
        return recorded == now
    try:  # psutil's create_time, derived from the wall clock: within a second
        return abs(float(recorded) - float(now)) < 1.0
    except ValueError:
        return True  # unknown on one side: the pid alone decides


@dataclass(frozen=True)
class Owner:
    """The process that owns a run: host name, pid, and when that process started (None: unknown)."""

    host: str
    pid: int
    started: str | None
    machine: str | None = None

    @classmethod
    def of_this_process(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()), machine_id())

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Owner | None:
        """The owner a run's tags record; None for a run without them (or with a damaged pid)."""
        host, pid = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG)
        if not host or not pid or not pid.isdigit():
            return None
        return cls(host, int(pid), tags.get(OWNER_STARTED_TAG) or None, tags.get(OWNER_MACHINE_TAG) or None)

    def tags(self) -> dict[str, str]:
        """The run tags that record this owner."""
        tags = {OWNER_HOST_TAG: self.host, OWNER_PID_TAG: str(self.pid)}
        if self.started:
            tags[OWNER_STARTED_TAG] = self.started
        if self.machine:
            tags[OWNER_MACHINE_TAG] = self.machine
        return tags

    def state(self) -> Liveness:
        """``alive``, ``gone`` (this host, and no process of that pid and start), or ``elsewhere``."""
        if self.host != socket.gethostname():
            return "elsewhere"
        here = machine_id()
        if self.machine and here and self.machine != here:
            return "elsewhere"  # another machine with the same host name
        now = process_start(self.pid)
        if now is None:
            return "gone"
        if self.started and now and not _same_start(self.started, now):
            return "gone"  # the pid was reused by a process that started later
        return "alive"

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def owner_tags() -> dict[str, str]:
    """This process's owner tags, to pass when it creates a run."""
    return Owner.of_this_process().tags()


def claim_run(client: Any, run_id: str) -> None:
    """Make this process the owner of an existing run (a resume), before it is set RUNNING again.

    A ``process lost`` error left by :func:`reap_lost_runs` goes (the run is continuing); the
    ``lightning_batch.process_lost`` tag stays as its history.
    """
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
    error = client.get_run(run_id).data.tags.get(ERROR_TAG, "")
    if error.startswith(PROCESS_LOST):
        client.delete_tag(run_id, ERROR_TAG)


def experiment_names(client: Any) -> dict[str, str]:
    """Every experiment of the store by id, deleted ones included (their runs may still be RUNNING)."""
    from mlflow.entities import ViewType

    names: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
        names.update((e.experiment_id, e.name) for e in page)
        token = page.token
        if not token:
            return names


def _search(
    client: Any, ids: list[str], filter_string: str, order_by: list[str] | None = None, page: int = 1000
) -> Iterator[Any]:
    """Every run matching ``filter_string`` in experiments ``ids``, page by page."""
    token = None
    while ids:
        runs = client.search_runs(
            ids, filter_string=filter_string, max_results=page, order_by=order_by, page_token=token
        )
        yield from runs
        token = runs.token
        if not token:
            return


def running_runs_owned_here(client: Any, ids: Iterable[str] | None = None) -> list[Any]:
    """The RUNNING runs whose owner tags name this host (all experiments unless ``ids``): one query."""
    ids = list(experiment_names(client) if ids is None else ids)
    host = socket.gethostname()
    query = "attributes.status = 'RUNNING'"
    if "'" not in host:  # MLflow's filter grammar has no escape for a quote; such a host is filtered below
        query += f" and tags.`{OWNER_HOST_TAG}` = '{host}'"
    return [run for run in _search(client, ids, query) if run.data.tags.get(OWNER_HOST_TAG) == host]


def lost_owner(run: Any) -> Owner | None:
    """The owner of a RUNNING ``run`` if it is gone (so the run can never end by itself), else None."""
    owner = Owner.from_tags(run.data.tags)
    if run.info.status != "RUNNING" or owner is None or owner.state() != "gone":
        return None
    return owner


def claim_for_resume(tracking_uri: str, run_id: str) -> None:
    """Make this process the owner of ``run_id`` and set it RUNNING again, for ``--resume``; raise
    :class:`UserError` when a live process of this host owns it RUNNING already.

    Both under one lock beside a sqlite store: of two resumes started together, the second finds the
    run RUNNING under the first and is refused, instead of both training and writing one run. An
    owner on another host cannot be checked from here and is not refused (its machine may be gone
    for good).
    """
    from mlflow import MlflowClient

    from lightning_batch.locks import store_lock

    client = MlflowClient(tracking_uri)
    with store_lock(tracking_uri, "resume"):
        run = client.get_run(run_id)
        owner = Owner.from_tags(run.data.tags)
        if (
            run.info.status == "RUNNING"
            and owner is not None
            and owner.state() == "alive"
            and owner != Owner.of_this_process()
        ):
            raise UserError(
                f"run {run_id!r} is still being trained by {owner} (status RUNNING); stop that process "
                "(or let it finish) before --resume, or start a new run"
            )
        claim_run(client, run_id)  # first: a reaper must not see it RUNNING under its dead owner
        client.update_run(run_id, status="RUNNING")


def resume_hint(run: Any) -> str:
    """How to continue a lost run, by what kind of run it is."""
    tags = run.data.tags
    if tags.get("lightning_batch.role") == "study":
        return f"run.py tune --study {tags.get('optuna_study', '<name>')} continues the study"
    if "optuna_trial_number" in tags:
        return "the study retries its trial (its heartbeat went stale)"
    return f"resume it with: python experiments/run.py train --resume {run.info.run_id}"


def reap_lost_runs(client: Any, ids: Iterable[str] | None = None) -> list[Any]:
    """End FAILED every RUNNING run of this host whose owner is gone; the runs reaped (as read before).

    Each is read again just before it is ended, so a run another process claimed meanwhile (a
    resume) is left to it.
    """
    reaped = []
    me = Owner.of_this_process()
    noticed = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for run in running_runs_owned_here(client, ids):
        owner = lost_owner(run)
        if owner is None:
            continue
        fresh = client.get_run(run.info.run_id)
        if Owner.from_tags(fresh.data.tags) != owner or fresh.info.status != "RUNNING":
            continue
        from mlflow.entities import RunTag

        message = (
            f"{PROCESS_LOST}: {owner} is gone (killed, crashed or its machine restarted) and never "
            f"closed the run; {resume_hint(run)}"
        )
        client.log_batch(
            run.info.run_id,
            tags=[
                RunTag(ERROR_TAG, message),
                RunTag(PROCESS_LOST_TAG, f"{owner}; noticed by pid {me.pid} at {noticed}"),
            ],
        )
        client.set_terminated(run.info.run_id, "FAILED")
        reaped.append(run)
    return reaped


def reap_quietly(tracking_uri: str) -> list[str]:
    """:func:`reap_lost_runs` over the whole store for ``train``/``tune`` at start: never raises.

    A store that cannot be read here fails the run's own calls a moment later, with a better message.
    The ids reaped are also logged (a warning of logger ``lightning_batch``: one line on stderr by
    default), so whoever started this process learns that an earlier one died.
    """
    try:
        from mlflow import MlflowClient

        reaped = [run.info.run_id for run in reap_lost_runs(MlflowClient(tracking_uri))]
    except Exception:
        return []
    if reaped:
        logging.getLogger("lightning_batch").warning(
            "marked FAILED (process lost): %s; `run.py runs` lists them", ", ".join(reaped)
        )
    return reaped


#: Run states ``run.py runs --status`` accepts (MLflow's RunStatus names).
RUN_STATES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


def list_runs(
    client: Any, ids: list[str], status: str | None = None, limit: int = 50
) -> tuple[list[Any], bool]:
    """The newest ``limit`` runs of experiments ``ids`` (of one ``status`` if given), and whether there are more."""
    query = f"attributes.status = '{status}'" if status else ""
    runs: list[Any] = []
    for run in _search(client, ids, query, ["attributes.start_time DESC"], min(limit + 1, 1000)):
        if len(runs) == limit:
            return runs, True
        runs.append(run)
    return runs, False
