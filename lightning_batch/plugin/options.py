"""Every option of :class:`~lightning_batch.DynamicBatchSize`, declared once.

An option is one field of :class:`BatchSizeOptions`, declared with :func:`option`: its name, type
and default are the field's, its one-line help and check are the field's metadata. Everything else
derives from that one declaration:

- ``DynamicBatchSize``'s keyword arguments, their defaults and the argument list of its docstring
  (so ``LightningCLI``'s ``--trainer.callbacks.help lightning_batch.DynamicBatchSize`` describes them);
- :class:`~lightning_batch.config.RunConfig`, which *is* a ``BatchSizeOptions`` with the run's own
  options added, hence the YAML keys, the MLflow params and the ``run.py`` flags (``--adjust-every``);
- the checks of an Optuna search space over any of them.

A bad value is refused in one line that names the option as the user spelled it:

>>> BatchSizeOptions(adjust_every=0)
Traceback (most recent call last):
...
lightning_batch.errors.UserError: adjust_every must be a positive integer, got 0; e.g. adjust_every=20
>>> BatchSizeOptions(milestones=[3, 6]).milestones
(3, 6)

Why the defaults are what they are:

- ``min_batch = 1``: no floor beyond the data; the memory ceiling and the policy decide, and
  sizes below ``multiple`` stay allowed (a ``noise`` policy early in training may want them).
- ``multiple = 8``: sizes round to multiples of 8 (tensor-core and vector-width friendly).
- ``adjust_every = 20`` and ``min_timed_steps = 20``: see :mod:`lightning_batch.plugin.cadence`.
- ``measure_every = 0`` and ``measure_budget = 0.02``: the callback times its own measurements
  and measures as often as 2% of the fit's time allows (densely at the start, where the estimates
  move fastest); a fixed N > 0 suits one model only (``benchmarks/noise_overhead.py``).
- ``hysteresis = 0.05``: a resize must promise more than 5% to be worth its cost.
- ``noise_window = 0.25``: the noise EMAs forget in samples, with a half-life of a quarter of the
  samples seen so far (see :class:`~lightning_batch.plugin.noise.NoiseScaleEMA`); ``ema_decay =
  0.9`` (about 10 measurements) applies when the window is 0.
- ``noise_gradients = "auto"``: Adam steps along the gradient divided by ``√v̂ + ε``, so for it the
  noise that matters is that of the preconditioned gradient (Pollux); SGD's is the raw gradient's.
- ``noise_k = 1``: the ``noise`` policy trains at B_noise itself (McCandlish et al. 2018).
- ``explore_factor = 4``: ``goodput`` times a second size x4 away once (the controller's trust
  region allows x4 a decision), else its throughput model never fits.
- ``min_efficiency = 0.25``: ``goodput`` stays at batches that make at least a quarter of the
  progress per sample of B0 (about ``3 B_noise + 4 B0``, see
  :class:`~lightning_batch.plugin.policy.GoodputPolicy`). Not higher: with AdaScale's lr the noise
  floor ``lr / B`` falls only in proportion to the efficiency, so a bound of 0.5 keeps a run within
  2x of B0's floor, and a precise target out of reach.
- ``max_lr_scale = 10``: near the optimum AdaScale scales the lr linearly with the batch and the
  loss can diverge; capped, a larger batch lowers the noise floor instead.
- ``schedule_factor = 2``: Smith et al. 2017 double the batch where they would halve the lr.
- ``memory_budget = 0.5``: plan for half the free memory (on a CPU an OOM kills the process).
- ``log_every = 10``: one metric row every 10 steps keeps MLflow's SQL store cheap.
- ``fallback_microbatches = 8`` and ``fallback_every = 10``: micro-batch noise statistics for the
  layers no per-example rule covers (``benchmarks/noise_overhead.py --model cnn``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import (
    FLAG,
    KEYWORD,
    Check,
    Spelling,
    boolean,
    checked,
    count,
    fraction,
    increasing_positive_ints,
    number,
    one_of,
    optional,
    positive_int,
)

if TYPE_CHECKING:
    from lightning_batch.plugin.policy import BatchPolicy

__all__ = [
    "FLAG",
    "KEYWORD",
    "LR_RULE_NAMES",
    "NOISE_GRADIENTS",
    "POLICY_NAMES",
    "BatchSizeOptions",
    "OptionInfo",
    "check_options",
    "default_of",
    "option",
    "option_fields",
    "undecided_options",
]

#: The metadata key under which :func:`option` keeps an :class:`OptionInfo`.
OPTION = "lightning_batch.option"


@dataclass(frozen=True)
class OptionInfo:
    """What a field's declaration says beyond its name, type and default."""

    help: str
    """One line: what the option does (the CLI's ``--help``, the docstrings, the docs)."""
    check: Check | None
    """The value as given -> as kept, or :class:`~lightning_batch.plugin.checks.CheckFailed`."""
    example: Any
    """A value that works, quoted in error messages (``e.g. --adjust-every 20``)."""
    group: str
    """The CLI's help section."""
    choices: tuple[str, ...] | typing.Callable[[], tuple[str, ...]] | None = None
    """The names the option takes, when it takes names (the CLI's metavar, e.g. ``sgd|adam|adamw``)."""
    cli: bool = True
    """Whether ``run.py`` has a flag for it (some are set by the program: ``train_on_val``)."""
    flag: str | None = None
    """The flag, when it is not ``--`` and the name with dashes (``--study-seed`` for a study's ``seed``)."""
    searchable: bool = True
    """Whether an Optuna search space may vary it (not the data's identity, nor where runs are kept)."""
    prepares_data: bool | None = None
    """Whether it changes the prepared tables, and so is part of the data cache's key.

    Every option of a run must decide (``tests/test_options.py`` refuses one left ``None``): a wrong
    "no" would let a run train on another run's cached tables. Until decided, the key counts the
    option in (a needless rebuild, never wrong data)."""

    def names(self) -> tuple[str, ...] | None:
        """The choices, read now (a registry filled at import time, read once everything is imported)."""
        return self.choices() if callable(self.choices) else self.choices


