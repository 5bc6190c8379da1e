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
        assert resize.decisions and any(d["to"] != d["from"] for d in resize.decisions)
        assert capsys.readouterr().out.strip()


def _prose(text: str) -> str:
    return " ".join(text.split())  # a sentence may wrap across lines


def test_the_readme_states_how_many_named_bad_inputs_are_tested(tmp_path):
    """The prose and the reliability table both give the number of cases in test_bad_input.py."""
    from .test_bad_input import _cases

    kinds = len(_cases(tmp_path))
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"from (\d+) named kinds", _prose(readme)) == [str(kinds)]
    assert re.findall(
        r"\| named bad inputs \(one test per kind\) \| bad input \| (\d+) \| (\d+) \|", readme
    ) == [(str(kinds), str(kinds))]


def test_the_readme_states_the_nan_skip_limit():
    from lightning_batch.tabular.task_module import MAX_CONSECUTIVE_NAN_SKIPS as limit

    prose = _prose((ROOT / "README.md").read_text())
    assert f"up to {limit} NaN steps in a row are skipped, the {limit + 1}" in prose
    assert "MAX_CONSECUTIVE_NAN_SKIPS" in prose
