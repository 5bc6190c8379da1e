"""A lean install: ``pip install lightning-batch`` brings only what the callback needs.

The lean environments here are real, not simulated: the distributions a ``pip install`` would bring
(pyproject.toml's requirements, followed through each installed distribution's own requirements) are
linked into a fresh folder, and a child Python with no site-packages of its own (``-I -S``) sees only
those. Blocking modules with ``sys.modules[name] = None`` would not do: Lightning and torchmetrics
decide from package metadata whether e.g. matplotlib is there, then import it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lightning_batch._extras import EXTRA_MODULES, MissingExtraError, check, extra_imports, require

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
NAME = canonicalize_name(PROJECT["name"])
#: The packages the callback imports (callback, sampler, noise, policy, memory, cadence, ...).
LEAN = {"torch", "lightning", "psutil"}
OPTIONAL_MODULES = sorted(
    {m for modules in EXTRA_MODULES.values() for m in modules} - {"torchmetrics", "yaml"}
)


# ------------------------------------------------------------------------------------------------
# What `pip install lightning-batch[extras]` brings, from the distributions installed here


def _project_requirements(extras: set[str]) -> list[Requirement]:
    """pyproject's base requirements plus those of ``extras``, self-references expanded."""
    wanted, seen, out = set(extras), set(), [Requirement(r) for r in PROJECT["dependencies"]]
    while wanted - seen:
        extra = (wanted - seen).pop()
        seen.add(extra)
        for text in PROJECT["optional-dependencies"][extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == NAME:
                wanted |= req.extras
            else:
                out.append(req)
    return out


def _closure(extras: set[str]) -> dict[str, importlib.metadata.Distribution]:
    """Every installed distribution that installing the project with ``extras`` would bring."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [
        (canonicalize_name(r.name), frozenset(r.extras))
        for r in _project_requirements(extras)
        if r.marker is None or r.marker.evaluate({"extra": ""})
    ]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in done:
            continue
        done.add((name, wanted))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (a platform-specific dependency): nothing to link
        found[name] = dist
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (*wanted, "")):
                todo.append((canonicalize_name(sub.name), frozenset(sub.extras)))
    return found


def _lean_site(tmp_path: Path, extras: set[str]) -> Path:
    """A folder holding (links to) exactly the distributions of ``extras``."""
    site = tmp_path / ("site-" + ("-".join(sorted(extras)) or "base"))
    site.mkdir()
    for dist in _closure(extras).values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or (site / top).exists():
                continue
            (site / top).symlink_to(Path(str(dist.locate_file(top))).resolve())
    return site


def _run_isolated(site: Path, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python that sees only ``site`` and this checkout (no venv site-packages)."""
    prelude = f"import sys; sys.path[:0] = [{str(site)!r}, {str(ROOT)!r}]\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=site.parent,
        env=env,
    )


# ------------------------------------------------------------------------------------------------
# pyproject.toml


def test_base_dependencies_are_the_lean_set() -> None:
    assert {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]} == LEAN


def test_each_extra_brings_the_packages_its_features_import() -> None:
    """Every import name of ``EXTRA_MODULES[extra]`` is a distribution that ``[extra]`` lists."""
    owners = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        listed = {canonicalize_name(r.name) for r in _project_requirements({extra})}
        for module in modules:
            assert {canonicalize_name(d) for d in owners[module]} & listed, (extra, module)
    everything = {
        canonicalize_name(r.name)
        for r in _project_requirements(set(PROJECT["optional-dependencies"]) - {"dev"})
    }
    assert {canonicalize_name(r.name) for r in _project_requirements({"all"})} == everything
    assert "mlflow" not in {canonicalize_name(r.name) for r in _project_requirements({"data"})}


def test_makefile_installs_every_extra() -> None:
    assert 'pip install --quiet -e ".[all,dev]"' in (ROOT / "Makefile").read_text()


# ------------------------------------------------------------------------------------------------
# The helper


def test_require_names_the_extra_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError) as caught:
        require("pandas", "data", "the tabular data path")
    assert str(caught.value) == "the tabular data path needs pandas: pip install 'lightning-batch[data]'"
    assert isinstance(caught.value, ImportError) and caught.value.extra == "data"
    with pytest.raises(ImportError, match=r"needs scikit-learn: pip install 'lightning-batch\[data\]'"):
        monkeypatch.setitem(sys.modules, "sklearn", None)
        check(("math", "sklearn.datasets"), "data", "splitting")
    with pytest.raises(MissingExtraError, match=r"^Optuna tuning needs optuna: .*\[tune\]'$"):
        monkeypatch.setitem(sys.modules, "optuna", None)
        with extra_imports("tune", "Optuna tuning"):
            import optuna  # noqa: F401


