"""What an Optuna study searches over (parameters of a :class:`RunConfig`, from YAML or defaults),
and how (:class:`TuneConfig`: sampler, pruner, trials, workers, storage).

A space maps a parameter name to a distribution. Names are RunConfig fields (``lr``,
``batch_size``, ``policy``, ``weight_decay``, ``dropout``, ``lr_rule``, ``momentum``, ...) plus
``hidden_width`` (every hidden layer of the MLP gets that width); the batch-size options
(``hysteresis``, ``measure_every``, ``ema_decay``, ``noise_k``, ...) too. A spec is one of::

    lr:         {low: 1.0e-4, high: 1.0, log: true}    # float (log-uniform)
    batch_size: {low: 8, high: 1024, log: true}        # int, because both bounds are ints
    dropout:    {low: 0.0, high: 0.5, step: 0.1}       # float on a grid
    policy:     {choices: [fixed, goodput]}            # categorical
    hidden_width: [32, 64, 128]                        # a bare list is a categorical too

``policy`` is how the batch size moves; when it is not ``fixed``, ``batch_size`` is where the
dynamic policy starts (B0, where ``lr`` applies). So a study with the default space tells whether
sizing the batch during training beats the best fixed size, on one lr × batch-size plane.

Each bound and each choice is checked as the option itself would be (``policy`` names come from
:mod:`lightning_batch.plugin.policy`), so a space that cannot run fails before the first trial.

Example:
    >>> space = parse_space({"lr": {"low": 0.001, "high": 0.1, "log": True}, "policy": ["fixed", "goodput"]})
    >>> space["lr"].kind, space["policy"].kind
    ('float', 'categorical')
    >>> from lightning_batch.config import RunConfig
    >>> cfg = apply_params(RunConfig(data="iris"), {"lr": 0.05, "batch_size": 16, "policy": "goodput"})
    >>> cfg.lr, cfg.batch_size, cfg.policy, cfg.dynamic
    (0.05, 16, 'goodput', True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_batch.config import NAMED_CHOICES, RunConfig
from lightning_batch.errors import UserError

#: Tuned when no space is given: the lr, the (starting) batch size, and whether it moves.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"low": 8, "high": 1024, "log": True},
    "policy": {"choices": ["fixed", "goodput"]},
}
#: Names a space may use beyond RunConfig's own fields.
EXTRA_NAMES = ("hidden_width",)
#: RunConfig fields that make no sense to search (data identity, tracking, bookkeeping).
NOT_SEARCHABLE = (
    "data",
    "target",
    "task",
    "val_fraction",
    "test_fraction",
    "seed",
    "experiment",
    "run_name",
    "tracking_uri",
    "train_on_val",
    "data_cache",
    "data_memory_budget",
)


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a float or int range (optionally log or stepped), or choices."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Ask an ``optuna.Trial`` for a value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid(self, points: int = 5) -> list[Any]:
        """Values for a grid search: the choices, or ``points`` values across the range."""
        if self.kind == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.step:
            values = list(np.arange(self.low, self.high + self.step / 2, self.step))
        elif self.log:
            values = list(np.geomspace(self.low, self.high, points))
        else:
            values = list(np.linspace(self.low, self.high, points))
        if self.kind == "int":
            return sorted({int(round(v)) for v in values})
        return [float(v) for v in values]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step:
            out["step"] = self.step
        return out


def parse_space(raw: Mapping[str, Any] | None, origin: str = "the search space") -> dict[str, ParamSpec]:
    """Validate a space mapping (from YAML); ``None`` gives :data:`DEFAULT_SPACE`."""
    if raw is None:
        raw = DEFAULT_SPACE
    if not isinstance(raw, Mapping) or not raw:
        raise UserError(
            f"{origin} must map parameter names to ranges, e.g. lr: {{low: 0.001, high: 0.1, log: true}}"
        )
    allowed = (set(RunConfig.field_names()) - set(NOT_SEARCHABLE)) | set(EXTRA_NAMES)
    space: dict[str, ParamSpec] = {}
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise UserError(f"{origin}: {key!r} cannot be searched; searchable: {', '.join(sorted(allowed))}")
        space[name] = _parse_spec(name, spec, origin)
        _check_values(space[name], f"{origin}, {name}")
    return space


def _check_values(spec: ParamSpec, where: str) -> None:
    """Each choice, or both bounds, must be a value the option accepts."""
    values = spec.choices if spec.kind == "categorical" else (spec.low, spec.high)
    names = NAMED_CHOICES.get(spec.name)
    for value in values:
        if names is not None:
            if value not in names:
                raise UserError(f"{where}: unknown choice {value!r}; use one of {', '.join(names)}")
            continue
        if spec.name == "hidden_width":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{where}: {value!r} is not a layer width; use positive integers")
            continue
        try:
            RunConfig.from_mapping({spec.name: value}).validate()
        except UserError as exc:
            raise UserError(f"{where}: {value!r} is not a valid value ({exc})") from None


def _parse_spec(name: str, spec: Any, origin: str) -> ParamSpec:
    where = f"{origin}, {name}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: give {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    unknown = set(spec) - {"low", "high", "log", "step", "choices", "type"}
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(sorted(map(repr, map(str, unknown))))}; use low, high, log, step or choices"
        )
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: choices must be a non-empty list, e.g. choices: [fixed, goodput]")
        if not all(isinstance(c, (str, int, float, bool)) or c is None for c in choices):
            raise UserError(
                f"{where}: choices must be numbers or strings (Optuna stores them), got {choices!r}"
            )
        return ParamSpec(name, "categorical", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs low and high, e.g. {{low: 0.001, high: 0.1, log: true}}")
    low, high = spec["low"], spec["high"]
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise UserError(f"{where}: low and high must be finite numbers, got {low!r} and {high!r}")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0):
        raise UserError(f"{where}: step must be a positive number, got {step!r}")
    if step is not None and log:
        raise UserError(f"{where}: use either log or step, not both")
    kind = spec.get("type") or (
        "int" if isinstance(low, int) and isinstance(high, int) and not isinstance(step, float) else "float"
    )
    if kind not in ("int", "float"):
        raise UserError(f"{where}: type must be int or float, got {kind!r}")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step)


def apply_params(base: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """A validated copy of ``base`` with a trial's parameters set."""
    values = base.to_dict()
    for name, value in params.items():
        if name == "hidden_width":
            values["hidden"] = [int(value)] * max(1, len(base.hidden))
        else:
            values[name] = value.item() if hasattr(value, "item") else value
    if values.get("policy") == "fixed":
        values["policy"] = None  # a fixed policy is a plain integer batch size
    return RunConfig.from_mapping(values, origin="trial parameters").validate()


SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
RETRAIN_MODES = ("as-is", "train+val", "none")


@dataclass
class TuneConfig:
    """How to search; the training options themselves are a :class:`RunConfig`."""

    study: str = "lightning-batch-study"
    trials: int = 20
    """Trials this invocation runs, split across ``workers``."""
    timeout: float | None = None
    """Stop starting new trials after this many seconds (per worker)."""
    workers: int = 1
    storage: str | None = None
    """Optuna RDB URL; default ``sqlite:///`` ``optuna.db`` beside the MLflow sqlite store (or ``mlruns/``)."""
    sampler: str = "tpe"
    pruner: str = "median"
    space: dict[str, Any] | None = None
    """The search space mapping (see :mod:`lightning_batch.tune.space`); None: the default."""
    retrain: str = "as-is"
    """After the search, refit the best configuration ``as-is`` (train split) or on ``train+val``, and
    test it once; ``none`` skips it."""
    seed: int = 0
    """Sampler seed (worker i uses seed + i, so workers do not propose the same points)."""
    heartbeat_interval: int = 10
    grace_period: int | None = None
    """Seconds without a heartbeat before a running trial counts as lost; default 3 × the interval."""
    max_retry: int = 1
    """How many times a lost trial is re-queued with the same parameters."""
    startup_trials: int = 5
    """Trials the median pruner and TPE observe before they act."""
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    """Parameter sets to try first (e.g. a known good config), as Optuna's ``enqueue_trial``."""

    @property
    def grace_seconds(self) -> int:
        """Seconds without a heartbeat before a running trial counts as lost."""
        return self.grace_period or 3 * self.heartbeat_interval

    def validate(self) -> TuneConfig:
        if not isinstance(self.study, str) or not self.study.strip():
            raise UserError("--study must be a non-empty name, e.g. --study lr-vs-batch")
        for name, value, example in (
            ("--trials", self.trials, "--trials 20"),
            ("--workers", self.workers, "--workers 2"),
            ("--heartbeat-interval", self.heartbeat_interval, "--heartbeat-interval 10"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}; e.g. {example}")
        if self.workers > self.trials:
            raise UserError(f"--workers {self.workers} is more than --trials {self.trials}; lower --workers")
        if self.timeout is not None and not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise UserError(f"--timeout must be a positive number of seconds, got {self.timeout!r}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; use --sampler {'|'.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise UserError(f"unknown pruner {self.pruner!r}; use --pruner {'|'.join(PRUNERS)}")
        if self.retrain not in RETRAIN_MODES:
            raise UserError(f"unknown retrain mode {self.retrain!r}; use --retrain {'|'.join(RETRAIN_MODES)}")
        if self.storage is not None and not str(self.storage).startswith(
            ("sqlite:///", "postgresql", "mysql")
        ):
            raise UserError(
                f"--storage must be an RDB URL (sqlite:///path/optuna.db or postgresql://user@host/db), got {self.storage!r}"
            )
        parse_space(self.space)
        return self
