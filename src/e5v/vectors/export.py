"""Hand-off to vector databases: vectors, ids and metadata written as one table, in Parquet (read by pyarrow,
DuckDB, LanceDB, and the Qdrant and Milvus importers) or as a Lance dataset (LanceDB's own format).

Columns: ``id`` (string), one column per metadata field, and ``vector``: a fixed-size list of float32 or float16
of the vectors' width (the type vector databases read as a vector column). A metadata field named ``id`` or
``vector`` is written as ``meta_id`` / ``meta_vector``. A field whose values have no one Arrow type (a number in
one row, a text in another) is written as JSON text.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..parts import atomic_save

EXPORT_PRECISIONS = ("float32", "float16")
FORMATS = ("parquet", "lance")
#: rows per record batch (and Parquet row group)
BATCH = 65536
RESERVED = ("id", "vector")


def column_name(field: str) -> str:
    return f"meta_{field}" if field in RESERVED else field


def _metadata_column(values: list):
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())


def schema_and_batches(vectors, ids: Sequence, metadata: Sequence[dict] | None = None, *,
                       precision: str = "float32"):
    """The Arrow schema and an iterator of record batches of the table (``vectors`` may be a memory map: it is
    read ``BATCH`` rows at a time)."""
    import pyarrow as pa

    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"export precision must be one of {', '.join(EXPORT_PRECISIONS)}, not {precision!r}")
    n, width = np.shape(vectors)
    if len(ids) != n or (metadata is not None and len(metadata) != n):
        raise ConfigError(f"{n} vectors, {len(ids)} ids" + (f", {len(metadata)} metadata rows" if metadata else "")
                          + ": the counts must match")
    fields = list(dict.fromkeys(f for m in (metadata or []) for f in (m or {})))
    # one type per metadata column for the whole table: inferred from all its values, not batch by batch
    meta_columns = {f: _metadata_column([(m or {}).get(f) for m in metadata]) for f in fields}
    value_type = pa.float32() if precision == "float32" else pa.float16()
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)]
                       + [pa.field(column_name(f), meta_columns[f].type) for f in fields]
                       + [pa.field("vector", pa.list_(value_type, width), nullable=False)])

    def batches() -> Iterator:
        batch = BATCH
        for a in range(0, n, batch):
            rows = np.asarray(vectors[a:a + batch], dtype=precision)
            flat = pa.array(np.ascontiguousarray(rows).ravel(), type=value_type)
            columns = [pa.array([str(i) for i in ids[a:a + batch]], pa.string())]
            columns += [meta_columns[f].slice(a, len(rows)) for f in fields]
            columns.append(pa.FixedSizeListArray.from_arrays(flat, width))
            yield pa.RecordBatch.from_arrays(columns, schema=schema)

    return schema, batches()


def export_parquet(path, vectors, ids, metadata=None, *, precision: str = "float32") -> Path:
    """Write the table to the Parquet file ``path`` (replaced atomically)."""
    import pyarrow.parquet as pq

    path = Path(path)
    schema, batches = schema_and_batches(vectors, ids, metadata, precision=precision)

    def write(tmp):
        with pq.ParquetWriter(tmp, schema) as writer:
            for b in batches:
                writer.write_batch(b)

    atomic_save(path, write)
    return path


def export_lance(path, vectors, ids, metadata=None, *, precision: str = "float32") -> Path:
    """Write the table as the Lance dataset ``path`` (a folder; a dataset already there gets a new version with
    this table only)."""
    try:
        import lance
    except ImportError:
        raise ConfigError("the lance export needs the pylance package: pip install pylance") from None
    import pyarrow as pa

    path = Path(path)
    schema, batches = schema_and_batches(vectors, ids, metadata, precision=precision)
    mode = "overwrite" if path.exists() else "create"
    lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches), os.fspath(path), mode=mode)
    return path


def export_vectors(fmt: str, path, vectors, ids, metadata=None, *, precision: str = "float32") -> Path:
    """Export in ``fmt`` ("parquet" or "lance") to ``path``."""
    if fmt == "parquet":
        return export_parquet(path, vectors, ids, metadata, precision=precision)
    if fmt == "lance":
        return export_lance(path, vectors, ids, metadata, precision=precision)
    raise ConfigError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
