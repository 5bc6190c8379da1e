"""The README's Python examples run as written (a stale example is a bug report waiting to happen)."""

from __future__ import annotations

import re

import pytest

from .conftest import ROOT

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, workdir, capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102
    if "resize" in namespace:  # the callback example: it moved the batch and said why
        resize = namespace["resize"]
        assert resize.decisions and resize.batch_size != 32
        assert capsys.readouterr().out.strip()
