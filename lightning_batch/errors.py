"""The one exception type for bad user input, in a module that imports nothing.

Every module that checks what a user passed (options, YAML files, search spaces, augmentations,
data files) raises :class:`UserError`; the CLI turns it into one ``error: ...`` line and exit
status 2. It lives here, not in :mod:`lightning_batch.config`, so that those modules need not
import the config (and the config need not import them back).

>>> raise UserError("--lr must be a positive number, got -1; try --lr 0.01")
Traceback (most recent call last):
...
lightning_batch.errors.UserError: --lr must be a positive number, got -1; try --lr 0.01
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user: the message is one line saying what is wrong and what to do.

    A ``ValueError``, so that code calling the plugin with a bad argument (``DynamicBatchSize(
    adjust_every=0)``) gets the exception Python code expects for a bad value.
    """
