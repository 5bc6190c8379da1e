"""The data cache: prepared tables as memory-mapped files, written once and atomically, reused by
later runs and by every trial of a study, and serving the very batches the in-memory path serves."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from lightning_batch.config import RunConfig
from lightning_batch.errors import UserError
from lightning_batch.plugin.checks import CheckFailed, positive_int
from lightning_batch.plugin.options import option, option_fields
from lightning_batch.tabular import cache as data_cache
from lightning_batch.tabular import prepare as data_module
from lightning_batch.tabular.datamodule import TabularDataModule
from lightning_batch.tabular.prepare import prepare_data, prepare_in_memory

from .conftest import RUN_PY, subprocess_env

SPLITS = ("train", "val", "test")


@pytest.fixture
def preparations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each call of the in-memory preparation (read, clean, split, scale), by source."""
    calls: list[str] = []
    real = data_module.prepare_in_memory

    def counted(cfg: RunConfig):
        calls.append(cfg.data)
        return real(cfg)

    monkeypatch.setattr(data_module, "prepare_in_memory", counted)
    return calls


def _folders(cache: Path) -> list[Path]:
    """The committed caches (hidden names are locks and writers' temporary folders)."""
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def _csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"a": rng.normal(size=rows), "b": rng.choice(["x", "y"], rows)})
    frame["y"] = 2 * frame["a"] + (frame["b"] == "x") + rng.normal(scale=0.1, size=rows)
    frame.to_csv(path, index=False)
    return path


# -- the memory-mapped path serves the in-memory path's batches ----------------------------------------


