"""The one set of argument checks: each says what a value must be, and returns it normalised.

A check is a plain function ``value -> value``: it returns the value as the option keeps it (an
``int`` for a whole number, a ``float`` for a number, a ``tuple`` for a list) or raises
:class:`CheckFailed` with the *problem* in a few words ("must be a positive integer"). It does not
know how the option is spelled where the user wrote it: the caller composes the one-line message,
``adjust_every=20`` for a keyword argument, ``--adjust-every 20`` for a flag (see
:func:`lightning_batch.plugin.options.spelled_error`).

>>> positive_int(3), fraction()(0.5), number(minimum=0.0, below=1.0)(0)
(3, 0.5, 0.0)
>>> positive_int(0)
Traceback (most recent call last):
...
lightning_batch.plugin.checks.CheckFailed: must be a positive integer
>>> one_of(("sgd", "adam"))("Adam")
Traceback (most recent call last):
...
lightning_batch.plugin.checks.CheckFailed: must be one of sgd|adam
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_batch.errors import UserError

__all__ = [
    "FLAG",
    "KEYWORD",
    "Check",
    "CheckFailed",
    "Spelling",
    "checked",
    "boolean",
    "count",
    "fraction",
    "increasing_positive_ints",
    "integer",
    "is_number",
    "number",
    "one_of",
    "optional",
    "positive_int",
    "positive_ints",
    "text",
]

#: A check: the value as given -> the value as kept, or :class:`CheckFailed`.
Check = Callable[[Any], Any]
T = TypeVar("T")


class CheckFailed(ValueError):
    """A value an option does not accept; the message is the problem only ("must be ...")."""


@dataclass(frozen=True)
class Spelling:
    """How an option is written where the user gave it: a keyword argument or a flag (and YAML key)."""

    kind: str  # "keyword" | "flag"

    def name(self, option: str) -> str:
        """``adjust_every`` as the user wrote it: ``adjust_every`` or ``--adjust-every``."""
        return option if self.kind == "keyword" else "--" + option.replace("_", "-")

    def example(self, option: str, value: Any) -> str:
        """A good value, written as the user would write it: ``adjust_every=20``, ``--adjust-every 20``."""
        if self.kind == "keyword":
            return f"{option}={value!r}"
        if isinstance(value, bool):
            return self.name(option) if value else "--no-" + option.replace("_", "-")
        if isinstance(value, (list, tuple)):
            return f"{self.name(option)} {' '.join(map(str, value))}"
        return f"{self.name(option)} {value}"


KEYWORD = Spelling("keyword")
FLAG = Spelling("flag")


def checked(
    option: str, value: Any, check: Callable[[Any], T], example: Any, spelling: Spelling = KEYWORD
) -> T:
    """``check(value)``, or a one-line :class:`~lightning_batch.errors.UserError` (a ``ValueError``)
    that names the option as the user spelled it, the value, and a value that works.

    >>> checked("adjust_every", 0, positive_int, 20)
    Traceback (most recent call last):
    ...
    lightning_batch.errors.UserError: adjust_every must be a positive integer, got 0; e.g. adjust_every=20
    >>> checked("adjust_every", 0, positive_int, 20, FLAG)
    Traceback (most recent call last):
    ...
    lightning_batch.errors.UserError: --adjust-every must be a positive integer, got 0; e.g. --adjust-every 20
    """
    try:
        return check(value)
    except CheckFailed as failed:
        raise UserError(
            f"{spelling.name(option)} {failed}, got {value!r}; e.g. {spelling.example(option, example)}"
        ) from None


def is_number(value: Any) -> bool:
    """A real number that is not a ``bool`` (``True`` is an int to Python, not to a user)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    """A whole number (NumPy's too) that is not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    """A whole number >= 1.

    >>> positive_int(True)
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be a positive integer
    """
    if not _whole(value) or value < 1:
        raise CheckFailed("must be a positive integer")
    return int(value)


def integer(*, minimum: int) -> Callable[[Any], int]:
    """A whole number >= ``minimum``.

    >>> integer(minimum=2)(1)
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be a whole number >= 2
    """

    def check(value: Any) -> int:
        if not _whole(value) or value < minimum:
            raise CheckFailed(f"must be a whole number >= {minimum}")
        return int(value)

    return check


def text(value: Any) -> str:
    """A non-empty string.

    >>> text("  ")
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be a non-empty text
    """
    if not isinstance(value, str) or not value.strip():
        raise CheckFailed("must be a non-empty text")
    return value


def count(value: Any) -> int:
    """A whole number >= 0 (0 usually means "off" or "automatic").

    >>> count(0)
    0
    """
    if not _whole(value) or value < 0:
        raise CheckFailed("must be a whole number >= 0")
    return int(value)


def number(
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    maximum: float | None = None,
) -> Callable[[Any], float]:
    """A finite number within the bounds given (``minimum`` <= x, ``above`` < x, x < ``below``, x <= ``maximum``).

    >>> number(above=1.0)(1)
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be above 1
    """

    def check(value: Any) -> float:
        if not is_number(value) or not math.isfinite(float(value)):
            raise CheckFailed("must be a finite number")
        x = float(value)
        if minimum is not None and x < minimum:
            raise CheckFailed(f"must be at least {minimum:g}")
        if above is not None and x <= above:
            raise CheckFailed(f"must be above {above:g}")
        if below is not None and x >= below:
            raise CheckFailed(f"must be below {below:g}")
        if maximum is not None and x > maximum:
            raise CheckFailed(f"must be at most {maximum:g}")
        return x

    return check


def fraction(*, high: float = 1.0, zero: bool = False) -> Callable[[Any], float]:
    """A share: a finite number in (0, ``high``], or [0, ``high``] with ``zero``.

    >>> fraction(high=0.5)(0.75)
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be in (0, 0.5]
    """
    interval = f"{'[0' if zero else '(0'}, {high:g}]"

    def check(value: Any) -> float:
        if not is_number(value) or not math.isfinite(float(value)):
            raise CheckFailed(f"must be a number in {interval}")
        x = float(value)
        if x > high or x < 0 or (x == 0 and not zero):
            raise CheckFailed(f"must be in {interval}")
        return x

    return check


def boolean(value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not the string "no").

    >>> boolean("no")
    Traceback (most recent call last):
    ...
    lightning_batch.plugin.checks.CheckFailed: must be true or false
    """
    if not isinstance(value, bool):
        raise CheckFailed("must be true or false")
    return value


