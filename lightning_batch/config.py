"""Every option of a run, declared once and validated once, with messages that say what to pass instead.

A :class:`RunConfig` is a :class:`~lightning_batch.plugin.options.BatchSizeOptions` (the callback's
options) with the run's own added: data, model, optimisation, hardware, tracking. Each field is
declared once with :func:`~lightning_batch.plugin.options.option` (type, default, one-line help,
check); from those declarations come the YAML keys (the field names), the ``run.py`` flags
(:mod:`lightning_batch.cli`), the MLflow params, the search space's checks
(:mod:`lightning_batch.tune.space`) and the data cache's key (:mod:`lightning_batch.tabular.cache`,
from the options marked ``prepares_data``). It is flat on purpose, so a run in the UI reads like
the command that made it.

Bad input stops here, before any data is read or any MLflow run exists, as a one-line
:class:`~lightning_batch.errors.UserError`; the CLI prints it as ``error: ...`` with exit status 2.
A config is frozen: :meth:`RunConfig.validate` returns a checked copy with the defaults that depend
on other options filled in.

Examples:
    >>> cfg = RunConfig(data="diabetes", batch_size="full", lr=0.1).validate()
    >>> cfg.task, cfg.model
    ('regression', 'linear')
    >>> RunConfig(lr=-1).validate()
    Traceback (most recent call last):
    ...
    lightning_batch.errors.UserError: --lr must be above 0, got -1; e.g. --lr 0.01
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import (
    FLAG,
    CheckFailed,
    boolean,
    count,
    fraction,
    integer,
    number,
    optional,
    positive_int,
    positive_ints,
    text,
)
from lightning_batch.plugin.options import BatchSizeOptions, check_options, option, option_fields
from lightning_batch.store_uri import redact

__all__ = ["RunConfig", "declared_options", "load_yaml_config", "parse_augment", "parse_batch_size"]

#: scikit-learn's bundled datasets (they ship with the package: nothing is downloaded).
SKLEARN_DATASETS = {
    "diabetes": "regression",
    "digits": "classification",
    "breast_cancer": "classification",
    "wine": "classification",
    "iris": "classification",
}
#: Generated datasets: the seed's y = w·x + b + noise, and a multi-class problem.
SYNTHETIC_DATASETS = {"synthetic-regression": "regression", "synthetic-classification": "classification"}
TASKS = ("regression", "classification")
MODELS = ("linear", "softmax", "mlp", "cnn")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("none", "cosine", "step", "plateau")
ACTIVATIONS = ("relu", "gelu", "tanh")
INITS = ("default", "xavier", "kaiming")
ON_NAN = ("rollback", "fail", "skip")
ACCELERATORS = ("auto", "cpu", "gpu", "mps")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
#: ``batch_size`` takes a number or one of these.
BATCH_MODES = ("full", "auto")
#: The kinds of ``--augment`` (see :mod:`lightning_batch.tabular.augment`).
AUGMENT_KINDS = ("noise", "mixup", "shift")
#: The learning rate a model gets when none is given (others: 0.01); measured on digits, 4 seeds.
DEFAULT_LR = {"cnn": 0.1}


def parse_batch_size(value: Any) -> int | str:
    """``full`` and ``auto`` stay modes; anything else must be a positive integer.

    >>> parse_batch_size("64"), parse_batch_size("full"), parse_batch_size("AUTO")
    (64, 'full', 'auto')
    """
    if isinstance(value, str):
        words = value.strip().lower()
        if words in BATCH_MODES:
            return words
        try:
            value = int(words)
        except ValueError:
            raise CheckFailed("must be a positive integer, full or auto") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckFailed("must be a positive integer, full or auto")
    return value


def parse_augment(specs: Any) -> tuple[tuple[str, float], ...]:
    """``["noise:0.05", "shift:1"]`` -> ``(("noise", 0.05), ("shift", 1.0))``; a bad spec is one line.

    >>> parse_augment(["mixup:0.2"])
    (('mixup', 0.2),)
    """
    steps = []
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        name, _, raw = str(spec).partition(":")
        if name not in AUGMENT_KINDS or not raw:
            raise UserError(f"unknown augmentation {spec!r}; use noise:0.05, mixup:0.2 or shift:1")
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"--augment {spec}: {raw!r} is not a number; e.g. {name}:0.1") from None
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--augment {spec}: the value must be a positive number")
        if name == "shift" and value != int(value):
            raise UserError(f"--augment {spec}: shift takes whole pixels, e.g. shift:1")
        steps.append((name, value))
    return tuple(steps)


def _augment(value: Any) -> list[str]:
    parse_augment(value)
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


def _devices(value: Any) -> int | str:
    """A positive number of devices, or ``auto`` (every GPU torch sees)."""
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    try:
        return positive_int(value)
    except CheckFailed:
        raise CheckFailed("must be a positive integer or auto") from None


def _folder(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CheckFailed("must be a folder path")
    return value


def _int_list(value: Any) -> list[int]:
    return list(positive_ints(value))


@dataclass(frozen=True, kw_only=True)
class RunConfig(BatchSizeOptions):
    """Options of one training run (CLI flags, YAML keys and MLflow params share these names)."""

    # --- data -----------------------------------------------------------------------------------
    data: str = option(
        "synthetic-regression",
        "a bundled dataset (diabetes, digits, breast_cancer, wine, iris), synthetic-regression, "
        "synthetic-classification, or a .csv/.parquet path",
        check=text,
        example="diabetes",
        group="data",
        searchable=False,
        # Keyed by what it names, not how it is spelled: a file's resolved path, size and mtime.
        prepares_data=True,
    )
    target: str | None = option(
        None,
        "the target column of a CSV/Parquet file (bundled and generated data know their own)",
        check=optional(text),
        example="price",
        group="data",
        searchable=False,
        prepares_data=True,
    )
    task: str | None = option(
        None,
        "regression or classification; inferred from the data when omitted",
        check=optional(lambda v: _one(v, TASKS)),
        example="classification",
        group="data",
        choices=TASKS,
        searchable=False,
        prepares_data=True,
    )
    rows: int = option(
        10_000,
        "rows generated by the synthetic sources",
        check=positive_int,
        group="data",
        prepares_data=True,
    )
    features: int = option(
        8, "features generated by the synthetic sources", check=positive_int, group="data", prepares_data=True
    )
    noise: float = option(
        0.5,
        "label noise (standard deviation) of synthetic-regression",
        check=number(minimum=0.0),
        group="data",
        prepares_data=True,
    )
    correlation: float = option(
        0.0,
        "AR(1) correlation between neighbouring synthetic features (0: independent)",
        check=number(minimum=0.0, below=1.0),
        example=0.5,
        group="data",
        prepares_data=True,
    )
    classes: int = option(
        3, "classes of synthetic-classification", check=integer(minimum=2), group="data", prepares_data=True
    )
    val_fraction: float = option(
        0.15,
        "share of the rows held out for validation",
        check=number(above=0.0, below=1.0),
        group="data",
        searchable=False,
        prepares_data=True,
    )
    test_fraction: float = option(
        0.15,
        "share of the rows held out for the final test",
        check=number(above=0.0, below=1.0),
        group="data",
        searchable=False,
        prepares_data=True,
    )
    max_categories: int = option(
        20,
        "a text feature with at most this many levels is one-hot encoded; more is an error",
        check=positive_int,
        group="data",
        prepares_data=True,
    )
    shuffle: bool = option(
        True,
        "shuffle the training rows each epoch (seeded); off: the file's row order",
        check=boolean,
        example=False,
        group="data",
        prepares_data=False,  # the sampler's order at training time; the tables are not reordered
    )
    scale_target: bool = option(
        True,
        "standardise a regression target on the training split (the loss in standard units; metrics, "
        "predictions and the model in the target's own); off: train on the raw target",
        check=boolean,
        example=False,
        group="data",
        # The tables keep the raw target; prepare_data fits the target's scaling after the cache.
        prepares_data=False,
    )
    train_on_val: bool = option(
        False,
        "train on train+val (the scaling fit on both): a tuned configuration's final fit",
        check=boolean,
        group="data",
        cli=False,
        searchable=False,
        prepares_data=True,
    )
    data_cache: str | None = option(
        None,
        "a folder for the prepared tables as memory-mapped files, written once and reused by later runs and "
        "trials (default: only for tables over data_memory_budget, beside the MLflow store)",
        check=optional(_folder),
        example="cache/",
        group="data",
        searchable=False,
        prepares_data=False,  # where the tables are kept, not what they hold
    )
    data_memory_budget: float = option(
        0.25,
        "share of the available RAM the prepared tables may take; larger ones train from the data cache",
        check=fraction(),
        group="data",
        searchable=False,
        # Over it, a Parquet file is prepared streaming: the same tables up to float rounding
        # (tests/test_data_cache.py), so a table cached either way serves both.
        prepares_data=False,
    )

    # --- model ----------------------------------------------------------------------------------
    model: str | None = option(
        None,
        "linear (y = wx + b), softmax (softmax regression), mlp or cnn (square images like digits' 8x8); "
        "default: linear for regression, softmax for classification",
        check=optional(lambda v: _one(v, MODELS)),
        example="mlp",
        group="model",
        choices=MODELS,
        prepares_data=False,
    )
    hidden: list[int] = option(
        [64, 64], "the MLP's hidden layer widths", check=_int_list, group="model", prepares_data=False
    )
    channels: list[int] = option(
        [32, 64],
        "the CNN's conv blocks: output channels of each 3x3 convolution (each followed by a 2x2 pool)",
        check=_int_list,
        group="model",
        prepares_data=False,
    )
    activation: str = option(
        "relu", "the MLP's and CNN's activation", group="model", choices=ACTIVATIONS, prepares_data=False
    )
    dropout: float = option(
        0.0,
        "dropout after each hidden layer, in [0, 1)",
        check=number(minimum=0.0, below=1.0),
        example=0.1,
        group="model",
        prepares_data=False,
    )
    init: str = option("default", "weight initialisation", group="model", choices=INITS, prepares_data=False)

    # --- optimisation ---------------------------------------------------------------------------
    batch_size: int | str = option(
        32,
        "samples per optimizer step: N (mini-batch), 1 (SGD), full (full-batch GD) or auto (start at "
        "base_batch, then let the policy move it)",
        check=parse_batch_size,
        group="optimisation",
        prepares_data=False,
    )
    base_batch: int = option(
        32,
        "the batch auto starts from (where lr applies)",
        check=positive_int,
        group="optimisation",
        prepares_data=False,
    )
    lr: float | None = option(
        None,
        "the learning rate at the starting batch; unset: found by a short range test before the fit "
        "(--no-lr-search: 0.1 for cnn, else 0.01)",
        check=optional(number(above=0.0)),
        example=0.01,
        group="optimisation",
        prepares_data=False,
    )
    lr_search: bool = option(
        True,
        "without --lr, find the lr by a range test of 100 steps on a copy of the network (a tenth of "
        "the lr at the lowest loss); off: the fixed default",
        check=boolean,
        example=False,
        group="optimisation",
        prepares_data=False,
    )
    optimizer: str = option(
        "sgd", "the optimizer", group="optimisation", choices=OPTIMIZERS, prepares_data=False
    )
    momentum: float = option(
        0.0,
        "SGD's momentum, in [0, 1)",
        check=number(minimum=0.0, below=1.0),
        example=0.9,
        group="optimisation",
        prepares_data=False,
    )
    weight_decay: float = option(
        0.0,
        "weight decay",
        check=number(minimum=0.0),
        example=1e-4,
        group="optimisation",
        prepares_data=False,
    )
    lr_schedule: str = option(
        "none", "the lr schedule over epochs", group="optimisation", choices=LR_SCHEDULES, prepares_data=False
    )
    grad_clip: float | None = option(
        None,
        "clip the global gradient norm to this (the norms and the clipped share are logged)",
        check=optional(number(above=0.0)),
        example=1.0,
        group="optimisation",
        prepares_data=False,
    )
    grad_ratio_limit: float = option(
        20.0,
        "warn when the first/last layer gradient-norm ratio stays outside [1/X, X] (vanishing or exploding)",
        check=number(above=1.0),
        group="optimisation",
        prepares_data=False,
    )
    augment: list[str] = option(
        [],
        "training-batch augmentations: noise:S (Gaussian), mixup:A, shift:K (images)",
        check=_augment,
        example=["noise:0.05"],
        group="optimisation",
        prepares_data=False,
    )
    on_nan: str = option(
        "rollback",
        "a training loss that blows up (NaN/inf, or 1000x its lowest window mean) rolls back to the last "
        "good window and halves the lr (rollback); fail: the run fails (the step in a tag); skip: the step "
        "is skipped and the lr halved",
        group="optimisation",
        choices=ON_NAN,
        prepares_data=False,
    )
    epochs: int = option(
        200,
        "the most training epochs; a run stops sooner once val_loss stops improving (--patience)",
        check=positive_int,
        group="optimisation",
        prepares_data=False,
    )
    max_minutes: float | None = option(
        None,
        "stop training after this many minutes of fitting, wherever it is (the best validation checkpoint "
        "is tested as usual, and the run tagged stopped_early); unset: no time cap",
        check=optional(number(above=0.0)),
        example=30,
        group="optimisation",
        prepares_data=False,
    )
    patience: int | None = option(
        10,
        "stop when val_loss has not improved for this many validations (0: off, train every epoch)",
        check=optional(count),
        example=5,
        group="optimisation",
        prepares_data=False,
    )
    val_every: int = option(
        1, "validate every N epochs", check=positive_int, group="optimisation", prepares_data=False
    )
    seed: int = option(
        0,
        "the seed of the split, the initial weights and the row order",
        check=count,
        group="optimisation",
        searchable=False,
        prepares_data=True,  # it draws the split and the generated rows, not only the weights
    )

    # --- hardware -------------------------------------------------------------------------------
    accelerator: str = option(
        "auto",
        "cpu, gpu (CUDA), mps, or auto (a GPU when torch sees one)",
        group="hardware",
        choices=ACCELERATORS,
        searchable=False,
        prepares_data=False,
    )
    devices: int | str = option(
        1,
        "devices (GPUs, or CPU processes) per node; auto: every GPU torch sees; above 1 trains with DDP",
        check=_devices,
        example=2,
        group="hardware",
        searchable=False,
        prepares_data=False,
    )
    strategy: str = option(
        "auto",
        "ddp (one process per device), ddp_spawn, or auto (ddp when more than one process)",
        group="hardware",
        choices=STRATEGIES,
        searchable=False,
        prepares_data=False,
    )
    num_nodes: int = option(
        1,
        "machines; each is started with NODE_RANK, MASTER_ADDR and MASTER_PORT set",
        check=positive_int,
        example=2,
        group="hardware",
        searchable=False,
        prepares_data=False,
    )
    precision: str = option(
        "32-true",
        "32-true, 16-mixed (CUDA, with a gradient scaler) or bf16-mixed; the memory probe measures under it",
        group="hardware",
        choices=PRECISIONS,
        prepares_data=False,
    )
    device_data_budget: float = option(
        0.25,
        "share of the accelerator's free memory the data tables may take (then a batch is an index on the device); "
        "0 keeps them on the host",
        check=fraction(zero=True),
        group="hardware",
        searchable=False,
        prepares_data=False,
    )

    # --- tracking -------------------------------------------------------------------------------
    experiment: str = option(
        "lightning-batch",
        "the MLflow experiment",
        check=text,
        example="my-study",
        group="tracking",
        searchable=False,
        prepares_data=False,
    )
    run_name: str | None = option(
        None,
        "the MLflow run's name (default: data-model-batch-xxxx)",
        check=optional(text),
        example="baseline",
        group="tracking",
        searchable=False,
        prepares_data=False,
    )
    tracking_uri: str | None = option(
        None,
        "the MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)",
        check=optional(text),
        example="sqlite:///mlruns/mlflow.db",
        group="tracking",
        searchable=False,
        prepares_data=False,
    )
    checkpoint_every: int = option(
        200,
        "save the resumable last.ckpt every N optimizer steps (and at each epoch end)",
        check=positive_int,
        group="tracking",
        searchable=False,
        prepares_data=False,
    )

    def __post_init__(self) -> None:
        # Built leniently (a YAML file, flags, a trial's parameters are merged first); checked by validate().
        pass

    # -- building --------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], origin: str = "config") -> RunConfig:
        """Build from a dict (YAML keys may use ``-`` or ``_``); unknown keys are an error."""
        known = set(cls.field_names())
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise UserError(
                    f"unknown option {key!r} in {origin}; valid options: {', '.join(sorted(known))}"
                )
            clean[name] = value
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples), as YAML and MLflow params take them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` as it is written down (MLflow params, ``config.yaml``): any password in
        the tracking URI redacted. A resume takes the URI from its command line, not from there."""
        values = self.to_dict()
        if values.get("tracking_uri"):
            values["tracking_uri"] = redact(values["tracking_uri"])
        return values

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (not yet validated)."""
        return dataclasses.replace(self, **changes)

    # -- what the options resolve to -------------------------------------------------------------

    @property
    def is_file_source(self) -> bool:
        return self.data not in SKLEARN_DATASETS and self.data not in SYNTHETIC_DATASETS

    @property
    def dynamic(self) -> bool:
        """Whether a DynamicBatchSize callback moves the batch size during training."""
        return self.batch_size == "auto" or self.policy not in ("auto", "fixed")

    @property
    def resolved_policy(self) -> str:
        """``auto`` is goodput for ``--batch-size auto``; a run given a number keeps it fixed."""
        if self.policy == "auto":
            return "goodput" if self.batch_size == "auto" else "fixed"
        return str(self.policy)

    @property
    def resolved_lr_rule(self) -> str:
        if self.lr_rule != "auto":
            return self.lr_rule
        return "adascale" if self.optimizer == "sgd" else "sqrt"

    def batch_size_options(self) -> dict[str, Any]:
        """The callback's keyword arguments for this run, its policy and lr rule resolved."""
        return {
            **super().batch_size_options(),
            "policy": self.resolved_policy,
            "lr_rule": self.resolved_lr_rule,
        }

    # -- validation ------------------------------------------------------------------------------

    def validate(self) -> RunConfig:
        """Check every option; fill in the task, model and lr defaults. Returns a checked copy."""
        kept = check_options(self, FLAG)
        resolved = dataclasses.replace(self, **kept)
        resolved.check_together(FLAG)
        changes = resolved._check_data()
        task = changes.get("task", resolved.task)
        model = resolved.model or {"regression": "linear", "classification": "softmax", None: None}[task]
        if task is not None:
            check_model_for_task(model, task)
        lr: float | None = resolved.lr if resolved.lr is not None else DEFAULT_LR.get(model or "", 0.01)
        if resolved.lr is None and resolved.lr_search:
            lr = None  # found by the range test once the data are read (training.prepare_run)
        if resolved.val_fraction + resolved.test_fraction >= 0.9:
            raise UserError(
                "--val-fraction plus --test-fraction leaves under 10% of the rows to train on; lower them"
            )
        if resolved.policy != "auto" and not isinstance(resolved.policy, str):
            raise UserError(
                "a RunConfig takes a policy name; pass a BatchPolicy object to DynamicBatchSize itself"
            )
        if resolved.resolved_policy == "schedule" and not resolved.milestones:
            raise UserError(
                "--policy schedule needs --milestones (epochs where the batch doubles), e.g. --milestones 3 6"
            )
        return dataclasses.replace(resolved, **changes, model=model, lr=None if lr is None else float(lr))

    def _check_data(self) -> dict[str, Any]:
        """The data source: a known name or a readable .csv/.parquet file with its target. Returns the
        task when the source knows it."""
        known = {**SKLEARN_DATASETS, **SYNTHETIC_DATASETS}
        if self.is_file_source:
            path = Path(self.data)
            if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
                if not path.exists():
                    raise UserError(
                        f"unknown dataset {self.data!r}; use one of {'|'.join(known)} or a path to a .csv/.parquet file"
                    )
                raise UserError(f"{self.data!r}: unsupported file type; give a .csv or .parquet file")
            if not path.is_file():
                raise UserError(
                    f"data file not found: {self.data!r}; check the path (relative to {Path.cwd().name}/)"
                )
            if not self.target:
                raise UserError(
                    f"--target is required for a file source; name the column to predict in {path.name!r}"
                )
        elif self.target:
            raise UserError(f"--target is only for CSV/Parquet files; {self.data} knows its own target")
        if (
            self.data_cache is not None
            and Path(self.data_cache).exists()
            and not Path(self.data_cache).is_dir()
        ):
            raise UserError(f"--data-cache {self.data_cache!r} is a file; give a folder (created if missing)")
        if self.is_file_source:
            return {}  # a file's task is decided from its target column when it is read
        natural = known[self.data]
        if self.task is not None and self.task != natural:
            raise UserError(f"{self.data} is a {natural} dataset; drop --task or pass --task {natural}")
        return {"task": natural}


def _one(value: Any, names: tuple[str, ...]) -> str:
    if value not in names:
        raise CheckFailed(f"must be one of {'|'.join(names)}")
    return str(value)


def check_model_for_task(model: str | None, task: str) -> None:
    """Raise :class:`UserError` for a model that cannot do the task (``linear`` is regression's)."""
    if model == "linear" and task == "classification":
        raise UserError("--model linear is for regression; use --model softmax (or mlp) for classification")
    if model == "softmax" and task == "regression":
        raise UserError("--model softmax is for classification; use --model linear (or mlp) for regression")


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a YAML mapping of options; every failure is a one-line :class:`UserError`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path!r}")
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read YAML config {path!r}: {first}; fix the file or drop --config") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(
            f"YAML config {path!r} must be a mapping of option: value, got a {type(values).__name__}"
        )
    return values


def declared_options() -> list[tuple[dataclasses.Field[Any], Any]]:
    """Every option of a run, in declaration order (the callback's first)."""
    return option_fields(RunConfig)
