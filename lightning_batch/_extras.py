"""Optional dependencies: which extra brings which package, and a one-line error when one is missing.

``pip install lightning-batch`` brings what :class:`~lightning_batch.DynamicBatchSize` needs (torch,
Lightning, psutil). The rest comes with extras (``pyproject.toml``)::

    [data]      the tabular path: pandas, pyarrow, scikit-learn, torchmetrics, PyYAML
    [tracking]  MLflow, and what draws and prints its runs: matplotlib, rich
    [tune]      Optuna, optuna-integration, optuna-dashboard (and [data], [tracking])
    [all]       all of the above

A feature that needs a missing package raises :class:`MissingExtraError`, an ``ImportError`` whose
message is one line naming the extra (the CLI prints it as ``error: ...`` and exits with status 2):

    >>> require("math", "data", "the tabular data path").pi > 3
    True
    >>> str(missing_extra("pandas", "data", "the tabular data path"))
    "the tabular data path needs pandas: pip install 'lightning-batch[data]'"
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Iterator
from types import ModuleType

#: Extra -> the import names of the packages it brings (pyproject.toml lists them by pip name).
EXTRA_MODULES = {
    "data": ("pandas", "pyarrow", "sklearn", "torchmetrics", "yaml"),
    "tracking": ("mlflow", "matplotlib", "rich"),
    "tune": ("optuna", "optuna_integration", "optuna_dashboard"),
}

#: Import name -> the name pip installs it by, where the two differ.
_DISTRIBUTION = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "optuna_integration": "optuna-integration",
    "optuna_dashboard": "optuna-dashboard",
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        package = module.partition(".")[0]
        self.extra = extra
        self.feature = feature
        super().__init__(
            f"{feature} needs {_DISTRIBUTION.get(package, package)}: pip install 'lightning-batch[{extra}]'",
            name=package,
        )


def missing_extra(module: str, extra: str, feature: str) -> MissingExtraError:
    """The error to raise when ``module`` (of extra ``extra``) is missing for ``feature``."""
    return MissingExtraError(module, extra, feature)


def _is_missing(exc: ImportError, module: str) -> bool:
    """True when ``exc`` says that ``module``'s top-level package is not there (not a broken install)."""
    return exc.name == module.partition(".")[0]  # "sklearn", not "sklearn.datasets" of an old version


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if its package is not installed, raise :class:`MissingExtraError`.

    An ``ImportError`` from inside an installed package (a broken dependency of it) is raised as is.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if _is_missing(exc, module):
            raise missing_extra(module, extra, feature) from exc
        raise


@contextlib.contextmanager
def extra_imports(extra: str, feature: str) -> Iterator[None]:
    """Module-level imports of an extra's packages: a missing one becomes :class:`MissingExtraError`.

    ::

        with extra_imports("tune", "Optuna tuning"):
            import optuna
    """
    try:
        yield
    except ImportError as exc:
        if not isinstance(exc, MissingExtraError) and exc.name in EXTRA_MODULES.get(extra, ()):
            raise missing_extra(exc.name, extra, feature) from exc
        raise


def check(modules: tuple[str, ...] | str, extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` that is not installed, without
    importing any (``import mlflow`` costs seconds; a feature checks before it starts work)."""
    for module in (modules,) if isinstance(modules, str) else modules:
        top = module.partition(".")[0]
        if sys.modules.get(top) is not None:
            # Imported already (optuna_integration then replaces itself by a module whose
            # __spec__ is None, which find_spec refuses with a ValueError).
            continue
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):  # None in sys.modules, a finder that refuses it
            found = False
        if not found:
            raise missing_extra(module, extra, feature)