@pytest.mark.parametrize("source", ["synthetic-regression", "wine"])
def test_memmap_batches_are_byte_equal_to_in_memory_batches_over_an_epoch_with_a_resize(tmp_path, source):
    options = dict(data=source, batch_size=8, seed=7, val_fraction=0.2)
    if source == "synthetic-regression":
        options.update(rows=1500, features=6)
    memory = TabularDataModule(**options)
    mapped = TabularDataModule(**options, data_cache=str(tmp_path))
    memory.setup(), mapped.setup()
    assert memory.prepared is not None and memory.prepared.raw_frame is not None
    assert mapped.prepared is not None and mapped.prepared.raw_frame is None  # nothing was read
    (folder,) = _folders(tmp_path)
    assert str(folder / "train_x.npy") in _mapped_files()  # trained from the file, not a copy

    trained = 0
    pairs = zip(memory.train_dataloader(), mapped.train_dataloader(), strict=True)
    for step, ((x0, y0), (x1, y1)) in enumerate(pairs):
        assert x0.dtype == x1.dtype and y0.dtype == y1.dtype
        assert x0.numpy().tobytes() == x1.numpy().tobytes()
        assert y0.numpy().tobytes() == y1.numpy().tobytes()
        trained += len(x0)
        if step == 5:  # mid-epoch resize, as the callback does it
            memory.batch_size = mapped.batch_size = 29
    assert trained == len(memory.train_set) == len(mapped.train_set)
    assert memory.batch_size == mapped.batch_size == 29
    for name in ("val_dataloader", "test_dataloader"):
        for (x0, y0), (x1, y1) in zip(getattr(memory, name)(), getattr(mapped, name)(), strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert mapped.prepared.preprocessor == memory.prepared.preprocessor
    assert (mapped.task, mapped.n_features, mapped.n_outputs) == (
        memory.task,
        memory.n_features,
        memory.n_outputs,
    )


def test_memory_mapped_tables_stay_file_backed_on_the_cpu_and_after_a_device_round_trip(tmp_path):
    dm = TabularDataModule(data="synthetic-regression", rows=600, features=3, data_cache=str(tmp_path))
    dm.setup()
    table = dm.train_set
    pointer, original = table.features.data_ptr(), table.features
    assert dm.place_tables(torch.device("cpu")) == "host"
    dm.teardown()
    assert table.features is original and table.features.data_ptr() == pointer
    # Another device and back (the teardown after a GPU fit): the same file-backed tensors return,
    # not a copy in RAM. The meta device stands in for an accelerator on a CPU-only machine.
    table.to_("meta")
    assert table.device.type == "meta"
    table.to_("cpu")
    assert table.features is original and table.features.data_ptr() == pointer


# -- reuse and the key -------------------------------------------------------------------------------------


def test_a_second_run_reads_the_cache_and_preparation_options_make_new_ones(tmp_path, preparations):
    csv = _csv(tmp_path / "table.csv")
    cache = tmp_path / "cache"
    base = dict(data=str(csv), target="y", data_cache=str(cache))

    first = prepare_data(RunConfig(**base).validate())
    second = prepare_data(RunConfig(**base).validate())
    assert len(preparations) == 1 and len(_folders(cache)) == 1
    assert torch.equal(first.train.features, second.train.features)
    # Options that only read the tables share the cache.
    prepare_data(RunConfig(**base, shuffle=False, batch_size=7, lr=0.5, epochs=3).validate())
    assert len(preparations) == 1

    # Every option that changes preparation is a new cache.
    for change in ({"seed": 1}, {"val_fraction": 0.2}, {"test_fraction": 0.2}, {"train_on_val": True}):
        prepare_data(RunConfig(**{**base, **change}).validate())
    assert len(preparations) == 5 and len(_folders(cache)) == 5

    # The same file touched (same bytes, new mtime) is a new source.
    stat = csv.stat()
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    prepare_data(RunConfig(**base).validate())
    assert len(preparations) == 6 and len(_folders(cache)) == 6

    meta = json.loads((_folders(cache)[0] / "meta.json").read_text())
    assert meta["key"]["source"]["file"] == str(csv.resolve())
    assert set(meta["key"]["preparation"]) >= {"seed", "val_fraction", "test_fraction", "target", "task"}


def test_a_generator_is_keyed_by_its_parameters(tmp_path):
    a = data_cache.cache_key(RunConfig(data="synthetic-regression", rows=100).validate())
    b = data_cache.cache_key(RunConfig(data="synthetic-regression", rows=101).validate())
    c = data_cache.cache_key(RunConfig(data="synthetic-regression", rows=100, noise=0.1).validate())
    d = data_cache.cache_key(RunConfig(data="synthetic-regression", rows=100, lr=0.3).validate())
    assert len({data_cache.digest(k) for k in (a, b, c)}) == 3
    assert data_cache.digest(a) == data_cache.digest(d)


def test_a_table_over_the_memory_budget_is_cached_beside_the_store(workdir, monkeypatch, preparations):
    monkeypatch.setattr(data_cache, "available_memory", lambda: 1_000_000)
    cfg = RunConfig(data="synthetic-regression", rows=20_000, features=4).validate()  # 400 kB > 250 kB
    assert data_cache.estimate_prepared_bytes(cfg) == 20_000 * 5 * 4
    data = prepare_data(cfg)
    assert data.raw_frame is None
    assert len(_folders(workdir / "mlruns" / "data-cache")) == 1
    # Under the budget, and no --data-cache: in memory as before, nothing written.
    small = prepare_data(RunConfig(data="synthetic-regression", rows=1000, features=4).validate())
    assert small.raw_frame is not None and len(preparations) == 2
    assert len(_folders(workdir / "mlruns" / "data-cache")) == 1


@pytest.mark.parametrize("task", ["regression", "classification"])
@pytest.mark.parametrize("train_on_val", [False, True])
def test_a_parquet_file_over_the_budget_is_prepared_streaming_as_in_memory(tmp_path, task, train_on_val):
    rng = np.random.default_rng(1)
    rows = 5000
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=rows),
            "b": rng.integers(0, 5, rows).astype(float),
            "text": rng.choice(["x", "y", "z"], rows),
            "flag": rng.choice([True, False], rows),
            "empty": np.nan,
        }
    )
    frame.loc[rng.random(rows) < 0.1, "a"] = np.nan
    frame.loc[rng.random(rows) < 0.05, "text"] = None
    if task == "regression":
        frame["y"] = frame["a"].fillna(0) * 2 + rng.normal(size=rows)
        frame.loc[rng.random(rows) < 0.03, "y"] = np.nan  # dropped rows
    else:
        frame["y"] = rng.choice(["p", "q", "r"], rows)
        frame.loc[rng.random(rows) < 0.03, "y"] = None
    frame.index = np.arange(rows)[::-1] * 3  # a stored index: rows are still taken by position
    path = tmp_path / "table.parquet"
    frame.to_parquet(path, row_group_size=700)
    options = dict(data=str(path), target="y", seed=3, train_on_val=train_on_val)
    reference = prepare_in_memory(RunConfig(**options).validate())
    streamed = prepare_data(
        RunConfig(**options, data_cache=str(tmp_path / "cache"), data_memory_budget=1e-9).validate()
    )
    assert (streamed.task, streamed.classes, streamed.dropped_rows) == (
        reference.task,
        reference.classes,
        reference.dropped_rows,
    )
    ours, theirs = streamed.preprocessor.to_dict(), reference.preprocessor.to_dict()
    if task == "regression":  # prepare_data standardises the target on train (prepare_in_memory does not)
        train_targets = reference.train.targets.double().numpy()
        assert ours.pop("target_mean") == pytest.approx(train_targets.mean(), rel=1e-12)
        assert ours.pop("target_scale") == pytest.approx(train_targets.std(), rel=1e-12)
        theirs.pop("target_mean"), theirs.pop("target_scale")
    for name in ours:
        if name in ("mean", "scale"):  # one column at a time: equal up to float rounding
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-12, atol=1e-12)
        else:
            assert ours[name] == theirs[name], name
    for split in SPLITS:
        a, b = getattr(streamed, split), getattr(reference, split)
        assert torch.equal(a.targets, b.targets)
        torch.testing.assert_close(a.features, b.features, rtol=1e-6, atol=1e-6)