def option(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    example: Any = None,
    group: str = "batch size",
    choices: tuple[str, ...] | typing.Callable[[], tuple[str, ...]] | None = None,
    cli: bool = True,
    flag: str | None = None,
    searchable: bool = True,
    prepares_data: bool | None = None,
) -> Any:
    """Declare an option: a dataclass field with its help and check.

    ``check`` defaults to "one of ``choices``" when choices are given; ``example`` to the default.
    A list default becomes a fresh copy per instance. ``prepares_data`` is left ``None`` only by
    declarations that never reach a run (a study's own options); see :attr:`OptionInfo.prepares_data`.
    """
    if check is None and choices is not None:
        check = one_of(choices)
    info = OptionInfo(
        help=help,
        check=check,
        example=default if example is None else example,
        group=group,
        choices=choices,
        cli=cli,
        flag=flag,
        searchable=searchable,
        prepares_data=prepares_data,
    )
    metadata = {OPTION: info}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_fields(cls: Any) -> list[tuple[dataclasses.Field[Any], OptionInfo]]:
    """The fields of dataclass ``cls`` (or of an instance) declared with :func:`option`, in order."""
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(cls) if OPTION in f.metadata]


def undecided_options(cls: Any) -> list[str]:
    """The options of ``cls`` whose declaration does not say whether they change the prepared data."""
    return [f.name for f, info in option_fields(cls) if not isinstance(info.prepares_data, bool)]


