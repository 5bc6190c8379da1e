"""Every option is declared once, and the five surfaces derived from it agree.

The surfaces: DynamicBatchSize's keyword arguments, RunConfig's fields, the YAML keys, an Optuna
search space and the ``run.py`` flags. For each declared option, each surface that has it must show
the same name, the same default and the same check (the same value refused with the same problem),
and a value given on any surface must reach the callback the training path builds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_batch.cli import TUNE_FLAGS, build_parser, config_from_args, tune_config_from_args
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.plugin import policy
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.plugin.checks import FLAG, KEYWORD, CheckFailed, positive_int
from lightning_batch.plugin.options import (
    BatchSizeOptions,
    default_of,
    option,
    option_fields,
    undecided_options,
)
from lightning_batch.training import build_resizer
from lightning_batch.tune.space import TuneConfig, apply_params, parse_space, searchable

CALLBACK_OPTIONS = option_fields(BatchSizeOptions)
RUN_OPTIONS = option_fields(RunConfig)


def _subparser(name: str) -> Any:
    return build_parser()._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]


def _flags(command: str = "train") -> dict[str, Any]:
    """dest -> the argparse action of each flag of ``command``."""
    return {a.dest: a for a in _subparser(command)._actions if a.option_strings}


#: A value each option refuses, to check that every surface refuses it with the same problem.
BAD_VALUES: dict[str, Any] = {
    "policy": "bogus",
    "lr_rule": "cubic",
    "noise_gradients": "whitened",
    "min_batch": 0,
    "max_batch": -4,
    "multiple": 0,
    "adjust_every": 0,
    "min_timed_steps": 1.5,
    "measure_every": -1,
    "measure_budget": 0.9,
    "hysteresis": -0.1,
    "ema_decay": 1.0,
    "noise_window": 11.0,
    "noise_k": 0.0,
    "explore_factor": 1.0,
    "min_efficiency": 1.0,
    "max_lr_scale": 0.5,
    "milestones": [5, 3],
    "schedule_factor": math.nan,
    "probe_memory": "no",
    "memory_budget": 0.0,
    "accumulate": 1,
    "schedule_progress": "yes",
    "log_every": True,
    "fallback_microbatches": 0,
    "fallback_every": 0,
}


# -- one declaration ---------------------------------------------------------------------------------


def test_every_option_has_a_name_a_default_a_one_line_help_and_a_check():
    for f, info in RUN_OPTIONS:
        assert default_of(f) is not None or "None" in str(f.type), f.name
        assert info.help and "\n" not in info.help and not info.help.endswith("."), f.name
        assert info.check is not None or f.name == "space", f.name
        if info.check is not None:
            info.check(default_of(f))  # the default passes its own check
            info.check(info.example)  # and so does the example the messages quote
    assert [f.name for f, _ in RUN_OPTIONS[: len(CALLBACK_OPTIONS)]] == [f.name for f, _ in CALLBACK_OPTIONS]


def test_the_bad_value_table_covers_every_callback_option():
    assert set(BAD_VALUES) == {f.name for f, _ in CALLBACK_OPTIONS}


def test_every_run_option_decides_whether_it_changes_the_prepared_data():
    """The data cache's key is the options declared ``prepares_data=True``: an option added without
    saying yes or no fails here, before a wrong "no" could let a run reuse another run's tables.
    (Whether each decision is right is checked against the preparation in tests/test_data_cache.py.)"""
    undecided = undecided_options(RunConfig)
    assert undecided == [], f"declare prepares_data=True or False for: {', '.join(undecided)}"


def test_an_option_added_without_that_decision_is_named():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Grown(RunConfig):
        extra: int = option(1, "an option added without its decision", check=positive_int, group="data")
        decided: int = option(1, "one added with it", check=positive_int, group="data", prepares_data=False)

    assert undecided_options(Grown) == ["extra"]


# -- surface 1: the callback's keyword arguments ------------------------------------------------------


def test_the_callback_takes_every_declared_option_with_its_default():
    params = inspect.signature(DynamicBatchSize).parameters
    for f, _ in CALLBACK_OPTIONS:
        assert f.name in params, f"DynamicBatchSize has no argument {f.name}"
        assert params[f.name].default == default_of(f), f.name
    assert set(params) == {f.name for f, _ in CALLBACK_OPTIONS}


def test_the_callback_docstring_describes_every_argument():
    from docstring_parser import parse

    documented = {p.arg_name: p.description for p in parse(DynamicBatchSize.__doc__ or "").params}
    for f, info in CALLBACK_OPTIONS:
        assert documented.get(f.name, "").startswith(info.help), f.name
    assert set(documented) == {f.name for f, _ in CALLBACK_OPTIONS}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_each_surface_refuses_a_bad_value_with_the_same_problem(name: str):
    check = dict((f.name, info) for f, info in CALLBACK_OPTIONS)[name].check
    assert check is not None
    with pytest.raises(CheckFailed) as declared:
        check(BAD_VALUES[name])
    problem = str(declared.value)
    value = repr(BAD_VALUES[name])
    # the callback: keyword spelling
    with pytest.raises(UserError) as by_keyword:
        DynamicBatchSize(**{name: BAD_VALUES[name]})
    assert str(by_keyword.value).startswith(f"{KEYWORD.name(name)} {problem}, got {value}; e.g. {name}=")
    # RunConfig, hence YAML: flag spelling
    with pytest.raises(UserError) as by_config:
        RunConfig.from_mapping({name: BAD_VALUES[name]}, origin="test.yaml").validate()
    assert str(by_config.value).startswith(f"{FLAG.name(name)} {problem}, got {value}; e.g. --")
    # a search space: the same check, naming the option (its choices are scalars: Optuna stores them)
    if not isinstance(BAD_VALUES[name], list):
        with pytest.raises(UserError) as by_space:
            parse_space({name: [BAD_VALUES[name]]})
        assert f"({name} {problem})" in str(by_space.value)
    for error in (by_keyword, by_config):
        assert "\n" not in str(error.value)


# -- surface 2 and 3: RunConfig and its YAML keys ------------------------------------------------------


def test_run_config_is_the_callback_options_plus_the_runs_own():
    assert issubclass(RunConfig, BatchSizeOptions)
    config_defaults = {f.name: default_of(f) for f, _ in RUN_OPTIONS}
    for f, _ in CALLBACK_OPTIONS:
        assert config_defaults[f.name] == default_of(f)
    assert RunConfig().batch_size_options().keys() == {f.name for f, _ in CALLBACK_OPTIONS}


def test_yaml_keys_are_the_field_names_with_dashes_or_underscores(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text("adjust-every: 7\nmeasure_every: 3\nhidden: [16]\n", encoding="utf-8")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(file)]))
    assert (cfg.adjust_every, cfg.measure_every, cfg.hidden) == (7, 3, [16])
    file.write_text("adjust_evry: 7\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown option 'adjust_evry'"):
        config_from_args(build_parser().parse_args(["train", "--config", str(file)]))


# -- surface 4: the search space ----------------------------------------------------------------------


def test_the_search_space_may_vary_exactly_the_options_declared_searchable():
    allowed = searchable()
    for f, info in RUN_OPTIONS:
        assert (f.name in allowed) == info.searchable, f.name
    with pytest.raises(UserError, match="'data' cannot be searched"):
        parse_space({"data": ["iris", "wine"]})


def test_a_search_space_over_batch_options_reaches_the_callback():
    space = parse_space({"hysteresis": {"low": 0.0, "high": 0.2}, "measure_every": {"low": 5, "high": 40}})
    assert (space["hysteresis"].kind, space["measure_every"].kind) == ("float", "int")
    cfg = apply_params(RunConfig(data="iris"), {"hysteresis": 0.12, "measure_every": 10, "policy": "noise"})
    resizer = build_resizer(cfg)
    assert (resizer.controller.hysteresis, resizer.options.measure_every, resizer.policy_name) == (
        0.12,
        10,
        "noise",
    )
    with pytest.raises(UserError, match="hidden_width must be a positive integer"):
        parse_space({"hidden_width": [32, 0]})


# -- surface 5: the run.py flags ----------------------------------------------------------------------


def test_every_cli_option_has_its_flag_and_its_help_names_the_default():
    flags = _flags("train")
    for f, info in RUN_OPTIONS:
        if not info.cli:
            assert f.name not in flags, f.name
            continue
        action = flags[f.name]
        assert action.option_strings[0] == FLAG.name(f.name)
        assert action.default is None or action.default == "==SUPPRESS=="  # unset flags never override YAML
        assert action.help.startswith(info.help.replace("%", "%%")), f.name
        default = default_of(f)
        if default not in (None, "", (), []) and not isinstance(default, bool):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
            assert f"(default {shown})" in action.help, f.name
        if info.names():
            assert action.metavar == "|".join(info.names())


def test_the_study_flags_are_the_tune_options_declared_for_the_cli():
    flags = _flags("tune")
    for f, info in option_fields(TuneConfig):
        assert (f.name in flags) == (info.cli or f.name == "space"), f.name  # --space takes a YAML file
        assert (f.name in TUNE_FLAGS.values()) == (info.cli or f.name == "space")
    assert flags["study_seed"].option_strings == ["--study-seed"]
    args = build_parser().parse_args(["tune", "--trials", "3", "--seed", "7", "--study-seed", "4"])
    options = tune_config_from_args(args)
    assert (options.trials, options.seed) == (3, 4)
    assert config_from_args(args).seed == 7  # the run's seed and the sampler's are two flags
    run_names = {f.name for f, _ in option_fields(RunConfig)}
    assert not set(TUNE_FLAGS) & run_names, "a study flag would overwrite a run option of the same name"


def test_the_run_seed_flag_reaches_the_run():
    """--seed shares its field name with the study's seed: train once dropped it (every run seeded 0)."""
    assert config_from_args(build_parser().parse_args(["train", "--seed", "3"])).seed == 3