# -- written atomically -----------------------------------------------------------------------------------


def test_a_writer_failing_mid_write_leaves_no_cache_and_the_next_run_prepares_again(
    tmp_path, monkeypatch, preparations
):
    cfg = RunConfig(data="iris", data_cache=str(tmp_path)).validate()
    real_save = data_cache.CacheWriter.save

    def crash_after_train(self, name, array):
        real_save(self, name, array)
        if name == "train_y":
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(data_cache.CacheWriter, "save", crash_after_train)
    with pytest.raises(OSError, match="simulated"):
        prepare_data(cfg)
    assert _folders(tmp_path) == [] and not list(tmp_path.glob(".tmp-*"))
    monkeypatch.setattr(data_cache.CacheWriter, "save", real_save)
    prepare_data(cfg)
    assert len(preparations) == 2 and len(_folders(tmp_path)) == 1


def test_a_killed_writer_leaves_nothing_that_is_trusted(tmp_path, preparations):
    cache = tmp_path / "cache"
    # A process killed (os._exit: no cleanup, no finally) after writing two of the six arrays.
    script = (
        "import os, sys\n"
        "from lightning_batch.tabular import cache as data_cache\n"
        "from lightning_batch.config import RunConfig\n"
        "from lightning_batch.tabular.prepare import prepare_data\n"
        "real = data_cache.CacheWriter.save\n"
        "def save(self, name, array):\n"
        "    real(self, name, array)\n"
        "    if name == 'train_y':\n"
        "        os._exit(9)\n"
        "data_cache.CacheWriter.save = save\n"
        f"prepare_data(RunConfig(data='iris', data_cache={str(cache)!r}).validate())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, timeout=120
    )
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    (left,) = cache.glob(".tmp-*")  # what the killed writer left: a hidden folder, never read
    assert (left / "train_x.npy").is_file() and not (left / "meta.json").exists()
    assert _folders(cache) == []
    cfg = RunConfig(data="iris", data_cache=str(cache)).validate()
    data = prepare_data(cfg)
    assert len(preparations) == 1 and len(_folders(cache)) == 1
    assert not left.exists()  # its writer is gone: swept by the next writer
    reference = prepare_in_memory(cfg)
    assert torch.equal(data.train.features, reference.train.features)


