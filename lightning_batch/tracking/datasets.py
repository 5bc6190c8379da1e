"""A run's dataset input, recorded as ``mlflow.data.from_pandas`` would, at a fraction of the cost.

:func:`log_dataset_input` builds MLflow's own ``Dataset`` entity from the column dtypes and a
vectorised digest (:func:`frame_digest`): MLflow's ``PandasDataset`` calls Python once per cell,
which at millions of cells costs more than a small fit (the figures: ``benchmarks/scale.py``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

#: 64-bit words hashed against one block of position keys (see :func:`frame_digest`).
_DIGEST_BLOCK = 1 << 16


_MASK64 = (1 << 64) - 1


def log_dataset_input(client: Any, run_id: str, frame: Any, source: str, target: str, name: str) -> None:
    """Record ``frame`` as the run's ``training`` input: what ``mlflow.data.from_pandas`` records, cheaply.

    MLflow's ``PandasDataset`` calls Python once per cell (its schema inference, its nullability
    check and its digest's ``df.map(type)``), most of a run's time at millions of cells. This
    builds the same ``mlflow.entities.Dataset`` from the column dtypes and vectorised passes instead
    (:func:`dataset_entity`): the same name, schema JSON, profile (``num_rows``, ``num_elements``),
    source (the resolved file, or a ``CodeDatasetSource`` naming bundled or generated data) and the
    ``mlflow.data.context=training`` tag; only the digest is defined differently
    (:func:`frame_digest`). ``target`` is not recorded: MLflow's entity has no field for it.
    """
    from mlflow.entities import DatasetInput, InputTag

    entity = dataset_entity(frame, _dataset_source(source), name)
    tags = [InputTag(key="mlflow.data.context", value="training")]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=tags)])


def dataset_input_fields(frame: Any, source: str, name: str) -> dict[str, Any]:
    """:func:`dataset_entity`'s fields as plain JSON, to record later with :func:`log_dataset_fields`
    (the data cache keeps them, so a run reading prepared tables records the source it never read)."""
    entity = dataset_entity(frame, _dataset_source(source), name)
    return {
        "name": entity.name,
        "digest": entity.digest,
        "source_type": entity.source_type,
        "source": entity.source,
        "schema": entity.schema,
        "profile": entity.profile,
    }


def log_dataset_fields(client: Any, run_id: str, fields: dict[str, Any]) -> None:
    """Record a dataset input kept by :func:`dataset_input_fields` as the run's ``training`` input."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag

    tags = [InputTag(key="mlflow.data.context", value="training")]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=DatasetEntity(**fields), tags=tags)])