@pytest.mark.parametrize("name", ["adjust_every", "measure_budget", "milestones", "probe_memory"])
def test_a_flag_refuses_what_the_callback_refuses(name: str):
    value = BAD_VALUES[name]
    argv = ["train", FLAG.name(name), *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    if name == "probe_memory":
        argv = ["train", "--no-probe-memory"]  # a boolean flag cannot carry a bad value: YAML can (above)
        assert config_from_args(build_parser().parse_args(argv)).probe_memory is False
        return
    with pytest.raises(UserError, match=f"^{FLAG.name(name)} "):
        config_from_args(build_parser().parse_args(argv))


def test_flags_and_yaml_reach_the_callback_the_training_path_builds(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text("batch_size: auto\npolicy: noise\nnoise_k: 2.5\nmeasure_every: 40\n", encoding="utf-8")
    argv = [
        "train",
        "--config",
        str(file),
        "--measure-every",
        "5",
        "--hysteresis",
        "0.1",
        "--no-probe-memory",
    ]
    argv += [
        "--min-batch",
        "2",
        "--max-batch",
        "512",
        "--multiple",
        "4",
        "--adjust-every",
        "6",
        "--lr-rule",
        "sqrt",
    ]
    resizer = build_resizer(config_from_args(build_parser().parse_args(argv)))
    options = resizer.options
    assert (resizer.policy_name, resizer.lr_rule_name) == ("noise", "sqrt")
    assert (options.measure_every, options.hysteresis, options.probe_memory) == (
        5,
        0.1,
        False,
    )  # the flag wins
    assert resizer.controller.policy.k == 2.5  # from the file
    ctl = resizer.controller
    assert (ctl.min_batch, ctl.max_batch, ctl.multiple, options.adjust_every) == (2, 512, 4, 6)


def test_defaults_reach_the_callback_unchanged():
    resizer = build_resizer(RunConfig(batch_size="auto").validate())
    for f, _ in CALLBACK_OPTIONS:
        if f.name not in ("policy", "lr_rule"):
            assert getattr(resizer.options, f.name) == default_of(f), f.name
    assert (resizer.policy_name, resizer.lr_rule_name) == ("goodput", "adascale")  # auto, resolved for SGD


def test_the_declared_policy_and_lr_rule_names_are_the_registered_ones():
    fields = {f.name: info for f, info in CALLBACK_OPTIONS}
    assert fields["policy"].names() == ("auto", *policy.POLICIES)
    assert fields["lr_rule"].names() == ("auto", *policy.LR_RULES)


def test_the_policy_building_blocks_take_the_declared_defaults():
    ctl = policy.BatchSizeController()
    declared = {f.name: default_of(f) for f, _ in CALLBACK_OPTIONS}
    assert (ctl.min_batch, ctl.multiple, ctl.hysteresis, ctl.max_lr_scale) == (
        declared["min_batch"],
        declared["multiple"],
        declared["hysteresis"],
        declared["max_lr_scale"],
    )
    assert policy.NoisePolicy().k == declared["noise_k"]
    assert policy.SchedulePolicy([3]).factors == [declared["schedule_factor"]]


# -- LightningCLI ------------------------------------------------------------------------------------


def test_lightning_cli_help_describes_every_callback_argument(tmp_path: Path):
    """``--trainer.callbacks.help lightning_batch.DynamicBatchSize``, as a user of LightningCLI types it."""
    script = tmp_path / "cli.py"
    script.write_text(
        "from lightning.pytorch.cli import LightningCLI\n"
        "from lightning.pytorch.demos.boring_classes import BoringModel\n"
        "LightningCLI(BoringModel)\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [sys.executable, str(script), "fit", "--trainer.callbacks.help", "lightning_batch.DynamicBatchSize"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    for f, info in CALLBACK_OPTIONS:
        assert f"--trainer.callbacks.{f.name}" in text, f.name
        assert " ".join(info.help.split())[:60] in text, f"no description of {f.name}"


def test_run_config_is_frozen_and_validate_returns_a_checked_copy():
    cfg = RunConfig(data="iris")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.5  # type: ignore[misc]
    checked = cfg.validate()
    # No lr given: the range test finds it once the data are read; without it the fixed default.
    assert (cfg.model, cfg.lr) == (None, None) and (checked.model, checked.lr) == ("softmax", None)
    assert RunConfig(data="iris", lr_search=False).validate().lr == 0.01