def test_a_damaged_cache_is_moved_aside_and_rebuilt(tmp_path, preparations, capsys):
    cfg = RunConfig(data="synthetic-regression", rows=800, features=3, data_cache=str(tmp_path)).validate()
    prepare_data(cfg)
    (folder,) = _folders(tmp_path)
    train_x = folder / "train_x.npy"
    train_x.write_bytes(train_x.read_bytes()[:-100])  # truncated behind our back
    data = prepare_data(cfg)
    assert len(preparations) == 2 and "damaged" in capsys.readouterr().err
    assert len(list(tmp_path.glob(".bad-*"))) == 1 and len(_folders(tmp_path)) == 1
    assert torch.equal(data.train.features, prepare_in_memory(cfg).train.features)


# -- the options ----------------------------------------------------------------------------------------------


def test_bad_data_cache_options_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="--data-cache .* is a file"):
        RunConfig(data="iris", data_cache=str(a_file)).validate()
    with pytest.raises(UserError, match="--data-cache must be a folder path"):
        RunConfig(data="iris", data_cache=" ").validate()
    for bad in (0, 1.5, float("nan")):
        with pytest.raises(UserError, match="--data-memory-budget"):
            RunConfig(data="iris", data_memory_budget=bad).validate()


# -- a study prepares its data once ---------------------------------------------------------------------------


def test_a_study_prepares_its_data_once_for_all_its_trials(workdir, tracking_uri, preparations):
    from mlflow import MlflowClient

    from lightning_batch.tune.space import TuneConfig
    from lightning_batch.tune.study import tune

    base = RunConfig(data="wine", epochs=1, tracking_uri=tracking_uri)
    options = TuneConfig(
        study="once",
        trials=3,
        storage=f"sqlite:///{workdir}/mlruns/optuna.db",
        pruner="none",
        retrain="as-is",
    )
    result = tune(base, options, echo=lambda line: None)
    assert sum(result.states.values()) == 3
    assert preparations == ["wine"]  # one preparation: the trials and the refit read the cache
    cache = workdir / "mlruns" / "data-cache"
    assert len(_folders(cache)) == 1
    runs = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("once").experiment_id]
    )
    trials = [r for r in runs if r.data.tags.get("optuna_trial_number") is not None]
    assert len(trials) == 3
    assert {r.data.params["data_cache"] for r in trials} == {str(cache.resolve())}


# -- the flag, end to end -----------------------------------------------------------------------------------------


def test_the_data_cache_flag_end_to_end(workdir, preparations):
    cache = workdir / "prepared"
    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "train",
            "--data",
            "diabetes",
            "--epochs",
            "1",
            "--data-cache",
            str(cache),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = _folders(cache)  # the run prepared into it and trained from it
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["task"] == "regression" and meta["key"]["source"]["bundled"] == "diabetes"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlruns/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("lightning-batch").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data_cache"] == str(cache)
    assert "test_loss" in run.data.metrics
    # Another process with the same options reads what the run wrote.
    prepare_data(RunConfig(data="diabetes", data_cache=str(cache)).validate())
    assert preparations == [] and _folders(cache) == [folder]


def test_a_run_that_reads_the_cache_still_records_the_dataset_input(tmp_path, tracking_uri):
    """The first run prepares (and records the source it read); the second reads the memory-mapped
    tables only, and records the same input from meta.json."""
    from mlflow import MlflowClient

    from lightning_batch.training import train

    cfg = dict(data="diabetes", epochs=1, data_cache=str(tmp_path / "prepared"), tracking_uri=tracking_uri)
    first = train(RunConfig(**cfg).validate())
    second = train(RunConfig(**cfg).validate())
    client = MlflowClient(tracking_uri)
    inputs = [client.get_run(r.run_id).inputs.dataset_inputs for r in (first, second)]
    assert all(len(i) == 1 for i in inputs)
    one, two = (i[0].dataset for i in inputs)
    assert one.schema and one.digest
    assert (one.name, one.digest, one.schema, one.profile, one.source) == (
        two.name,
        two.digest,
        two.schema,
        two.profile,
        two.source,
    )
    assert [t.value for t in inputs[1][0].tags] == ["training"]