def one_of(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[Any], str]:
    """One of a few names; ``choices`` may be a function, read when the check runs (a registry
    that is filled later, or that would be an import cycle to read now)."""

    def check(value: Any) -> str:
        names = tuple(choices() if callable(choices) else choices)
        if value not in names:
            raise CheckFailed(f"must be one of {'|'.join(names)}")
        return str(value)

    return check


def optional(inner: Callable[[Any], T]) -> Callable[[Any], T | None]:
    """``None`` (unset), or what ``inner`` accepts.

    >>> optional(positive_int)(None) is None
    True
    """

    def check(value: Any) -> T | None:
        return None if value is None else inner(value)

    return check


def positive_ints(value: Any) -> tuple[int, ...]:
    """A non-empty list of whole numbers >= 1 (one number is a list of one).

    >>> positive_ints(64), positive_ints([32, 16])
    ((64,), (32, 16))
    """
    items = [value] if _whole(value) else value
    if not isinstance(items, (list, tuple)) or not items or not all(_whole(v) and v > 0 for v in items):
        raise CheckFailed("must be positive integers")
    return tuple(int(v) for v in items)


def increasing_positive_ints(value: Any) -> tuple[int, ...]:
    """A list, possibly empty, of increasing whole numbers >= 1 (one number is a list of one).

    >>> increasing_positive_ints([3, 6]), increasing_positive_ints(())
    ((3, 6), ())
    """
    items = [value] if _whole(value) else value
    if not isinstance(items, (list, tuple)) or not all(_whole(v) and v > 0 for v in items):
        raise CheckFailed("must be positive integers")
    if any(b <= a for a, b in itertools.pairwise(items)):
        raise CheckFailed("must be increasing")
    return tuple(int(v) for v in items)
