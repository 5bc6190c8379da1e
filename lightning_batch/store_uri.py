"""Where the MLflow store is, without importing Lightning or MLflow.

:mod:`lightning_batch.tracking` re-exports these; commands that only read the store
(``run.py runs``) import them from here, and so skip Lightning's import (seconds on a small CPU).

Examples:
    >>> resolve_tracking_uri("sqlite:///tmp/x.db"), sqlite_path("sqlite:///mlruns/mlflow.db")
    ('sqlite:///tmp/x.db', PosixPath('mlruns/mlflow.db'))
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the project's sqlite store."""
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory), else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def redact(url: str) -> str:
    """A store or storage URL without its password, fit for logs, tags and error lines.

    >>> redact("postgresql://me:secret@db:5432/optuna"), redact("sqlite:///mlruns/mlflow.db")
    ('postgresql://me:***@db:5432/optuna', 'sqlite:///mlruns/mlflow.db')
    """
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
