"""One set of names, one set of defaults, every DynamicBatchSize option reachable from flags, YAML
and a search space, and no import cycles inside the package."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_batch import config, errors
from lightning_batch.cli import build_parser, config_from_args
from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.plugin import defaults, policy
from lightning_batch.plugin.callback import DynamicBatchSize
from lightning_batch.training import build_resizer
from lightning_batch.tune.space import TuneConfig, apply_params, parse_space

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_batch"

#: DynamicBatchSize arguments the tabular path sets from other options, or that only a plugin user has.
NOT_CONFIG_OPTIONS = {"policy", "lr_rule", "module_attr"}
#: DynamicBatchSize argument -> the defaults constant it must equal.
CALLBACK_DEFAULTS = {
    "policy": defaults.POLICY,
    "lr_rule": defaults.LR_RULE,
    "min_batch": defaults.MIN_BATCH,
    "max_batch": None,
    "multiple": defaults.MULTIPLE,
    "adjust_every": defaults.ADJUST_EVERY,
    "min_timed_steps": defaults.MIN_TIMED_STEPS,
    "measure_every": defaults.MEASURE_EVERY,
    "hysteresis": defaults.HYSTERESIS,
    "ema_decay": defaults.EMA_DECAY,
    "noise_k": defaults.NOISE_K,
    "explore_factor": defaults.EXPLORE_FACTOR,
    "schedule_factor": defaults.SCHEDULE_FACTOR,
    "probe_memory": defaults.PROBE_MEMORY,
    "memory_budget": defaults.MEMORY_BUDGET,
    "log_every": defaults.LOG_EVERY,
    "fallback_microbatches": defaults.FALLBACK_MICROBATCHES,
    "fallback_every": defaults.FALLBACK_EVERY,
}


def _callback_defaults() -> dict[str, object]:
    params = inspect.signature(DynamicBatchSize.__init__).parameters
    return {name: p.default for name, p in params.items() if name != "self"}


def _config_defaults() -> dict[str, object]:
    return {
        f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)  # type: ignore[misc]
        for f in dataclasses.fields(RunConfig)
    }


# -- names ---------------------------------------------------------------------------------------------


def test_policy_and_lr_rule_names_come_from_the_policy_registries():
    assert tuple(policy.POLICIES) == config.POLICIES
    assert ("auto", *policy.LR_RULES) == config.LR_RULES
    train = build_parser()._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    metavars = {a.dest: a.metavar for a in train._actions}
    assert metavars["policy"] == "|".join(policy.POLICIES)
    assert metavars["lr_rule"] == "|".join(config.LR_RULES)
    with pytest.raises(UserError, match=r"use --policy fixed\|memory\|noise\|goodput\|schedule"):
        RunConfig(policy="bogus").validate()


def test_user_error_has_one_home_and_config_re_exports_it():
    assert config.UserError is errors.UserError
    assert errors.UserError.__module__ == "lightning_batch.errors"


# -- defaults ------------------------------------------------------------------------------------------


def test_callback_and_config_share_every_default():
    callback = _callback_defaults()
    assert set(CALLBACK_DEFAULTS) <= set(callback)
    for name, value in CALLBACK_DEFAULTS.items():
        assert callback[name] == value, f"DynamicBatchSize({name}=...) default is not defaults.{name.upper()}"
    cfg = _config_defaults()
    for name in set(callback) - NOT_CONFIG_OPTIONS:
        assert name in cfg, f"DynamicBatchSize({name}=...) has no RunConfig field"
        expected = list(callback[name]) if name == "milestones" else callback[name]
        assert cfg[name] == expected, f"RunConfig.{name} default differs from the callback's"
    assert RunConfig(batch_size="auto").resolved_policy == defaults.POLICY
    assert RunConfig(optimizer="sgd").resolved_lr_rule == defaults.LR_RULE


def test_policy_building_blocks_take_the_same_defaults():
    ctl = policy.BatchSizeController()
    assert (ctl.min_batch, ctl.multiple, ctl.hysteresis) == (
        defaults.MIN_BATCH,
        defaults.MULTIPLE,
        defaults.HYSTERESIS,
    )
    assert policy.NoisePolicy().k == defaults.NOISE_K
    assert policy.SchedulePolicy([3]).factors == [defaults.SCHEDULE_FACTOR]


# -- flags and YAML reach the callback -------------------------------------------------------------------


def _resizer_from(argv: list[str]) -> DynamicBatchSize:
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.dynamic
    return build_resizer(cfg)


def test_flags_reach_the_callback_the_training_path_builds():
    r = _resizer_from(
        ["train", "--batch-size", "auto", "--policy", "noise", "--lr-rule", "sqrt"]
        + ["--min-batch", "2", "--max-batch", "512", "--multiple", "4", "--adjust-every", "6"]
        + ["--min-timed-steps", "9", "--measure-every", "5", "--hysteresis", "0.1", "--ema-decay", "0.8"]
        + ["--noise-k", "2.5", "--no-probe-memory", "--memory-budget", "0.3", "--log-every", "7"]
        + ["--fallback-microbatches", "4", "--fallback-every", "3"]
    )
    ctl = r.controller
    assert (r.policy_name, r.lr_rule_name) == ("noise", "sqrt")
    assert (ctl.min_batch, ctl.max_batch, ctl.multiple, ctl.hysteresis) == (2, 512, 4, 0.1)
    assert ctl.policy.k == 2.5
    assert (r.adjust_every, r.min_timed_steps, r.measure_every, r.ema.decay) == (6, 9, 5, 0.8)
    assert (r.probe_memory, r.memory_budget, r.log_every) == (False, 0.3, 7)
    assert (r.fallback_microbatches, r.fallback_every) == (4, 3)


def test_yaml_reaches_the_callback_and_flags_win(tmp_path: Path):
    file = tmp_path / "run.yaml"
    file.write_text(
        "batch_size: auto\npolicy: goodput\nexplore-factor: 3.0\nmeasure_every: 40\nhysteresis: 0.2\n"
        "ema_decay: 0.5\nmultiple: 1\nprobe_memory: false\n",
        encoding="utf-8",
    )
    r = _resizer_from(["train", "--config", str(file), "--hysteresis", "0.01"])
    assert r.controller.policy.explore_factor == 3.0
    assert (r.measure_every, r.ema.decay, r.controller.multiple, r.probe_memory) == (40, 0.5, 1, False)
    assert r.controller.hysteresis == 0.01
    file.write_text("policy: schedule\nmilestones: [2, 5]\nschedule_factor: 3\n", encoding="utf-8")
    schedule = _resizer_from(["train", "--config", str(file)]).controller.policy
    assert (schedule.milestones, schedule.factors) == ([2, 5], [3.0, 3.0])


def test_defaults_reach_the_callback_unchanged():
    r = build_resizer(RunConfig(batch_size="auto").validate())
    ctl = r.controller
    assert (ctl.min_batch, ctl.multiple, ctl.hysteresis) == (
        defaults.MIN_BATCH,
        defaults.MULTIPLE,
        defaults.HYSTERESIS,
    )
    assert (r.measure_every, r.ema.decay, r.log_every) == (
        defaults.MEASURE_EVERY,
        defaults.EMA_DECAY,
        defaults.LOG_EVERY,
    )
    assert ctl.policy.explore_factor == defaults.EXPLORE_FACTOR


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("multiple", 0, "--multiple must be a positive integer"),
        ("measure_every", 2.5, "--measure-every must be a whole number of steps >= 0"),
        ("hysteresis", -0.1, "--hysteresis must be at least 0"),
        ("ema_decay", 1.0, "--ema-decay must be below 1"),
        ("noise_k", 0, "--noise-k must be positive"),
        ("explore_factor", 1.0, "--explore-factor must be above 1"),
        ("schedule_factor", float("nan"), "--schedule-factor must be a finite number"),
        ("fallback_microbatches", 0, "--fallback-microbatches must be a positive integer"),
        ("fallback_every", True, "--fallback-every must be a positive integer"),
        ("probe_memory", "no", "probe_memory must be true or false"),
        ("milestones", [5, 3], "--milestones must be increasing"),
    ],
)
def test_bad_batch_options_are_one_line_errors(option, value, fragment):
    with pytest.raises(UserError, match=fragment) as caught:
        RunConfig(**{option: value}).validate()
    assert "\n" not in str(caught.value)


# -- search spaces -------------------------------------------------------------------------------------


def test_search_space_over_batch_options_reaches_the_callback():
    space = parse_space(
        {
            "hysteresis": {"low": 0.0, "high": 0.2},
            "measure_every": {"low": 5, "high": 40, "log": True},
            "ema_decay": [0.8, 0.9, 0.95],
            "policy": ["noise", "goodput"],
        }
    )
    assert (space["hysteresis"].kind, space["measure_every"].kind) == ("float", "int")
    cfg = apply_params(
        RunConfig(data="iris"),
        {"hysteresis": 0.12, "measure_every": 10, "ema_decay": 0.95, "policy": "noise"},
    )
    r = build_resizer(cfg)
    assert (r.controller.hysteresis, r.measure_every, r.ema.decay, r.policy_name) == (0.12, 10, 0.95, "noise")


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"measure_every": {"low": -1, "high": 10}}, "measure_every: -1 is not a valid value"),
        ({"hysteresis": {"low": -1.0, "high": 0.1}}, "hysteresis: -1.0 is not a valid value"),
        ({"ema_decay": {"low": 0.5, "high": 1.0}}, "ema_decay: 1.0 is not a valid value"),
        ({"policy": ["fixed", "bogus"]}, "unknown choice 'bogus'; use one of fixed, memory, noise"),
        ({"lr_rule": ["sqrt", "cubic"]}, "unknown choice 'cubic'"),
        ({"hidden_width": [32, 0]}, "not a layer width"),
    ],
)
def test_search_space_values_are_checked_as_the_options_are(raw, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_space(raw)


def test_tune_config_still_validates_its_space():
    with pytest.raises(UserError, match="unknown sampler"):
        TuneConfig(sampler="bogus").validate()
    with pytest.raises(UserError, match="unknown choice"):
        TuneConfig(space={"policy": ["sometimes"]}).validate()


# -- imports -------------------------------------------------------------------------------------------


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions."""
    graph: dict[str, set[str]] = {}
    for file in sorted(PACKAGE.glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "lightning_batch":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_batch."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lightning_batch."))
        graph[file.stem] = deps
    return graph


def test_no_import_cycles_in_the_package():
    graph = _package_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            mod = todo.pop()
            if mod == goal:
                return True
            if mod not in seen:
                seen.add(mod)
                todo.extend(graph.get(mod, ()))
        return False

    cycles = sorted(m for m in graph if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_config_defaults_errors_and_policy_import_without_torch():
    code = (
        "import sys; import lightning_batch.config, lightning_batch.plugin.defaults, lightning_batch.errors; "
        "print(sorted(m for m in ('torch', 'lightning', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
