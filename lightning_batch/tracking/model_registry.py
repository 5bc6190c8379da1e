"""Registering a run's model in MLflow's Model Registry, and who holds the ``champion`` alias.

``run.py train --register NAME`` registers the run's model; ``run.py tune --register NAME`` the
study's refit. Each registration is a new version of ``NAME`` on the same tracking store as the run
(the sqlite file by default, or the server), tagged with what it came from and the number it is
judged by::

    run_id, experiment, study (tune only), metric=val_loss, val_loss, metric_source

The alias ``champion`` moves to the new version only when its validation loss is lower than the
current holder's (read from the holder's ``val_loss`` tag): a worse or equal version is registered
but not promoted, and ``models:/NAME@champion`` keeps serving the best so far. A holder without a
readable ``val_loss`` (set by hand) keeps the alias. On a sqlite store the compare-and-move runs
under a file lock, so two registrations at once cannot both win; against a tracking server it
does not (two racing registrations may leave the worse one champion).

Which validation loss: a run's ``best_val_loss`` (the best validation epoch, whose weights the model
holds). A study's refit on train+val (``--retrain train+val``) has seen the validation rows, so its
own val loss says nothing; it is judged by its best trial's held-out val loss instead
(``metric_source`` says which).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from lightning_batch.errors import UserError
from lightning_batch.locks import store_lock

CHAMPION = "champion"
METRIC = "val_loss"


@dataclass
class Registration:
    """One registered version and whether it took the ``champion`` alias."""

    name: str
    version: str
    val_loss: float
    champion: bool
    #: The version that held ``champion`` before (None: there was none) and its val loss.
    previous: str | None = None
    previous_loss: float | None = None

    def describe(self) -> str:
        """One line for the terminal."""
        head = f"registered {self.name!r} version {self.version} (val_loss {self.val_loss:.6g})"
        if self.champion and self.previous is None:
            return f"{head}: alias {CHAMPION!r} set (first version with a val loss)"
        if self.champion:
            return (
                f"{head}: alias {CHAMPION!r} moved from version {self.previous} "
                f"(val_loss {self.previous_loss:.6g})"
            )
        held = f"{self.previous_loss:.6g}" if self.previous_loss is not None else "unknown"
        return f"{head}: alias {CHAMPION!r} stays on version {self.previous} (val_loss {held})"


def check_model_name(name: str) -> str:
    """A registered-model name MLflow accepts, checked before anything trains.

    >>> check_model_name("wine-mlp")
    'wine-mlp'
    >>> check_model_name("a/b")
    Traceback (most recent call last):
    ...
    lightning_batch.errors.UserError: --register 'a/b': a registered model's name cannot contain '/' or ':'; try 'a-b'
    """
    if not name.strip():
        raise UserError("--register needs a model name, e.g. --register my-model")
    if any(c in name for c in "/:"):
        fixed = name.replace("/", "-").replace(":", "-")
        raise UserError(
            f"--register {name!r}: a registered model's name cannot contain '/' or ':'; try {fixed!r}"
        )
    if name.strip() != name or any(ord(c) < 32 for c in name):
        raise UserError(f"--register {name!r}: the name has blanks at its ends or control characters")
    return name


def register_model(
    tracking_uri: str,
    name: str,
    run_id: str,
    model_uri: str,
    val_loss: float,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Register ``model_uri`` (run ``run_id``'s model) as a new version of ``name``; move ``champion``
    to it when ``val_loss`` beats the holder's (see the module doc)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    version_tags = {
        "run_id": run_id,
        "experiment": experiment.name if experiment is not None else "",
        "metric": METRIC,
        METRIC: repr(float(val_loss)),
        **(tags or {}),
    }
    # MLflow's private helper, as prediction.load_model uses it: create_model_version looks a logged
    # model up through the process-wide tracking URI, which a process that did not train (or trained
    # against another store) has pointing elsewhere.
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    with (
        store_lock(tracking_uri, "registry"),
        _use_tracking_uri(tracking_uri),
    ):  # the compare-and-move of the champion alias
        try:
            client.create_registered_model(
                name, description="Registered by lightning-batch (run.py --register)."
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, tags=version_tags, model_id=model_id
        )
        holder = _champion(client, name)
        previous = str(holder.version) if holder is not None else None  # an int from a sqlite store
        previous_loss = _loss(holder.tags.get(METRIC)) if holder is not None else None
        better = math.isfinite(val_loss) and (
            holder is None or (previous_loss is not None and val_loss < previous_loss)
        )
        if better:
            client.set_registered_model_alias(name, CHAMPION, version.version)
    return Registration(name, str(version.version), float(val_loss), better, previous, previous_loss)


def _champion(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _loss(text: str | None) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        value = float(text)  # type: ignore[arg-type]
        return value if math.isfinite(value) else None
    return None


def register_run(
    tracking_uri: str,
    name: str,
    run_id: str,
    *,
    val_loss: float | None = None,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Register run ``run_id``'s logged model; its ``best_val_loss`` unless ``val_loss`` is given."""
    from mlflow import MlflowClient

    from lightning_batch.tracking.run_model import run_model_id

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    model_id = run_model_id(client, run)
    if model_id is None:
        raise UserError(f"run {run_id!r} has no MLflow model to register")
    loss = val_loss if val_loss is not None else float(run.data.metrics.get("best_val_loss", math.nan))
    return register_model(
        tracking_uri,
        name,
        run_id,
        f"models:/{model_id}",
        loss,
        {"metric_source": "run best_val_loss", **(tags or {})},
    )
