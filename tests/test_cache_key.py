"""The data cache's key beyond the options (tests/test_data_cache.py holds each option's decision):
new preparation code or a new version of a library it uses is a new cache, however the data path is
spelled it is one cache (the mutation target ``make mutate-cache``: ``cache_key`` and
``preparing_options``)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from lightning_batch.config import RunConfig
from lightning_batch.tabular import cache as data_cache

BASE = RunConfig(data="synthetic-regression", rows=300, features=3).validate()


def _digest(cfg: RunConfig = BASE) -> str:
    return data_cache.digest(data_cache.cache_key(cfg))


@pytest.mark.parametrize("package", ["numpy", "pandas", "scikit-learn", "pyarrow"])
def test_a_new_version_of_a_library_the_preparation_uses_is_a_new_cache(package: str, monkeypatch):
    before = _digest()
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0.1-other" if name == package else real(name))
    assert _digest() != before, package
    assert data_cache.cache_key(BASE)["code"][package] == "0.0.1-other"


@pytest.mark.parametrize("module", data_cache.PREPARATION_CODE)
def test_edited_preparation_code_is_a_new_cache(module: str, monkeypatch):
    before = _digest()
    edited = Path(data_cache.__file__).with_name(module)
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: real(p) + b"\n# edited" if p == edited else real(p))
    assert _digest() != before, module


def test_the_key_is_the_same_for_the_same_code_and_options():
    assert data_cache.cache_key(BASE) == data_cache.cache_key(BASE.replace())
    assert data_cache.cache_key(BASE)["format"] == data_cache.FORMAT


def test_a_file_is_one_cache_however_its_path_is_spelled(tmp_path: Path, monkeypatch):
    table = tmp_path / "table.csv"
    table.write_text("x,y\n1,2\n3,4\n")
    monkeypatch.chdir(tmp_path)
    spellings = [str(table), "table.csv", "./table.csv", f"{tmp_path}/../{tmp_path.name}/table.csv"]
    digests = {_digest(RunConfig(data=spelled, target="y").validate()) for spelled in spellings}
    assert len(digests) == 1


def test_the_preparing_options_are_a_runs_in_declaration_order():
    names = data_cache.preparing_options()
    assert names == data_cache.preparing_options(RunConfig) == data_cache.preparing_options(BASE)
    declared = [f for f in RunConfig.__dataclass_fields__]
    assert names == [n for n in declared if n in names]
    assert {"data", "rows", "target", "seed"} <= set(names)
    assert not {"lr", "batch_size", "model", "epochs"} & set(names)
    assert set(data_cache.cache_key(BASE)["preparation"]) == set(names) - {"data"}


def test_the_cache_folder_is_named_after_the_source(tmp_path: Path):
    """``DIR/<name>-<digest>/``: the name from the key's source (a file's stem, a generator's name)."""
    table = tmp_path / "house prices.csv"
    table.write_text("x,y\n1,2\n3,4\n")
    for cfg, name in (
        (BASE, "synthetic-regression"),
        (RunConfig(data=str(table), target="y").validate(), "house_prices"),
        (RunConfig(data="iris").validate(), "iris"),
    ):
        key = data_cache.cache_key(cfg)
        folder = data_cache.TableCache(tmp_path, key).path
        assert folder == tmp_path / f"{name}-{data_cache.digest(key)}", cfg.data
