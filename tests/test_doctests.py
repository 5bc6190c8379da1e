"""Every docstring example in the package runs (the examples are documentation that must stay true)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_batch

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(lightning_batch.__path__, "lightning_batch.")
    if name != "lightning_batch.cli"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, workdir):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_public_api_imports_as_documented():
    from lightning_batch import DynamicBatchSize, TabularDataModule, TaskModule, tune  # noqa: F401