def _dataset_source(source: str) -> Any:
    """A file is its own source; bundled and generated data are described by how they were made."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if not Path(source).is_file():
        return CodeDatasetSource({"origin": source})
    with warnings.catch_warnings():  # MLflow guesses a source type for plain strings, noisily
        warnings.simplefilter("ignore")
        return resolve_dataset_source(str(Path(source).resolve()))


def dataset_entity(frame: Any, source: Any, name: str | None = None) -> Any:
    """The ``mlflow.entities.Dataset`` of a pandas DataFrame (or pyarrow Table) from ``source``.

    The schema is MLflow's own ``{"mlflow_colspec": [...]}`` JSON, typed from each column's dtype
    as MLflow's ``_infer_pandas_column`` types it (see :func:`column_type`), ``required`` false
    where a column holds a missing value (None, NaN, NA, NaT) as in MLflow's ``_infer_required``.
    Where MLflow cannot type a column at all (and then records no schema for the whole frame) this
    records that one column as ``any`` (uint64, timedelta, complex, period, interval, text mixed
    with numbers) or ``double`` (decimal). Every pass over the values is a vectorised one (numpy,
    pandas' C routines, Arrow), never a Python call per cell.
    """
    import json

    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    frame = _as_pandas(frame)
    specs: list[ColSpec | TensorSpec] = []
    column_hashes = []
    for position in range(frame.shape[1]):
        column_name, column = frame.columns[position], frame.iloc[:, position]
        values, tag, missing = _canonical_values(column)
        specs.append(ColSpec(type=column_type(column, missing), name=column_name, required=not missing))
        column_hashes.append((column_name, tag, _words_hash(values)))
    try:
        schema: str | None = json.dumps({"mlflow_colspec": Schema(specs).to_dict()})
    except Exception:  # e.g. MLflow refusing a column name; MLflow then records no schema either
        schema = None
    return DatasetEntity(
        name=name if name is not None else "dataset",
        digest=_digest(len(frame), column_hashes),
        source_type=source._get_source_type(),
        source=source.to_json(),
        schema=schema,
        profile=json.dumps({"num_rows": len(frame), "num_elements": int(frame.size)}),
    )


def frame_digest(frame: Any) -> str:
    """An 8-hex-digit fingerprint of a frame's values, column names and order, and row order.

    Each column is brought to a fixed-width numpy array of its values: numbers, booleans and
    datetimes as numpy holds them (an Arrow-backed or nullable float column as floats with NaN for
    missing, a nullable integer column with missing values as float64 with NaN, like pandas' own
    numpy columns, nullable booleans as int8 with -1 for missing, tz-aware and Arrow timestamps as
    UTC datetime64 with NaT); anything else (text, categories by their category values, Arrow
    dates) as pandas' ``hash_pandas_object`` uint64 per row. The array's
    little-endian bytes, read as 64-bit words w_0, w_1, ..., give the column hash
    ``sum(w_j * K_j) mod 2**64``, K_j an odd key of the word's position (a splitmix64 key of j mod
    65536 times an odd key of the 65536-word block), so changing one number always changes it (a
    text value: unless its 64-bit hash collides) and moving rows almost surely does. The digest is
    the first 8 hex digits of the MD5 of a version tag, the row count and, per column, its name,
    its canonical dtype and its hash (so two different frames share it with odds of 2**-32, as
    MLflow's own 8-digit digests do). The same values stored as numpy, pandas nullable or
    Arrow-backed columns give the same digest; a float32 and a float64 column of the same numbers do
    not. MLflow's own digest (MD5 of the first 10,000 rows' text and number columns) is not
    reproduced: it needs a Python call per cell.

    Examples:
        >>> import pandas as pd
        >>> a = pd.DataFrame({"x": [1.0, 2.0], "s": ["a", "b"]})
        >>> frame_digest(a) == frame_digest(a.copy()), len(frame_digest(a))
        (True, 8)
        >>> frame_digest(a) == frame_digest(a.astype({"x": "double[pyarrow]", "s": "string[pyarrow]"}))
        True
        >>> frame_digest(a) == frame_digest(a.iloc[::-1])
        False
    """
    frame = _as_pandas(frame)
    column_hashes = []
    for position in range(frame.shape[1]):
        values, tag, _ = _canonical_values(frame.iloc[:, position])
        column_hashes.append((frame.columns[position], tag, _words_hash(values)))
    return _digest(len(frame), column_hashes)


def _as_pandas(frame: Any) -> Any:
    """A pyarrow Table as a DataFrame of Arrow-backed columns (no copy of the values); else as is."""
    if type(frame).__module__.startswith("pyarrow") and hasattr(frame, "to_pandas"):
        import pandas as pd

        return frame.to_pandas(types_mapper=pd.ArrowDtype)
    return frame


def _digest(rows: int, column_hashes: list[tuple[Any, str, int]]) -> str:
    import hashlib

    md5 = hashlib.md5(b"lightning-batch dataset digest v1\0", usedforsecurity=False)
    md5.update(rows.to_bytes(8, "little"))
    for column_name, tag, value in column_hashes:
        md5.update(f"{column_name}\0{tag}\0".encode())
        md5.update(value.to_bytes(8, "little"))
    return md5.hexdigest()[:8]


def _canonical_values(column: Any) -> tuple[Any, str, bool]:
    """(fixed-width numpy values, a tag naming their form, whether the column has a missing value).

    Numbers, booleans and datetimes come back as numpy values (no copy for numpy columns); other
    columns as ``hash_pandas_object``'s uint64 per row (tag ``hash``). The missing flag follows
    MLflow's ``_infer_required``: None, NaN (an Arrow float column's NaN included, which Arrow does
    not count as null), NA and NaT.
    """
    import numpy as np
    import pandas as pd

    dtype = column.dtype
    kind = getattr(dtype, "kind", "O")
    if isinstance(dtype, np.dtype) and kind in "biufcmM":
        values = column.to_numpy()
        if kind == "f":
            missing = bool(values.size) and bool(np.isnan(values.min()))  # min is NaN iff one is
        elif kind in "mM":
            missing = bool(np.isnat(values).any())
        else:
            missing = False
        return values, values.dtype.str, missing
    if kind in "biuf" and not isinstance(dtype, pd.CategoricalDtype):  # nullable and Arrow numbers
        itemsize = getattr(dtype, "itemsize", 8)
        if kind == "f":
            values = column.to_numpy(dtype=np.dtype(f"f{itemsize}"), na_value=np.nan)
            return values, values.dtype.str, bool(values.size) and bool(np.isnan(values.min()))
        if not column.hasnans:
            values = column.to_numpy(dtype=np.dtype(f"{kind}{itemsize}"))
            return values, values.dtype.str, False
        if kind == "b":  # booleans with missing values: int8, -1 for missing
            gaps = column.isna().to_numpy()
            values = column.fillna(False).to_numpy(dtype=np.int8)
            values[gaps] = -1
            return values, "bool?", True
        # integers with missing values: float64 with NaN, as a numpy column holds them
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, values.dtype.str, True
    unit = getattr(dtype, "unit", None) or getattr(getattr(dtype, "pyarrow_dtype", None), "unit", None)
    if kind == "M" and unit:  # tz-aware and Arrow timestamps: the UTC instants, NaT for missing
        values = np.asarray(column.array, dtype=f"datetime64[{unit}]")
        return values, values.dtype.str, bool(np.isnat(values).any())
    return _row_hashes(column), "hash", bool(column.hasnans)


def _row_hashes(column: Any) -> Any:
    """pandas' ``hash_pandas_object`` of each value (uint64), for columns that are not plain numbers."""
    import pandas as pd

    dtype = column.dtype
    if isinstance(dtype, pd.ArrowDtype):  # view layouts pandas cannot hash: as their plain layouts
        import pyarrow as pa

        plain = {"string_view": pa.large_string(), "binary_view": pa.large_binary()}.get(
            str(dtype.pyarrow_dtype)
        )
        if plain is not None:
            values = pa.array(column.array).cast(plain)
            column = pd.Series(pd.arrays.ArrowExtensionArray(values), copy=False)
    try:
        return pd.util.hash_pandas_object(column, index=False).to_numpy()
    except Exception:  # unhashable values (lists, dicts): hashed by their text, the one slow path
        return pd.util.hash_pandas_object(column.astype(str), index=False).to_numpy()


