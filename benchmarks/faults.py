"""Reliability report: run the fault-injection and bad-input tests, repeatedly, and count.

Each row runs real tests (``tests/test_faults.py``, ``test_bad_input.py``, ``test_fuzz_input.py``,
``test_concurrency.py``, ``test_tuning.py``) in fresh pytest processes; a test passes only if every
fault it injects is survived as specified (same result as an undisturbed run, nothing lost, the run
in the right state). Faults per test are what each test injects (a SIGKILL, 3 OOMs, a kill during a
save, ...); random steps and kill times differ on every repetition.

    python benchmarks/faults.py [--rounds 3] [--fuzz-examples 300]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    name: str
    tests: str  # pytest node id(s) / -k expression
    faults_per_test: int
    kind: str  # "fault" or "bad input"
    repeat: bool = True


ROWS = [
    Row(
        "SIGKILL at a random step, then --resume",
        "tests/test_faults.py::test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run",
        1,
        "fault",
    ),
    Row(
        "SIGKILL during a checkpoint save",
        "tests/test_faults.py::test_a_kill_during_a_checkpoint_save_leaves_the_last_one_whole",
        1,
        "fault",
    ),
    Row(
        "out-of-memory at 3 random steps",
        "tests/test_faults.py::test_out_of_memory_at_random_steps_is_recovered_with_the_same_result",
        3,
        "fault",
    ),
    Row("NaN loss (fail / skip)", "tests/test_faults.py -k nan", 1, "fault"),
    Row("batch that never fits the memory budget", "tests/test_faults.py -k budget", 1, "fault"),
    Row(
        "tuning worker SIGKILLed mid-trial",
        "tests/test_tuning.py::test_a_killed_worker_trial_fails_and_is_retried",
        1,
        "fault",
    ),
    Row("4 trainings + 2 tuning workers, fresh store", "tests/test_concurrency.py", 1, "fault", repeat=False),
    Row(
        "SIGKILL at a fixed mid-epoch step after a resize, then resume",
        "tests/test_resume.py::test_a_kill_mid_epoch_after_a_resize_resumes_exactly",
        1,
        "fault",
        repeat=False,  # deterministic: one run says it all
    ),
    Row(
        "named bad inputs (one per kind)",
        "tests/test_bad_input.py::test_bad_input_is_one_line_and_exit_2",
        1,
        "bad input",
        repeat=False,
    ),
]


def run_pytest(selection: str, env: dict[str, str]) -> tuple[int, int, float]:
    """(tests passed, tests run, seconds) of one pytest process."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        args = selection.split()
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - started
        suite = ElementTree.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        total = int(suite.get("tests", 0)) - int(suite.get("skipped", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        return total - bad, total, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each randomised fault test")
    parser.add_argument("--fuzz-examples", type=int, default=300, help="hypothesis examples of fuzzed input")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)

    lines = []
    totals = {"fault": [0, 0], "bad input": [0, 0]}
    for row in ROWS:
        passed = run = 0
        for _ in range(args.rounds if row.repeat else 1):
            p, n, _ = run_pytest(row.tests, env)
            passed, run = passed + p, run + n
        injected, survived = run * row.faults_per_test, passed * row.faults_per_test
        totals[row.kind][0] += injected
        totals[row.kind][1] += survived
        lines.append((row.name, row.kind, injected, survived))
        print(f"  {row.name:<45} {survived}/{injected}", flush=True)

    fuzz_env = {**env, "LIGHTNING_BATCH_FUZZ_EXAMPLES": str(args.fuzz_examples)}
    p, n, _ = run_pytest("tests/test_fuzz_input.py -m slow", fuzz_env)
    fuzz_ok = args.fuzz_examples if p == n and n else 0
    totals["bad input"][0] += args.fuzz_examples
    totals["bad input"][1] += fuzz_ok
    lines.append(
        (f"fuzzed CSVs and flags ({args.fuzz_examples} examples)", "bad input", args.fuzz_examples, fuzz_ok)
    )

    print("\n| what | kind | injected / tried | survived / refused cleanly |")
    print("|---|---|---|---|")
    for name, kind, injected, survived in lines:
        print(f"| {name} | {kind} | {injected} | {survived} |")
    faults, inputs = totals["fault"], totals["bad input"]
    print(
        f"\nfaults survived: {faults[1]}/{faults[0]}; bad inputs trained or refused cleanly: {inputs[1]}/{inputs[0]}; "
        f"runs or trials lost: {faults[0] - faults[1]}"
    )


if __name__ == "__main__":
    main()
