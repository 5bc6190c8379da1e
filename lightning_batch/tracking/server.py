"""The team's MLflow tracking server, started the safe way: ``run.py server``.

What "safe" means here, and why each piece is MLflow's own rather than written here:

- **Authentication is always on.** MLflow's basic-auth app (``mlflow server --app-name
  basic-auth``) checks every REST call and UI page against its users database, which lives beside
  the store (``basic_auth.db`` next to a sqlite store; the same PostgreSQL database as a PostgreSQL
  store, in tables of its own). Authenticated users read every experiment (``default_permission =
  READ``: a team shares a server to compare runs) and change only their own: whoever creates an
  experiment owns it, as MLflow's basic-auth does.
- **No secret is ever on a command line, in a URL or in a world-readable file.** The admin password
  is generated on first start and written to ``server/admin.password`` (mode 0600); the start-up
  lines say where it is, never what it is. It reaches MLflow through ``MLFLOW_AUTH_ADMIN_PASSWORD``
  in the server's environment, as does the Flask session key (``server/secret.key``, 0600). A
  PostgreSQL store's password comes from ``PGPASSWORD`` or a ``.pgpass`` file (``PGPASSFILE``),
  which libpq reads itself; the URL carries none.
- **Loopback unless told otherwise.** ``--host`` defaults to 127.0.0.1. ``--insecure`` turns
  authentication off for a lab that wants that, says so on every start-up line, and is refused
  for any address that is not loopback.
- **Artifacts go through the server** (``--serve-artifacts``): clients need no shared filesystem.

Clients authenticate the way MLflow's own client reads credentials: ``MLFLOW_TRACKING_USERNAME``
and ``MLFLOW_TRACKING_PASSWORD`` in their environment.

Examples:
    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost"), is_loopback("0.0.0.0")
    (True, True, True, False)
"""

from __future__ import annotations

import configparser
import getpass
import ipaddress
import os
import secrets
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from lightning_batch.errors import UserError
from lightning_batch.store_uri import redact, sqlite_path
from lightning_batch.tracking.store import DEFAULT_STORE_DIR, ensure_store

#: The admin user MLflow's basic-auth app creates on its first start.
ADMIN_USER = "admin"
#: MLflow refuses shorter passwords (``mlflow.utils.validation._validate_password``).
MIN_PASSWORD_LENGTH = 12


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1 or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerFiles:
    """Where a server keeps what is not the store: its folder (0700), the auth config, the secrets."""

    folder: Path
    store_uri: str

    @classmethod
    def for_store(cls, store_uri: str) -> ServerFiles:
        """``server/`` beside a sqlite store's database; ``mlruns/server/`` for any other store."""
        db = sqlite_path(store_uri)
        base = db.parent if db is not None else DEFAULT_STORE_DIR
        return cls(base / "server", store_uri)

    @property
    def admin_password(self) -> Path:
        return self.folder / "admin.password"

    @property
    def secret_key(self) -> Path:
        return self.folder / "secret.key"

    @property
    def auth_config(self) -> Path:
        return self.folder / "basic_auth.ini"

    @property
    def auth_db_uri(self) -> str:
        """The users and permissions database: ``basic_auth.db`` beside a sqlite store, else the store's own."""
        db = sqlite_path(self.store_uri)
        if db is not None:
            return f"sqlite:///{(db.parent / 'basic_auth.db').resolve()}"
        return self.store_uri

    @property
    def artifacts(self) -> Path:
        db = sqlite_path(self.store_uri)
        return (db.parent if db is not None else DEFAULT_STORE_DIR) / "artifacts"


