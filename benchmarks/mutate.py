"""Mutation testing of one module against the tests that guard it: ``make mutate-<target>``.

mutmut 3 reads its configuration only from ``[tool.mutmut]`` in ``pyproject.toml`` (the plugin's
arithmetic, ``make mutate``) and its CLI takes no other. This script runs mutmut in-process with
that configuration, after replacing the files to mutate and the tests to run by one target's
(``TARGETS``); mutmut forks its workers from this process, so they see the same configuration. A
target may also name the functions to mutate (mutmut's own ``mutmut run NAME-PATTERN``): the file
is still mutated whole, but only those functions' mutants are run and scored.

    python benchmarks/mutate.py checkpoint-io [--max-children 2]   # run, then score
    python benchmarks/mutate.py checkpoint-io --score-only          # score the last run again
    python benchmarks/mutate.py checkpoint-io --rerun-survivors     # after adding tests: only those

It starts afresh in ``mutants/`` (as ``make mutate`` does) and ends with
``benchmarks/mutation_score.py --target <target>``. ``--rerun-survivors`` keeps the last run's
verdicts and runs again only its survivors not judged equivalent, against the tests as they are
now (mutmut copies ``tests/`` again and, its test-to-function map deleted, maps them afresh).
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
        tests=[
            "tests/test_model_registry.py",
            "tests/test_model_export.py::test_an_equal_val_loss_leaves_the_champion_where_it_is",
            "tests/test_model_export.py::test_a_version_is_judged_by_its_runs_best_val_loss_not_its_last",
            "tests/test_model_export.py::test_register_refuses_a_bad_name_before_training",
        ],
    ),
    "logger": Target(
        files=["lightning_batch/tracking/logger.py"],
        tests=[
            "tests/test_buffered_logger.py",
            "tests/test_mlflow_runs.py::test_flush_returns_once_every_metric_logged_is_in_the_store",
            "tests/test_mlflow_runs.py::test_a_failed_metric_write_is_raised_by_the_next_flush",
        ],
    ),
    "loader": Target(
        files=["lightning_batch/plugin/loader.py"],
        tests=[
            "tests/test_loader.py",
            "tests/test_plugin.py::test_a_plain_loader_is_resized_mid_epoch_and_each_epoch_trains_every_row_once[0]",
            "tests/test_plugin.py::test_a_loader_that_cannot_be_resized_is_refused_in_one_line",
            "tests/test_plugin.py::test_a_subclassed_loader_keeps_its_own_arguments_collate_generator_and_drop_last",
            "tests/test_plugin.py::test_lightning_sees_the_loader_as_resumable_and_a_mid_epoch_resume_does_not_warn",
            "tests/test_plugin.py::test_a_plain_loader_with_drop_last_never_trains_a_short_last_batch_even_after_a_resize",
        ],
    ),
    "cache": Target(
        files=["lightning_batch/tabular/cache.py"],
        tests=[
            "tests/test_cache_key.py",
            "tests/test_data_cache.py::test_a_generator_is_keyed_by_its_parameters",
            "tests/test_data_cache.py::test_each_option_declared_to_prepare_the_data_moves_the_key",
            "tests/test_data_cache.py::test_an_option_declared_not_to_prepare_the_data_leaves_the_key",
            "tests/test_data_cache.py::test_an_option_without_a_decision_is_in_the_key",
        ],
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
    parser.add_argument(
        "--rerun-survivors", action="store_true", help="run the last run's unexplained survivors again"
    )
    args = parser.parse_args(argv)

    target = configure(args.target)
    sys.path.insert(0, str(Path(__file__).parent))
    import mutation_score

    names = list(target.mutants)
    if args.rerun_survivors:
        listing = io.StringIO()
        with contextlib.redirect_stdout(listing):
            mutation_score.main(["--target", args.target, "--names"])
        names = listing.getvalue().split()
        if not names:
            print("no unexplained survivors to run again")
            return mutation_score.main(["--target", args.target])
        Path("mutants/mutmut-stats.json").unlink(missing_ok=True)
    elif not args.score_only:
        shutil.rmtree("mutants", ignore_errors=True)
    if not args.score_only:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from mutmut.__main__ import cli

        try:
            cli.main(
                ["run", "--max-children", str(args.max_children), *names],
                prog_name="mutmut",
                standalone_mode=False,
            )
        except SystemExit as stop:  # mutmut exits 0 after a run with named mutants
            if stop.code:
                return int(stop.code)
    return mutation_score.main(["--target", args.target])


if __name__ == "__main__":
    sys.exit(main())