def column_type(column: Any, missing: bool) -> Any:
    """The MLflow type of a column from its dtype, as MLflow's ``_infer_pandas_column`` gives it.

    Numbers, booleans, datetimes and Arrow numbers, strings and timestamps by dtype kind and width
    (MLflow's ``_infer_numpy_dtype``). Columns MLflow types by their values (object, pandas'
    ``str``/``string``, category, Arrow binary, dictionary and list columns) from their values'
    inferred type (one C pass, ``pandas.api.types.infer_dtype``), their categories, or their Arrow
    type: ``any`` when every value is missing, as MLflow.
    """
    import numpy as np
    import pandas as pd
    from mlflow.types.schema import AnyType, DataType

    dtype = column.dtype
    kind = getattr(dtype, "kind", "O")
    if kind != "O":
        return _kind_type(kind, getattr(dtype, "itemsize", 8))
    if isinstance(dtype, np.dtype):  # numpy object (the other numpy kinds are typed above)
        return _object_type(column)  # its inferred type says "empty" when every value is missing
    if len(column) and missing and column.isna().all():
        return AnyType()
    if isinstance(dtype, pd.CategoricalDtype):
        return _category_type(dtype.categories)
    if isinstance(dtype, pd.StringDtype):
        return DataType.string
    if isinstance(dtype, pd.ArrowDtype):
        return _arrow_type(dtype.pyarrow_dtype)
    return AnyType()  # period, interval, sparse of those: no MLflow type


def _kind_type(kind: str, itemsize: int) -> Any:
    """MLflow's ``_infer_numpy_dtype`` by kind and item size; ``any`` where MLflow has no type."""
    from mlflow.types.schema import AnyType, DataType

    if kind == "b":
        return DataType.boolean
    if kind in "iu":
        if itemsize < 4 or (kind == "i" and itemsize == 4):
            return DataType.integer
        if itemsize < 8 or (kind == "i" and itemsize == 8):
            return DataType.long
        return AnyType()  # uint64: MLflow has no unsigned 64-bit type
    if kind == "f" and itemsize <= 8:
        return DataType.float if itemsize <= 4 else DataType.double
    return {"U": DataType.string, "S": DataType.binary, "M": DataType.datetime}.get(kind, AnyType())