# -- the key: exactly the options declared to change the preparation ----------------------------------------
#
# Each option of a run declares ``prepares_data`` (tests/test_options.py makes it decide). The key is
# computed from the options that say yes; these tests hold each decision to what the preparation does:
# every "yes" moves the key, every "no" leaves the key and the prepared tables as they were.

RUN_OPTIONS = {f.name: (f, info) for f, info in option_fields(RunConfig)}
PREPARING = data_cache.preparing_options()
NOT_PREPARING = [name for name in RUN_OPTIONS if name not in PREPARING]


def _other_values(name: str, current: Any) -> list[Any]:
    """Values of option ``name`` other than ``current`` that pass its check (a few, of its own kind)."""
    _, info = RUN_OPTIONS[name]
    if isinstance(current, bool):
        guesses: list[Any] = [not current]
    elif info.names():
        guesses = list(info.names() or ())
    elif isinstance(current, int):
        # 1 and 2 reach the small end (a max_categories that refuses a 3-level column).
        guesses = [info.example, 1, 2, current + 1, current * 2]
    elif isinstance(current, float):
        guesses = [info.example, current / 2, current * 2, current + 0.5, 0.0, 0.9]
    elif isinstance(current, (list, tuple)):
        guesses = [info.example, [1], [7, 5], (3, 6)]
    else:  # None or text: the declared example
        guesses = [info.example]
    found: list[Any] = []
    for guess in guesses:
        try:
            value = guess if info.check is None else info.check(guess)
        except (CheckFailed, UserError):  # a check may refuse in its own words
            continue
        if value != current and value not in found:
            found.append(value)
    assert found, f"no value of {name} other than {current!r} to try: give the test one"
    return found


@pytest.fixture(scope="module")
def key_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunConfig]:
    """Validated configs of a generator and of a file, the two kinds of source the key tells apart."""
    csv = _csv(tmp_path_factory.mktemp("key") / "table.csv")
    return {
        "generator": RunConfig(data="synthetic-regression", rows=300, features=3).validate(),
        "file": RunConfig(data=str(csv), target="y").validate(),
    }


@pytest.mark.parametrize("base", ["generator", "file"])
@pytest.mark.parametrize("name", PREPARING)
def test_each_option_declared_to_prepare_the_data_moves_the_key(key_bases, name, base):
    cfg = key_bases[base]
    before = data_cache.digest(data_cache.cache_key(cfg))
    for value in _other_values(name, getattr(cfg, name))[:1]:
        after = data_cache.digest(data_cache.cache_key(cfg.replace(**{name: value})))
        assert after != before, f"{name}={value!r} prepares other tables under the same key"


@pytest.mark.parametrize("base", ["generator", "file"])
@pytest.mark.parametrize("name", NOT_PREPARING)
def test_an_option_declared_not_to_prepare_the_data_leaves_the_key(key_bases, name, base):
    cfg = key_bases[base]
    before = data_cache.digest(data_cache.cache_key(cfg))
    for value in _other_values(name, getattr(cfg, name)):
        assert data_cache.digest(data_cache.cache_key(cfg.replace(**{name: value}))) == before, name


def _prepared(cfg: RunConfig) -> tuple[Any, ...]:
    """What the cache would keep of ``cfg``'s preparation: every table's bytes and meta.json's facts,
    or the refusal."""
    try:
        data = prepare_in_memory(cfg)
    except UserError as refused:
        return ("refused", str(refused))
    tables = tuple(
        (table.features.numpy().tobytes(), table.targets.numpy().tobytes())
        for table in (data.train, data.val, data.test)
    )
    facts = (data.task, data.classes, data.preprocessor.to_dict(), data.dropped_rows, data.source)
    return tables, facts, data.truth, data.target_column


