"""The package's rooms are used in one direction only, and nothing imports in a circle.

The layers, lowest first (a module may import its own layer's modules and lower ones only; an
import inside a function counts as much as one at the top):

    leaves (errors, _extras, store_uri, locks) < plugin < config < placement < tabular
        < tracking (and the model_export shim) < training < tune < cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_batch"

LAYERS = {
    "errors": 0,
    "_extras": 0,
    "store_uri": 0,
    "locks": 0,
    "plugin": 1,
    "config": 2,
    "placement": 3,
    "tabular": 4,
    "tracking": 5,
    "model_export": 5,
    "training": 6,
    "tune": 7,
    "cli": 8,
}


def _room(module: str) -> str:
    """``lightning_batch.plugin.noise`` -> ``plugin``; ``lightning_batch.config`` -> ``config``."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """Module (dotted) -> the package modules it imports (dotted), anywhere in its code."""
    graph: dict[str, set[str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = []  # imports for annotations only: no dependency at run time
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_batch"):
                if node.module in ("lightning_batch", "lightning_batch.plugin", "lightning_batch.tabular"):
                    # ``from lightning_batch.plugin import policy``: the names are modules
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
                else:
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("lightning_batch."))
        graph[name] = {d for d in deps if d.count(".") >= 1}
    return graph


def test_every_module_belongs_to_a_layer():
    rooms = {_room(m) for m in _imports() if m != "lightning_batch"}
    assert rooms <= set(LAYERS), f"modules outside the layout: {sorted(rooms - set(LAYERS))}"


def test_imports_go_down_the_layers_only():
    wrong = []
    for module, deps in _imports().items():
        if module == "lightning_batch":  # the lazy public API names everything, imports nothing
            continue
        for dep in deps:
            if LAYERS[_room(dep)] > LAYERS[_room(module)]:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "imports up the layers:\n" + "\n".join(sorted(wrong))


def test_the_plugin_imports_nothing_but_itself_and_the_error_type():
    for module, deps in _imports().items():
        if module.startswith("lightning_batch.plugin"):
            outside = {
                d
                for d in deps
                if not d.startswith("lightning_batch.plugin") and d != "lightning_batch.errors"
            }
            assert not outside, f"{module} imports {sorted(outside)}"


def test_no_import_cycles():
    graph = _imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_option_declarations_and_the_config_import_without_torch():
    """``run.py --help`` and a bad flag answer before torch is imported (seconds on a cold machine)."""
    code = (
        "import sys; import lightning_batch.config, lightning_batch.plugin.options, lightning_batch.errors; "
        "print(sorted(m for m in ('torch', 'lightning', 'numpy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_stable_paths_still_import():
    """What users and logged models name: the public API and the path every logged model's code imports."""
    import lightning_batch
    from lightning_batch.model_export import TabularPyfuncModel
    from lightning_batch.tracking.run_model import TabularPyfuncModel as Moved

    assert TabularPyfuncModel is Moved
    for name in ("DynamicBatchSize", "TaskModule", "TabularDataModule", "RunConfig", "train", "tune"):
        assert getattr(lightning_batch, name) is not None


def test_the_lightning_batch_command_is_installed_and_is_run_py():
    """``[project.scripts]``: after ``pip install``, ``lightning-batch`` runs the CLI (here: a bad flag)."""
    import tomllib

    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"lightning-batch": "lightning_batch.cli:run"}
    command = Path(sys.executable).with_name("lightning-batch")
    assert command.is_file(), "the project is not installed in this environment (make venv installs it)"
    out = subprocess.run(
        [str(command), "train", "--epochs", "0"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == ["error: --epochs must be a positive integer, got 0; e.g. --epochs 200"]