def _object_type(column: Any) -> Any:
    """An object column's type from ``infer_dtype`` (C), as MLflow's ``infer_objects`` + per-value pass."""
    import pandas as pd
    from mlflow.types.schema import AnyType, DataType

    if not len(column):
        return DataType.string  # MLflow: an empty object column is text
    inferred = pd.api.types.infer_dtype(column, skipna=True)
    if inferred in ("integer", "floating", "mixed-integer-float"):
        # MLflow lets pandas convert the column first: ints with a missing value become float64,
        # float32 scalars stay float32.
        converted = column.infer_objects().dtype
        return _kind_type(converted.kind, converted.itemsize)
    return {
        "string": DataType.string,
        "bytes": DataType.binary,
        "boolean": DataType.boolean,
        "datetime64": DataType.datetime,
        "datetime": DataType.datetime,
        "date": DataType.datetime,
        "decimal": DataType.double,
    }.get(inferred, AnyType())


def _category_type(categories: Any) -> Any:
    """A categorical column's type: MLflow sees its values as Python scalars, so ints are long."""
    from mlflow.types.schema import AnyType, DataType

    kind = getattr(categories.dtype, "kind", "O")
    if kind in "iu":
        return DataType.long
    if kind == "f":
        return DataType.double
    if kind == "O":
        import pandas as pd

        return column_type(pd.Series(categories), missing=False)
    return {"b": DataType.boolean, "M": DataType.datetime, "U": DataType.string}.get(kind, AnyType())


def _arrow_type(arrow_type: Any) -> Any:
    """The MLflow type of an Arrow column whose pandas kind is ``O`` (binary, dictionary, list, ...)."""
    import pyarrow as pa
    from mlflow.types.schema import AnyType, Array, DataType

    types = pa.types
    if types.is_dictionary(arrow_type):
        value_type = arrow_type.value_type
        return _arrow_type(value_type) if _kind_of(value_type) == "O" else _arrow_value_type(value_type)

    def of(*names: str) -> bool:  # the view types are pyarrow >= 16
        return any(getattr(types, name, lambda _: False)(arrow_type) for name in names)

    if of("is_string", "is_large_string", "is_string_view"):
        return DataType.string
    if of("is_binary", "is_large_binary", "is_binary_view", "is_fixed_size_binary"):
        return DataType.binary
    if types.is_decimal(arrow_type):
        return DataType.double
    if of("is_list", "is_large_list", "is_fixed_size_list", "is_list_view", "is_large_list_view"):
        item = _arrow_value_type(arrow_type.value_type)
        return AnyType() if isinstance(item, AnyType) else Array(item)
    return AnyType()


def _kind_of(arrow_type: Any) -> str:
    import pandas as pd

    return pd.ArrowDtype(arrow_type).kind


def _arrow_value_type(arrow_type: Any) -> Any:
    """The MLflow type of Arrow values seen one by one as Python scalars (list items, dictionary values)."""
    import pandas as pd
    from mlflow.types.schema import DataType

    kind = _kind_of(arrow_type)
    if kind == "O":
        return _arrow_type(arrow_type)
    if kind in "iu":
        return DataType.long
    if kind == "f":
        return DataType.double
    return _kind_type(kind, pd.ArrowDtype(arrow_type).itemsize)


def _words_hash(values: Any) -> int:
    """``sum(w_j * K_j) mod 2**64`` over the 64-bit little-endian words w_j of ``values``' bytes.

    K_j = key[j mod 65536] * block_key[j // 65536], both odd, so K_j is odd and a change of any word
    changes the sum. One ``numpy.dot`` per 65536 words against a cached key block: no temporaries.
    """
    import numpy as np

    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    whole = raw.size - raw.size % 8
    words = raw[:whole].view("<u8")
    keys = _position_keys()
    total = 0
    for block, start in enumerate(range(0, words.size, _DIGEST_BLOCK)):
        chunk = words[start : start + _DIGEST_BLOCK]
        total += _splitmix64(_DIGEST_BLOCK + block) * int(np.dot(chunk, keys[: chunk.size]))
    if whole < raw.size:  # the last few bytes, zero-padded to one more word
        index = words.size
        tail = int.from_bytes(raw[whole:].tobytes(), "little")
        total += _splitmix64(_DIGEST_BLOCK + index // _DIGEST_BLOCK) * int(keys[index % _DIGEST_BLOCK]) * tail
    return total & _MASK64


def _splitmix64(x: int) -> int:
    """splitmix64's output function of ``x``, made odd."""
    z = (x * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) | 1


@functools.lru_cache(maxsize=1)
def _position_keys() -> Any:
    """:func:`_splitmix64` of 0 .. 65535 (odd uint64), computed with numpy once per process."""
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.arange(_DIGEST_BLOCK, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = (z ^ (z >> np.uint64(31))) | np.uint64(1)
    z.flags.writeable = False
    return z
