"""Summarise a `mutmut run` (the last step of `make mutate`): per file and overall.

Reads mutmut's result files under ``mutants/`` (``<file>.meta``), so run it from the project root
after ``mutmut run``. For every file in ``[tool.mutmut] only_mutate`` it prints killed, timeout,
survived, no-tests and total counts, the survivors judged *equivalent* (the mutation cannot change
behaviour: see ``EQUIVALENT`` below) and the score

    score = (killed + timeout) / (total - equivalent)

A timeout is a detected mutant (it made a test loop or crawl). Survivors that are not listed as
equivalent are printed with their diff: each is a gap in the tests, or a new equivalent mutant to
add to ``EQUIVALENT`` with its reason.

``EQUIVALENT`` matches a survivor by its function and the mutated line (not by mutmut's number,
which shifts whenever the function changes), so an entry goes stale only when that line changes;
stale entries are reported. ``--strict`` exits with status 1 when any survivor is unexplained.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

# (function, a regular expression the mutated line must match in full, why it cannot change behaviour).
# ``function`` is the mangled name's tail as mutmut prints it: ``unbiased_grad_stats`` or
# ``BatchGrid.round`` (class and method). Keep the reasons short; the README lists them grouped.
EQUIVALENT: list[tuple[str, str, str]] = []

STATUSES = ("killed", "timeout", "survived", "no tests")


def _function_of(mutant: str) -> str:
    """``lightning_batch.policy.xǁBatchGridǁround__mutmut_3`` -> ``BatchGrid.round``."""
    tail = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    if tail.startswith("x\u01c1"):
        return ".".join(part for part in tail[2:].split("\u01c1") if part)
    return tail.removeprefix("x_")


def _mutated_lines(diff: str) -> list[str]:
    return [
        line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")
    ]


def _equivalent_reason(function: str, diff: str) -> tuple[int, str] | None:
    lines = _mutated_lines(diff)
    for index, (func, pattern, reason) in enumerate(EQUIVALENT):
        if func == function and any(re.fullmatch(pattern, line) for line in lines):
            return index, reason
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 if a survivor is unexplained")
    parser.add_argument("--quiet", action="store_true", help="no diffs of unexplained survivors")
    args = parser.parse_args()

    if not Path("mutants").is_dir():
        print("no mutants/ folder: run `mutmut run` (or `make mutate`) first", file=sys.stderr)
        return 2

    config()  # reads [tool.mutmut] from ./pyproject.toml
    rows = []
    unexplained: list[tuple[str, str]] = []
    equivalent_by_reason: dict[str, list[str]] = defaultdict(list)
    used_entries: set[int] = set()
    for path in sorted(walk_mutatable_files()):
        if not (Path("mutants") / f"{path}.meta").exists():
            continue
        data = SourceFileMutationData(path=path)
        data.load()
        counts: Counter[str] = Counter()
        equivalent = 0
        for mutant, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            counts[status if status in STATUSES else "other"] += 1
            if status not in ("survived", "no tests"):
                continue
            diff = get_diff_for_mutant(mutant, path=path)
            found = _equivalent_reason(_function_of(mutant), diff)
            if found is None:
                unexplained.append((mutant, diff))
            else:
                used_entries.add(found[0])
                equivalent += 1
                equivalent_by_reason[found[1]].append(mutant.rpartition(".")[2])
        rows.append((str(path), counts, equivalent))

    if not rows:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 2

    if not args.quiet:
        for mutant, diff in unexplained:
            print(f"\n# {mutant}: not equivalent? (a test gap, or add it to EQUIVALENT)\n{diff}")

    if equivalent_by_reason:
        print("\nSurvivors judged equivalent:")
        for reason, mutants in sorted(equivalent_by_reason.items()):
            print(f"  {len(mutants):3d}  {reason}")
    stale = [EQUIVALENT[i][:2] for i in range(len(EQUIVALENT)) if i not in used_entries]
    if stale:
        print("\nEQUIVALENT entries that matched no survivor (killed now, or the line changed):")
        for func, pattern in stale:
            print(f"       {func}: {pattern}")

    header = f"\n{'file':32} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'other':>5} {'total':>6} {'equiv':>6} {'score':>7}"
    print(header)
    total: Counter[str] = Counter()
    total_equivalent = 0
    for name, counts, equivalent in rows:
        total.update(counts)
        total_equivalent += equivalent
        print(_row(name, counts, equivalent))
    print(_row("overall", total, total_equivalent))
    print(
        "\nscore = (killed + timeout) / (total - equivalent); "
        f"{len(unexplained)} survivor(s) not judged equivalent"
    )
    return 1 if args.strict and unexplained else 0


def _row(name: str, counts: Counter[str], equivalent: int) -> str:
    total = sum(counts.values())
    detected = counts["killed"] + counts["timeout"]
    relevant = total - equivalent
    score = f"{100.0 * detected / relevant:6.1f}%" if relevant else "     -"
    return (
        f"{name:32} {counts['killed']:7d} {counts['timeout']:7d} {counts['survived']:8d} "
        f"{counts['no tests']:8d} {counts['other']:5d} {total:6d} {equivalent:6d} {score:>7}"
    )


if __name__ == "__main__":
    sys.exit(main())