def default_of(f: dataclasses.Field[Any]) -> Any:
    """A field's default value (a fresh list for a list default)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"option {f.name} has no default")


def check_options(
    values: Any, spelling: Spelling, names: typing.Iterable[str] | None = None
) -> dict[str, Any]:
    """Every declared option of ``values`` (a dataclass instance) checked: ``{name: kept value}``.

    The first bad one raises a one-line :class:`~lightning_batch.errors.UserError` in ``spelling``.
    ``names`` limits the check to those options.
    """
    wanted = None if names is None else set(names)
    kept: dict[str, Any] = {}
    for f, info in option_fields(values):
        if info.check is None or (wanted is not None and f.name not in wanted):
            continue
        kept[f.name] = checked(f.name, getattr(values, f.name), info.check, info.example, spelling)
    return kept


# -- the callback's options ----------------------------------------------------------------------------


#: The batch policies by name; :mod:`lightning_batch.plugin.policy` registers a class for each
#: (``tests/test_options.py`` checks that the two agree). ``auto`` is goodput.
POLICY_NAMES = ("auto", "fixed", "memory", "noise", "goodput", "schedule")
#: The lr rules by name; ``auto`` follows the optimizer.
LR_RULE_NAMES = ("auto", "none", "linear", "sqrt", "adascale")
NOISE_GRADIENTS = ("auto", "raw", "preconditioned")


def _policy(value: Any) -> Any:
    """A policy name, or a :class:`~lightning_batch.plugin.policy.BatchPolicy` of the user's own (it
    proposes batches; importing the class here would make the declarations depend on the math)."""
    return value if callable(getattr(value, "propose_with_reason", None)) else one_of(POLICY_NAMES)(value)


@dataclass(frozen=True, kw_only=True)
class BatchSizeOptions:
    """How :class:`~lightning_batch.DynamicBatchSize` moves the batch size: every option, checked.

    Frozen, and checked when made: an instance holds good values only.
    """

    policy: str | BatchPolicy = option(
        "auto",
        "how the batch moves: auto (goodput; a run given a number as its batch size keeps it fixed), "
        "fixed, memory (the largest that fits), noise (noise_k x B_noise), goodput (throughput x "
        "statistical efficiency, as Pollux) or schedule (grow at milestones); or a BatchPolicy object",
        check=_policy,
        example="goodput",
        choices=POLICY_NAMES,
        prepares_data=False,
    )
    lr_rule: str = option(
        "auto",
        "how the lr follows the batch: auto (adascale for SGD, sqrt for adaptive optimizers), none, "
        "linear, sqrt or adascale",
        example="sqrt",
        choices=LR_RULE_NAMES,
        prepares_data=False,
    )
    min_batch: int = option(
        1,
        "the smallest batch a policy may choose (global: all ranks together)",
        check=positive_int,
        example=8,
        prepares_data=False,
    )
    max_batch: int | None = option(
        None,
        "the largest batch a policy may choose (global); unset: memory and the data bound it",
        check=optional(positive_int),
        example=4096,
        prepares_data=False,
    )
    multiple: int = option(
        8,
        "round chosen sizes to a multiple of this (sizes below it stay allowed); 1: no rounding",
        check=positive_int,
        prepares_data=False,
    )
    adjust_every: int = option(
        20,
        "reconsider the batch every N optimizer steps (or each quarter epoch, if sooner); a noise policy "
        "changes it only on fresh noise measurements, which the measurement budget spaces out: "
        "batch_size_decisions.json's 'kept' says why each other decision kept it",
        check=positive_int,
        prepares_data=False,
    )
    min_timed_steps: int = option(
        20,
        "goodput: steps timed at a batch size before it decides again (its throughput model needs them)",
        check=positive_int,
        prepares_data=False,
    )
    measure_every: int = option(
        0,
        "measure the gradient noise scale every N optimizer steps; 0: as often as measure_budget allows",
        check=count,
        example=20,
        prepares_data=False,
    )
    measure_budget: float = option(
        0.02,
        "with measure_every 0: the share of the fit's time the noise measurements may take",
        check=fraction(high=0.5),
        prepares_data=False,
    )
    hysteresis: float = option(
        0.05,
        "resize only when the predicted gain exceeds this (0.05 = 5%)",
        check=number(minimum=0.0),
        prepares_data=False,
    )
    ema_decay: float = option(
        0.9,
        "decay per measurement of the noise EMAs, in [0, 1); used when noise_window is 0",
        check=number(minimum=0.0, below=1.0),
        prepares_data=False,
    )
    noise_window: float = option(
        0.25,
        "the noise EMAs' half-life as a share of the samples seen so far (0: ema_decay per measurement)",
        check=number(minimum=0.0, maximum=10.0),
        prepares_data=False,
    )
    noise_gradients: str = option(
        "auto",
        "the gradients the noise scale is measured on: preconditioned (divided by an adaptive optimizer's "
        "sqrt(v)+eps, the step Adam takes), raw, or auto (preconditioned for Adam-family optimizers)",
        example="raw",
        choices=NOISE_GRADIENTS,
        prepares_data=False,
    )
    noise_k: float = option(
        1.0, "the noise policy trains at noise_k x B_noise", check=number(above=0.0), prepares_data=False
    )
    explore_factor: float = option(
        4.0,
        "goodput times B x explore_factor once, to fit its throughput model",
        check=number(above=1.0),
        prepares_data=False,
    )
    min_efficiency: float = option(
        0.25,
        "goodput keeps to batches of at least this statistical efficiency, in [0, 1) (0: no bound)",
        check=number(minimum=0.0, below=1.0),
        example=0.5,
        prepares_data=False,
    )
    max_lr_scale: float = option(
        10.0,
        "the lr rule's multiplier of the starting lr is at most this (>= 1)",
        check=number(minimum=1.0),
        prepares_data=False,
    )
    milestones: tuple[int, ...] = option(
        (),
        "epochs where the schedule policy multiplies the batch by schedule_factor",
        check=increasing_positive_ints,
        example=(3, 6),
        prepares_data=False,
    )
    schedule_factor: float = option(
        2.0,
        "the schedule policy's growth factor at each milestone",
        check=number(above=0.0),
        prepares_data=False,
    )
    probe_memory: bool = option(
        True,
        "find the largest batch that fits when training starts (off: only max_batch bounds it)",
        check=boolean,
        example=False,
        prepares_data=False,
    )
    memory_budget: float = option(
        0.5,
        "share of free memory the memory probe plans for (available RAM on a CPU, device memory on CUDA)",
        check=fraction(),
        prepares_data=False,
    )
    accumulate: bool = option(
        True,
        "a batch beyond the memory ceiling trains as accumulated micro-batches (one optimizer step); "
        "off: the ceiling caps it",
        check=boolean,
        example=False,
        prepares_data=False,
    )
    schedule_progress: bool = option(
        True,
        "step-interval lr schedulers advance by progress (rows / the starting batch, or AdaScale's gain) "
        "so a schedule planned for the starting batch ends with its data; off: one step per optimizer step",
        check=boolean,
        example=False,
        prepares_data=False,
    )
    log_every: int = option(
        10, "log per-step metrics every N optimizer steps", check=positive_int, prepares_data=False
    )
    fallback_microbatches: int = option(
        8,
        "micro-batches measuring the noise of layers no per-example rule covers",
        check=positive_int,
        prepares_data=False,
    )
    fallback_every: int = option(
        10,
        "with measure_every N > 0: measure those micro-batches every this many steps",
        check=positive_int,
        prepares_data=False,
    )

    def __post_init__(self) -> None:
        self._normalise(check_options(self, KEYWORD))
        self.check_together(KEYWORD)

    def _normalise(self, kept: dict[str, Any]) -> None:
        for name, value in kept.items():
            object.__setattr__(self, name, value)  # a frozen dataclass sets its own fields here

    def check_together(self, spelling: Spelling) -> None:
        """The checks that read two options at once."""
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise UserError(
                f"{spelling.name('max_batch')} {self.max_batch} is below {spelling.name('min_batch')} "
                f"{self.min_batch}; raise it"
            )
        if self.policy == "schedule" and not self.milestones:
            raise UserError(
                f"the schedule policy needs {spelling.name('milestones')} (epochs where the batch grows); "
                f"e.g. {spelling.example('milestones', (3, 6))}"
            )

    @property
    def policy_name(self) -> str:
        """The policy this resolves to: ``auto`` is ``goodput``; a policy object's own name."""
        if isinstance(self.policy, str):
            return "goodput" if self.policy == "auto" else self.policy
        return str(self.policy.name)

    def batch_size_options(self) -> dict[str, Any]:
        """These options as keyword arguments of ``DynamicBatchSize`` (a subclass's own options left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(BatchSizeOptions)}
