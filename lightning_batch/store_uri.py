"""Where the MLflow store is, without importing Lightning or MLflow.

:mod:`lightning_batch.tracking` re-exports these; commands that only read the store
(``run.py runs``) import them from here, and so skip Lightning's import (seconds on a small CPU).

Examples:
    >>> resolve_tracking_uri("sqlite:///tmp/x.db"), sqlite_path("sqlite:///mlruns/mlflow.db")
    ('sqlite:///tmp/x.db', PosixPath('mlruns/mlflow.db'))
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

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


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (``scheme://user:password@host/...``).

    >>> has_password("postgresql://me:secret@db/optuna"), has_password("postgresql://me@db/optuna")
    (True, False)
    """
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


#: The redacted URLs warned about, space-separated: in the environment, so that the processes a
#: command starts (tuning workers, DDP ranks) do not repeat the warning.
_WARNED_ENV = "LIGHTNING_BATCH_PASSWORD_URLS_WARNED"


def warn_if_password(url: str, what: str) -> None:
    """One line on stderr (once per URL, for a command and the processes it starts) when ``url``
    carries a password.

    The URL still works; but a password there ends up in ``ps``, shell histories and anything that
    prints the URL unredacted. Each tool has a place for it instead. MLflow's client is also told
    not to print its "View run at URL" lines, which would show the password in full.
    """
    if not has_password(url):
        return
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    warned = os.environ.get(_WARNED_ENV, "").split()
    if redact(url) in warned:
        return
    os.environ[_WARNED_ENV] = " ".join([*warned, redact(url)])
    scheme = urlsplit(url).scheme
    instead = (
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
        if scheme.startswith("http")
        else "put it in PGPASSWORD or a .pgpass file (PGPASSFILE) instead"
    )
    print(f"warning: {what} {redact(url)} carries a password; {instead}", file=sys.stderr, flush=True)
