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

Examples:
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
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import FLAG, CheckFailed, count, number, optional, positive_int, text
from lightning_batch.plugin.options import check_options, option, option_fields

#: Tuned when no space is given: the lr, the (starting) batch size, and whether it moves.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 1e-4, "high": 1.0, "log": True},
    "batch_size": {"low": 8, "high": 1024, "log": True},
    "policy": {"choices": ["fixed", "goodput"]},
}
#: Names a space may use beyond RunConfig's own fields.
EXTRA_NAMES = ("hidden_width",)


def searchable() -> set[str]:
    """The options a space may vary: those declared searchable (not the data's identity, nor where runs are kept)."""
    return {f.name for f, info in option_fields(RunConfig) if info.searchable} | set(EXTRA_NAMES)


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
        assert self.low is not None and self.high is not None  # a range, not categorical
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
    allowed = searchable()
    space: dict[str, ParamSpec] = {}
    for key, spec in raw.items():
        name = str(key).replace("-", "_")
        if name not in allowed:
            raise UserError(f"{origin}: {key!r} cannot be searched; searchable: {', '.join(sorted(allowed))}")
        space[name] = _parse_spec(name, spec, origin)
        _check_values(space[name], f"{origin}, {name}")
    return space


def _check_values(spec: ParamSpec, where: str) -> None:
    """Each choice, or both bounds, must be a value the option accepts: its own declared check."""
    checks = {f.name: info.check for f, info in option_fields(RunConfig)}
    checks["hidden_width"] = positive_int
    check = checks.get(spec.name)
    for value in spec.choices if spec.kind == "categorical" else (spec.low, spec.high):
        try:
            if check is not None:
                check(value)
        except CheckFailed as failed:
            raise UserError(f"{where}: {value!r} is not a valid value ({spec.name} {failed})") from None


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
    return RunConfig.from_mapping(values, origin="trial parameters").validate()


SAMPLERS = ("tpe", "gp", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
RETRAIN_MODES = ("as-is", "train+val", "none")


def _storage(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("sqlite:///", "postgresql", "mysql")):
        raise CheckFailed("must be an RDB URL (sqlite:///path/optuna.db or postgresql://user@host/db)")
    return value


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """How to search; the training options themselves are a :class:`RunConfig`."""

    study: str = option(
        "lightning-batch-study",
        "study name (also the MLflow experiment); an existing one is resumed",
        check=text,
        example="lr-vs-batch",
        group="study",
    )
    trials: int = option(
        20, "trials this invocation runs, split over --workers", check=positive_int, group="study"
    )
    timeout: float | None = option(
        None,
        "stop starting trials after this many seconds (per worker)",
        check=optional(number(above=0.0)),
        example=3600,
        group="study",
    )
    workers: int = option(1, "worker processes on this machine", check=positive_int, example=2, group="study")
    storage: str | None = option(
        None,
        "Optuna RDB URL (default sqlite:///mlruns/optuna.db beside the MLflow store; postgresql://... for "
        "many machines)",
        check=optional(_storage),
        example="sqlite:///mlruns/optuna.db",
        group="study",
    )
    sampler: str = option("tpe", "the Optuna sampler", group="study", choices=SAMPLERS)
    pruner: str = option("median", "the Optuna pruner", group="study", choices=PRUNERS)
    space: dict[str, Any] | None = option(
        None,
        "the search space mapping (see lightning_batch.tune.space); unset: lr, batch_size and policy",
        group="study",
        cli=False,
    )
    retrain: str = option(
        "as-is",
        "after the search, refit the best configuration as-is (train split) or on train+val, and test "
        "it once; none skips it",
        group="study",
        choices=RETRAIN_MODES,
    )
    seed: int = option(
        0,
        "sampler seed (worker i uses seed + i, so workers do not propose the same points)",
        check=count,
        group="study",
        flag="--study-seed",
    )
    heartbeat_interval: int = option(
        10, "seconds between worker heartbeats", check=positive_int, group="study"
    )
    grace_period: int | None = option(
        None,
        "seconds without a heartbeat before a running trial counts as lost; default 3 x the interval",
        check=optional(positive_int),
        example=30,
        group="study",
        cli=False,
    )
    max_retry: int = option(
        1,
        "how many times a lost trial is re-queued with the same parameters",
        check=count,
        group="study",
        cli=False,
    )
    startup_trials: int = option(
        5, "trials the median pruner and TPE observe before they act", check=count, group="study", cli=False
    )
    enqueue: list[dict[str, Any]] = option(
        [],
        "parameter sets to try first (e.g. a known good config), as Optuna's enqueue_trial",
        group="study",
        cli=False,
    )

    @property
    def grace_seconds(self) -> int:
        """Seconds without a heartbeat before a running trial counts as lost."""
        return self.grace_period or 3 * self.heartbeat_interval

    def validate(self) -> TuneConfig:
        """Every study option checked (flag spelling), the space parsed. Returns a checked copy."""
        checked = replace(self, **check_options(self, FLAG))
        if checked.workers > checked.trials:
            raise UserError(
                f"--workers {checked.workers} is more than --trials {checked.trials}; lower --workers"
            )
        parse_space(checked.space)
        return checked
