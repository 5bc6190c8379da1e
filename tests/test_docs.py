"""The README's and the documentation's Python examples run as written, and the facts their prose
states are the code's (a stale example is a bug report waiting to happen)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    (page, index, block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
]
WHEN_THINGS_GO_WRONG = ROOT / "docs" / "guides" / "when-things-go-wrong.md"


def test_the_readme_and_the_guides_have_python_examples():
    pages = {page.name for page, _, _ in BLOCKS}
    assert {"README.md", "own-code.md", "tabular-runs.md"} <= pages


@pytest.mark.parametrize(
    ("page", "index", "block"), BLOCKS, ids=[f"{p.relative_to(ROOT)}[{i}]" for p, i, _ in BLOCKS]
)
def test_example_runs(page: Path, index: int, block: str, workdir, capsys):
    namespace: dict = {}
    exec(compile(block, f"{page.relative_to(ROOT)}[python block {index}]", "exec"), namespace)  # noqa: S102
    if "resize" in namespace:  # a callback example: it moved the batch and said why
        resize = namespace["resize"]
        assert resize.decisions and any(d["to"] != d["from"] for d in resize.decisions)
        assert capsys.readouterr().out.strip()


def test_relative_links_of_the_readme_lead_to_files():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which is not there"


def _prose(text: str) -> str:
    return " ".join(text.split())  # a sentence may wrap across lines


def test_the_docs_state_how_many_named_bad_inputs_are_tested(tmp_path):
    """The prose and the reliability table both give the number of cases in test_bad_input.py."""
    from .test_bad_input import _cases

    kinds = len(_cases(tmp_path))
    page = WHEN_THINGS_GO_WRONG.read_text()
    assert re.findall(r"from (\d+) named kinds", _prose(page)) == [str(kinds)]
    assert re.findall(
        r"\| named bad inputs \(one test per kind\) \| bad input \| (\d+) \| (\d+) \|", page
    ) == [(str(kinds), str(kinds))]


def test_the_docs_state_the_nan_skip_limit():
    from lightning_batch.tabular.task_module import MAX_CONSECUTIVE_NAN_SKIPS as limit

    prose = _prose(WHEN_THINGS_GO_WRONG.read_text())
    assert f"up to {limit} NaN steps in a row are skipped, the {limit + 1}" in prose
    assert "MAX_CONSECUTIVE_NAN_SKIPS" in prose