def test_a_broken_dependency_is_not_blamed_on_the_extra() -> None:
    """An ImportError from inside an installed package (not the package missing) passes unchanged."""
    with pytest.raises(ImportError) as caught, extra_imports("tracking", "MLflow tracking"):
        raise ImportError("libfoo.so: cannot open shared object file", name="_cffi_backend")
    assert not isinstance(caught.value, MissingExtraError)
    with pytest.raises(ModuleNotFoundError) as caught2:
        require("lightning_batch.no_such_module", "data", "x")
    assert not isinstance(caught2.value, MissingExtraError)


# ------------------------------------------------------------------------------------------------
# Real lean environments

PLUGIN_FIT = textwrap.dedent(
    """
    import importlib.util, json, sys
    present = [m for m in MODULES if importlib.util.find_spec(m) is not None]

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_batch
    from lightning_batch import DynamicBatchSize

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            self.sampler = type(self.trainer.train_dataloader.batch_sampler).__name__
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = x.sum(1, keepdim=True)
    resizer = DynamicBatchSize(probe_memory=False, adjust_every=2, min_timed_steps=2)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[resizer],
        enable_progress_bar=False, enable_model_summary=False,
    )
    model = Plain()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))

    import importlib, pkgutil
    import lightning_batch.plugin
    plugin_modules = {}
    for info in pkgutil.iter_modules(lightning_batch.plugin.__path__, "lightning_batch.plugin."):
        try:
            importlib.import_module(info.name)
            plugin_modules[info.name] = "ok"
        except Exception as exc:
            plugin_modules[info.name] = f"{type(exc).__name__}: {exc}"

    errors = {}
    for name in ("TabularDataModule", "train", "tune"):
        try:
            getattr(lightning_batch, name)
        except ImportError as exc:
            errors[name] = [type(exc).__name__, str(exc)]
    try:
        from lightning_batch.tracking.logger import BufferedMLFlowLogger
        BufferedMLFlowLogger(tracking_uri="sqlite:///x.db")
    except ImportError as exc:
        errors["BufferedMLFlowLogger"] = [type(exc).__name__, str(exc)]
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in MODULES)
    sampler = model.sampler
    print(json.dumps({"present": present, "loaded": loaded, "steps": trainer.global_step,
                      "sampler": sampler, "errors": errors, "plugin": plugin_modules}))
    """
)


def test_callback_fits_with_only_torch_and_lightning(tmp_path: Path) -> None:
    site = _lean_site(tmp_path, set())
    code = f"MODULES = {OPTIONAL_MODULES!r}\n" + PLUGIN_FIT
    out = _run_isolated(site, code)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["present"] == [], "the lean environment holds an optional package"
    assert result["loaded"] == []
    assert result["steps"] > 0
    assert result["sampler"] == "ResizableBatchSampler"  # the callback drove the user's loader
    # every module of the plugin imports with torch and Lightning alone
    assert len(result["plugin"]) >= 12 and set(result["plugin"].values()) == {"ok"}, result["plugin"]
    data = "the tabular data path needs pandas: pip install 'lightning-batch[data]'"
    assert result["errors"] == {
        "TabularDataModule": ["MissingExtraError", data],
        "train": ["MissingExtraError", data],
        "tune": ["MissingExtraError", "Optuna tuning needs optuna: pip install 'lightning-batch[tune]'"],
        "BufferedMLFlowLogger": [
            "MissingExtraError",
            "MLflow tracking needs mlflow: pip install 'lightning-batch[tracking]'",
        ],
    }


@pytest.mark.parametrize(
    ("extras", "command", "missing", "extra"),
    [
        (set(), ["train", "--data", "diabetes"], "pandas", "data"),
        ({"data"}, ["train", "--data", "diabetes"], "mlflow", "tracking"),
        # The same check for the other commands, in the slow suite (each builds its own environment).
        pytest.param(
            {"data", "tracking"},
            ["tune", "--data", "diabetes", "--trials", "1"],
            "optuna",
            "tune",
            marks=pytest.mark.slow,
        ),
        pytest.param({"data", "tracking"}, ["dashboard"], "optuna", "tune", marks=pytest.mark.slow),
        pytest.param({"data"}, ["ui"], "mlflow", "tracking", marks=pytest.mark.slow),
    ],
    ids=["train-without-data", "train-without-tracking", "tune-without-tune", "dashboard", "ui"],
)
def test_cli_names_the_missing_extra(
    tmp_path: Path, extras: set[str], command: list[str], missing: str, extra: str
) -> None:
    site = _lean_site(tmp_path, extras)
    code = (
        "import importlib.util\n"
        f"assert importlib.util.find_spec({missing!r}) is None, 'the extra is installed'\n"
        "import runpy\n"
        f"sys.argv = [{str(ROOT / 'experiments' / 'run.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    out = _run_isolated(site, code, *command, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [
        f"error: run.py {command[0]} needs {missing}: pip install 'lightning-batch[{extra}]'"
    ]
    assert not (tmp_path / "mlruns").exists()
