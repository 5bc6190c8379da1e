"""Run ids as users type them: the whole 32-character id, or a unique prefix of at least 8 characters.

MLflow names a run by 32 hex digits, which people copy from a table and paste into ``--resume``,
``report`` and ``predict``. As git does with commit hashes, a prefix of at least
:data:`MIN_PREFIX` characters is enough when exactly one run starts with it; an ambiguous prefix is
one error line listing the candidates. Anything that is not a prefix (a whole id, a study name, a
model URI) is passed through unchanged for the caller to interpret.

>>> pick_run_id("6b8d55a3", ["6b8d55a3c3f143408a8a22f5f06986fb", "0123456789abcdef0123456789abcdef"], "here")
'6b8d55a3c3f143408a8a22f5f06986fb'
>>> pick_run_id("6b8d", ["6b8d55a3c3f143408a8a22f5f06986fb"], "here")  # too short to be a prefix
'6b8d'
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning_batch.errors import UserError

#: A whole MLflow run id.
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: The shortest prefix taken for a run id (git's default abbreviation is 7; 8 hex digits leave about one
#: chance in 4 billion that two runs share one).
MIN_PREFIX = 8
_PREFIX = re.compile(rf"^[0-9a-f]{{{MIN_PREFIX},31}}$")
#: Candidates named in the error line of an ambiguous prefix.
_LISTED = 10


def is_run_id_prefix(value: str) -> bool:
    """Whether ``value`` reads as the start of a run id (8 to 31 lowercase hex digits)."""
    return bool(_PREFIX.match(value))


def pick_run_id(value: str, run_ids: Iterable[str], where: str) -> str:
    """The one id of ``run_ids`` that ``value`` is a prefix of; ``value`` itself if it is no prefix
    or names none (the caller's "not found" applies); a UserError listing them if several match."""
    if not is_run_id_prefix(value):
        return value
    matches = sorted({run_id for run_id in run_ids if run_id.startswith(value)})
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        listed = ", ".join(matches[:_LISTED]) + (
            f" and {len(matches) - _LISTED} more" if len(matches) > _LISTED else ""
        )
        raise UserError(
            f"run id prefix {value!r} matches {len(matches)} runs in {where}: {listed}; type more of the id"
        )
    return value


def resolve_run_id(client: Any, value: str, where: str) -> str:
    """``value`` with a run id prefix completed from the runs of the store ``client`` reads (deleted
    runs and experiments included, as ``get_run`` finds those too)."""
    if not is_run_id_prefix(value):
        return value
    from mlflow.entities import ViewType

    experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiment_ids:
        return value
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"attributes.run_id LIKE '{value}%'",
        run_view_type=ViewType.ALL,
        max_results=1000,
    )
    return pick_run_id(value, (run.info.run_id for run in runs), where)


def resolve_checkpointed_run_id(checkpoints: Path, value: str) -> str:
    """``value`` with a prefix completed from the runs that have a checkpoint folder in ``checkpoints``.

    ``--resume`` needs that folder on every rank, and ranks other than 0 never open the tracking
    store: the folder names are what every rank can read.
    """
    if not is_run_id_prefix(value) or not checkpoints.is_dir():
        return value
    folders = (entry.name for entry in checkpoints.iterdir() if entry.is_dir() and RUN_ID.match(entry.name))
    return pick_run_id(value, folders, f"the checkpoints in {str(checkpoints)!r}")
