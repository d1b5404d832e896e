"""Export to vector databases, read back with each consumer's own library: vectors and ids bitwise, metadata."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from e5v.errors import ConfigError
from e5v.vectors import export_lance, export_parquet, export_vectors, unit_rows
from e5v.vectors import export as export_module


def table(n=300, width=24):
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng.standard_normal((n, width)))
    ids = [f"img-{i:04d}" for i in range(n)]
    metadata = [{"caption": f"a photo {i}", "year": 2000 + i % 20} for i in range(n)]
    metadata[3]["id"] = "coco-17"           # clashes with the id column
    metadata[4]["extra"] = {"tags": ["a"]}  # a field only one row has
    metadata[5]["year"] = "unknown"         # a field without one type
    return vectors, ids, metadata


def check_metadata(columns: dict, metadata):
    assert columns["caption"] == [m["caption"] for m in metadata]
    assert columns["meta_id"][3] == "coco-17" and columns["meta_id"][2] is None
    assert columns["extra"][4] == {"tags": ["a"]} and columns["extra"][0] is None
    assert [json.loads(y) for y in columns["year"]] == [m["year"] for m in metadata]  # as JSON text


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_parquet_round_trips_exactly(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(export_module, "BATCH", 64)  # several record batches / row groups
    vectors, ids, metadata = table()
    path = export_parquet(tmp_path / "v.parquet", vectors, ids, metadata, precision=precision)
    t = pq.read_table(path)
    assert t.column_names == ["id", "caption", "year", "meta_id", "extra", "vector"]
    assert str(t.schema.field("vector").type) == \
        f"fixed_size_list<element: {'float' if precision == 'float32' else 'halffloat'}>[24]"
    assert pq.ParquetFile(path).num_row_groups == 5
    assert t.column("id").to_pylist() == ids
    back = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
    assert back.dtype == precision and np.array_equal(back.view(np.uint8), vectors.astype(precision).view(np.uint8))
    check_metadata(t.to_pydict(), metadata)


def test_duckdb_reads_the_parquet_export(tmp_path):
    duckdb = pytest.importorskip("duckdb")
    vectors, ids, metadata = table(50)
    path = export_parquet(tmp_path / "v.parquet", vectors, ids, metadata)
    rows = duckdb.sql(f"SELECT id, vector, caption FROM '{path}' ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ids and [r[2] for r in rows] == [m["caption"] for m in metadata]
    assert np.array_equal(np.array([r[1] for r in rows], dtype=np.float32), vectors)


@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_lance_round_trips_exactly(tmp_path, precision):
    lance = pytest.importorskip("lance", reason="the lance export needs pylance")
    vectors, ids, metadata = table()
    export_lance(tmp_path / "v.lance", vectors, ids, metadata, precision=precision)
    t = lance.dataset(str(tmp_path / "v.lance")).to_table()
    assert t.column("id").to_pylist() == ids
    back = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
    assert back.dtype == precision and np.array_equal(back.view(np.uint8), vectors.astype(precision).view(np.uint8))
    check_metadata(t.to_pydict(), metadata)
    # exporting again replaces the table (a new version), it does not append
    export_vectors("lance", tmp_path / "v.lance", vectors[:7], ids[:7], metadata[:7], precision=precision)
    assert lance.dataset(str(tmp_path / "v.lance")).to_table().column("id").to_pylist() == ids[:7]


def test_export_without_metadata_and_over_an_old_file(tmp_path):
    vectors, ids, _ = table(10)
    export_vectors("parquet", tmp_path / "v.parquet", vectors, ids, metadata=[{"a": 1}] * 10)
    export_vectors("parquet", tmp_path / "v.parquet", vectors[:4], ids[:4])
    t = pq.read_table(tmp_path / "v.parquet")
    assert t.column_names == ["id", "vector"] and t.num_rows == 4
    assert list(tmp_path.iterdir()) == [tmp_path / "v.parquet"]  # no temporary file left


def test_bad_exports_are_refused(tmp_path):
    vectors, ids, metadata = table(10)
    with pytest.raises(ConfigError, match="10 vectors, 9 ids"):
        export_parquet(tmp_path / "v.parquet", vectors, ids[:9])
    with pytest.raises(ConfigError, match="int8"):
        export_parquet(tmp_path / "v.parquet", vectors, ids, precision="int8")
    with pytest.raises(ConfigError, match="unknown export format 'csv'"):
        export_vectors("csv", tmp_path / "v.csv", vectors, ids)
