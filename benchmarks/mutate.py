"""Mutation testing of one module against the tests that guard it: ``make mutate-<target>``.

mutmut 3 reads its configuration only from ``[tool.mutmut]`` in ``pyproject.toml`` (the plugin's
arithmetic, ``make mutate``) and its CLI takes no other. This script runs mutmut in-process with
that configuration, after replacing the files to mutate and the tests to run by one target's
(``TARGETS``); mutmut forks its workers from this process, so they see the same configuration. A
target may also name the functions to mutate (mutmut's own ``mutmut run NAME-PATTERN``): the file
is still mutated whole, but only those functions' mutants are run and scored.

    python benchmarks/mutate.py checkpoint-io [--max-children 2]   # run, then score
    python benchmarks/mutate.py checkpoint-io --score-only          # score the last run again

It starts afresh in ``mutants/`` (as ``make mutate`` does) and ends with
``benchmarks/mutation_score.py --target <target>``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Target:
    files: list[str]
    tests: list[str]
    #: mutmut mutant-name patterns (fnmatch) to run and score; empty: every mutant of ``files``.
    mutants: list[str] = field(default_factory=list)


TARGETS: dict[str, Target] = {
    "checkpoint-io": Target(
        files=["lightning_batch/plugin/checkpoint_io.py"],
        tests=[
            "tests/test_checkpoint_io.py",
            "tests/test_faults.py::test_the_checkpoint_writer_stages_beside_the_target_and_renames",
            "tests/test_faults.py::test_the_checkpoint_s_bytes_are_on_disk_before_it_is_renamed_over_the_last_one",
        ],
    ),
    "run-owners": Target(
        files=["lightning_batch/tracking/run_owners.py"],
        tests=["tests/test_run_owners.py"],
    ),
    "registry": Target(
        files=["lightning_batch/tracking/model_registry.py"],
        tests=["tests/test_model_registry.py"],
    ),
    "logger": Target(
        files=["lightning_batch/tracking/logger.py"],
        tests=["tests/test_buffered_logger.py"],
    ),
    "loader": Target(
        files=["lightning_batch/plugin/loader.py"],
        tests=["tests/test_loader.py"],
    ),
    "cache": Target(
        files=["lightning_batch/tabular/cache.py"],
        tests=["tests/test_cache_key.py"],
        mutants=[
            "lightning_batch.tabular.cache.x_cache_key__mutmut_*",
            "lightning_batch.tabular.cache.x_preparing_options__mutmut_*",
        ],
    ),
}


def configure(name: str) -> Target:
    """Point mutmut's configuration (read from pyproject.toml) at target ``name``."""
    from mutmut.configuration import config

    target = TARGETS[name]
    cfg = config()
    cfg.only_mutate = list(target.files)
    cfg.pytest_add_cli_args_test_selection = list(target.tests)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--score-only", action="store_true", help="score the mutants/ of the last run")
    args = parser.parse_args(argv)

    target = configure(args.target)
    if not args.score_only:
        shutil.rmtree("mutants", ignore_errors=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from mutmut.__main__ import cli

        try:
            cli.main(
                ["run", "--max-children", str(args.max_children), *target.mutants],
                prog_name="mutmut",
                standalone_mode=False,
            )
        except SystemExit as stop:  # mutmut exits 0 after a run with named mutants
            if stop.code:
                return int(stop.code)
    sys.path.insert(0, str(Path(__file__).parent))
    import mutation_score

    return mutation_score.main(["--target", args.target])


if __name__ == "__main__":
    sys.exit(main())