def _write_secret(path: Path, value: str) -> None:
    """Write ``value`` to a new file that only its owner can read or write (mode 0600 from the
    start: never a moment where the file exists with wider permissions)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")


def _read_or_create_secret(path: Path, nbytes: int) -> tuple[str, bool]:
    """The secret in ``path``, made (``secrets.token_urlsafe``) if missing; and whether it was made."""
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise UserError(
                f"{str(path)!r} is readable by others (mode {path.stat().st_mode & 0o777:o}); "
                f"run `chmod 600 {path}` and start again"
            )
        return path.read_text().strip(), False
    value = secrets.token_urlsafe(nbytes)
    _write_secret(path, value)
    return value, True


def prepare_server_files(files: ServerFiles) -> tuple[dict[str, str], bool]:
    """The server's folder, auth config and secrets, made where missing.

    Returns the environment the MLflow server needs (config path, session key, and the admin
    password for the first start) and whether the admin password was generated now.
    """
    files.folder.mkdir(parents=True, exist_ok=True)
    files.folder.chmod(0o700)
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": files.auth_db_uri,
        "admin_username": ADMIN_USER,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    with files.auth_config.open("w") as handle:  # no secret in it: rewritten on every start
        config.write(handle)
    password, created = _read_or_create_secret(files.admin_password, 24)
    secret_key, _ = _read_or_create_secret(files.secret_key, 32)
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(files.auth_config.resolve()),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key,
        # Read only when the admin user does not exist yet (MLflow ignores it afterwards).
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
    }
    return env, created


def server_command(
    store_uri: str, host: str, port: int, insecure: bool, artifacts: Path, workers: int | None = None
) -> list[str]:
    """The ``mlflow server`` command line: no secret in it (they go in the environment)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri]
    command += ["--serve-artifacts", "--artifacts-destination", str(artifacts.resolve())]
    command += ["--host", host, "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    return command if insecure else [*command, "--app-name", "basic-auth"]


#: MLflow 3's server also starts a job runner and its Huey consumers (about 8 processes of ~250 MB)
#: for GenAI jobs (scorers, judges) that training runs never submit: left off, the server of 4
#: workers takes ~1.3 GB instead of ~3.7 GB.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def run_server(store_uri: str, host: str, port: int, insecure: bool, workers: int | None = None) -> int:
    """Start the tracking server in the foreground (Ctrl-C stops it); its exit status."""
    if insecure and not is_loopback(host):
        raise UserError(
            f"--insecure with --host {host} would open every run and model to anyone who can reach the "
            "port; drop --insecure (users sign in), or bind 127.0.0.1"
        )
    ensure_store(store_uri)
    files = ServerFiles.for_store(store_uri)
    files.artifacts.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SERVER_ENV}
    shown = "[::1]" if host == "::1" else host
    lines = [f"MLflow tracking server on http://{shown}:{port}, store {redact(store_uri)}"]
    if insecure:
        lines.append("no authentication: anyone who can reach this port can read, change or delete every run")
        lines = [f"INSECURE: {line}" for line in lines]
    else:
        server_env, created = prepare_server_files(files)
        env.update(server_env)
        where = f"{files.admin_password} (mode 0600)"
        lines.append(
            f"sign-in required; user {ADMIN_USER!r}, password in {where}"
            + (", generated now" if created else "")
        )
        lines.append(
            "add users with `run.py server --add-user NAME`; clients set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    for line in lines:
        print(line + ("  (Ctrl-C stops it)" if line is lines[-1] else ""), flush=True)
    try:
        command = server_command(store_uri, host, port, insecure, files.artifacts, workers)
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return 0


def read_new_password(name: str) -> str:
    """A new user's password: asked twice at a terminal, else the first line of stdin."""
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the two passwords differ; run the command again")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(
            f"the password must be at least {MIN_PASSWORD_LENGTH} characters (MLflow's rule); "
            "pipe it on stdin or type it at the prompt"
        )
    return password


def add_user(store_uri: str, name: str, password: str) -> None:
    """Create user ``name`` in the server's users database (the server need not be running)."""
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # the server's web stack warns about its own deprecations on import
        warnings.simplefilter("ignore")
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    files = ServerFiles.for_store(store_uri)
    if sqlite_path(store_uri) is not None:
        files.folder.mkdir(parents=True, exist_ok=True)
    store = SqlAlchemyStore()
    store.init_db(files.auth_db_uri)
    if store.has_user(name):
        raise UserError(f"user {name!r} exists already on the server of {redact(store_uri)}")
    try:
        store.create_user(name, password)
    except MlflowException as exc:
        raise UserError(f"cannot add user {name!r}: {exc.message}") from None