@pytest.fixture(scope="module")
def preparation_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunConfig, Any]]:
    """Small sources on which every preparing option matters somewhere, each with what it prepares:
    correlated generated features, generated classes, and a file with a 3-level text column."""
    csv = _csv(tmp_path_factory.mktemp("prepared") / "levels.csv", rows=300)
    frame = pd.read_csv(csv)
    frame["b"] = np.random.default_rng(1).choice(["x", "y", "z"], len(frame))
    frame.to_csv(csv, index=False)
    configs = [
        RunConfig(data="synthetic-regression", rows=300, features=3, correlation=0.5),
        RunConfig(data="synthetic-classification", rows=300, features=4, classes=3),
        RunConfig(data=str(csv), target="y"),
    ]
    return {cfg.data: (valid, _prepared(valid)) for cfg in configs for valid in [cfg.validate()]}


@pytest.mark.parametrize("name", NOT_PREPARING)
def test_an_option_declared_not_to_prepare_the_data_does_not_change_what_is_prepared(preparation_bases, name):
    """A wrong "no" would train a run on tables prepared for another value: each value tried here must
    prepare the very tables (and facts) the base does, on every kind of source."""
    for cfg, expected in preparation_bases.values():
        for value in _other_values(name, getattr(cfg, name)):
            assert _prepared(cfg.replace(**{name: value})) == expected, (
                f"{name}={value!r} changes the prepared tables of {cfg.data}: declare it prepares_data=True"
            )


@pytest.mark.parametrize("name", PREPARING)
def test_each_option_declared_to_prepare_the_data_changes_what_is_prepared_on_some_source(
    preparation_bases, name
):
    """The bases above are rich enough for the test before it: were this option declared "no" by
    mistake, that test would see the tables change. (A "yes" that changed nothing would only cost
    rebuilds; this keeps the declarations honest both ways.)"""
    changed = [
        (cfg.data, value)
        for cfg, expected in preparation_bases.values()
        for value in _other_values(name, getattr(cfg, name))
        if _prepared(cfg.replace(**{name: value})) != expected
    ]
    assert changed, f"no base source shows what {name} changes: add one to preparation_bases"


def test_an_option_without_a_decision_is_in_the_key():
    """Until an option decides, the key counts it in: a needless rebuild, never another run's tables."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Grown(RunConfig):
        extra: int = option(1, "an option added without its decision", check=positive_int, group="data")

    assert data_cache.preparing_options(Grown) == [*PREPARING, "extra"]
    a, b = (data_cache.cache_key(Grown(extra=n).validate()) for n in (1, 2))
    assert data_cache.digest(a) != data_cache.digest(b)


# -- two runs that differ in one preparing option: the second prepares its own tables -----------------------


def test_a_run_that_max_categories_refuses_does_not_reuse_a_laxer_runs_cache(tmp_path, preparations):
    csv = _csv(tmp_path / "levels.csv")  # column b: 2 levels
    base = dict(data=str(csv), target="y", data_cache=str(tmp_path / "cache"))
    lax = prepare_data(RunConfig(**base).validate())
    assert lax.n_features == 3  # a, and b one-hot encoded
    with pytest.raises(UserError, match=r"feature .b. .* 2 levels .*raise --max-categories"):
        prepare_data(RunConfig(**base, max_categories=1).validate())
    assert len(preparations) == 2


def _neighbour_correlation(features: torch.Tensor) -> float:
    """The mean correlation of neighbouring feature columns (scaling each column leaves it as it was)."""
    x = features.double().numpy()
    return float(np.mean([np.corrcoef(x[:, j], x[:, j + 1])[0, 1] for j in range(x.shape[1] - 1)]))


def test_a_correlated_run_does_not_train_on_an_independent_runs_cache(tmp_path, preparations):
    cache = tmp_path / "cache"
    base = dict(data="synthetic-regression", rows=4000, features=4, data_cache=str(cache))
    independent = prepare_data(RunConfig(**base).validate())
    correlated = prepare_data(RunConfig(**base, correlation=0.9).validate())
    assert len(preparations) == 2 and len(_folders(cache)) == 2
    assert abs(_neighbour_correlation(independent.train.features)) < 0.05
    assert _neighbour_correlation(correlated.train.features) == pytest.approx(0.9, abs=0.02)
    # And each is found again by a run with its own options.
    again = prepare_data(RunConfig(**base, correlation=0.9).validate())
    assert len(preparations) == 2 and torch.equal(again.train.features, correlated.train.features)
