"""Indexes with search codes (int8, binary, PCA-reduced): built, searched (queries through the index's own PCA,
candidates re-scored with the stored vectors), extended, verified and repaired; evaluated and exported from the
command line; ``e5v embed`` writing codes; the server's ``dimensions``. On the bundled mini model."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

import e5v.store.index as store_index
from e5v import E5V, prompts
from e5v.cli import main
from e5v.errors import ConfigError, IndexDamagedError
from e5v.serve.app import create_app
from e5v.serve.service import Settings
from e5v.serve.server import running
from e5v.store import build_index, embed_query, open_index
from e5v.store.ann import build_ann
from e5v.store.codes import update_codes
from e5v.store.layout import digest
from e5v.store.repair import repair, verify
from e5v.toyworld import MINI
from e5v.toyworld.measure import gallery as toy_gallery
from e5v.vectors import load_codec, make_codec

DIMS = 24


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """80 held-out toy scenes in two folders (60 to build from, 20 to add), their captions, and the mini model."""
    root = tmp_path_factory.mktemp("codes")
    g = toy_gallery(80)
    for folder, lo, hi in (("pics", 0, 60), ("more", 60, 80)):
        (root / folder).mkdir()
        for i in range(lo, hi):
            g.images[i].save(root / folder / f"{i:03d}.png")
    (root / "captions.txt").write_text("\n".join(g.plain[:60]) + "\n")
    with E5V.from_pretrained(str(MINI), device="cpu", dtype="float32") as model:
        yield {"root": root, "captions": g.plain, "model": model}


@pytest.fixture(scope="module")
def plain_index(toy):
    build_index(toy["root"] / "pics", toy["root"] / "plain", model=str(MINI), precision="float16", part_size=25,
                progress=False)
    return open_index(toy["root"] / "plain")


def build(toy, name, **options):
    build_index(toy["root"] / "pics", toy["root"] / name, model=str(MINI), part_size=25, progress=False, **options)
    return open_index(toy["root"] / name)


def ids(hits):
    return [[h.id for h in row] for row in hits]


def test_binary_pca_index_describes_its_codes(toy, plain_index):
    index = build(toy, "binary", precision="binary", dims=DIMS)
    info = index.info
    assert info["precision"] == "float16" and info["search"] == "codes" and info["count"] == 60
    assert info["codes"]["precision"] == "binary" and info["codes"]["dims"] == DIMS
    assert info["codes"]["bytes_per_vector"] == DIMS // 8 and info["codes"]["coded"] == 60
    assert 0.9 < info["codes"]["kept_variance"] <= 1
    assert plain_index.info["codes"] is None and plain_index.info["search"] == "exact"  # an index without codes
    # the stored vectors are the plain index's: the same model, prompts and float16 storage
    assert np.array_equal(index.gather(np.arange(60)), plain_index.gather(np.arange(60)))


def test_search_scans_the_codes_of_pca_reduced_queries_then_rescores(toy, plain_index, monkeypatch):
    index = build(toy, "binary", precision="binary", dims=DIMS)
    queries = toy["model"].encode_text(toy["captions"][:20], prompt=prompts.TEXT)
    monkeypatch.setattr(store_index, "default_candidates", lambda k: 8)  # fewer candidates than rows: a real cut
    codec, pca = index.transform()
    assert pca is not None and pca.dims == DIMS
    codes = np.concatenate([index.codes(i) for i in range(len(index.parts))])
    stored = index.gather(np.arange(index.count))
    scores = codec.score(pca.apply(queries), codes)
    candidates = np.lexsort((np.broadcast_to(np.arange(60), scores.shape), -scores), axis=1)[:, :8]
    exact = np.einsum("qd,qcd->qc", queries, stored[candidates])
    order = np.lexsort((candidates, -exact), axis=1)[:, :5]
    want = np.take_along_axis(candidates, order, 1)
    hits = index.search(queries, 5)
    assert [[index.position(h.id) for h in row] for row in hits] == want.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], np.take_along_axis(exact, order, 1),
                               rtol=1e-5)
    assert ids(hits) != ids(plain_index.search(queries, 5))  # 8 candidates of 3-byte codes: some misses
    # without the PCA on the query side the codes rank other rows: the query really goes through it
    wrong = codec.score(np.ascontiguousarray(queries[:, :DIMS]), codes)
    assert not np.array_equal(np.argsort(-wrong, axis=1)[:, :8], np.argsort(-scores, axis=1)[:, :8])
    # all rows as candidates: exactly the plain index's exact search
    monkeypatch.setattr(store_index, "default_candidates", lambda k: 100)
    assert ids(index.search(queries, 10)) == ids(plain_index.search(queries, 10))


def test_an_image_query_finds_itself_through_the_pca(toy):
    index = build(toy, "binary", precision="binary", dims=DIMS)
    for name in ("005.png", "042.png"):
        vec = embed_query(toy["model"], index.info, image=str(toy["root"] / "pics" / name))
        assert index.search(vec, 1)[0][0].id == name


def test_int8_full_width_index_searches_like_exact(toy, plain_index):
    index = build(toy, "int8", precision="int8")
    assert index.info["codes"]["dims"] is None and index.info["codes"]["bytes_per_vector"] == 128
    queries = toy["model"].encode_text(toy["captions"][:10], prompt=prompts.TEXT)
    got, want = index.search(queries, 10), plain_index.search(queries, 10)
    assert ids(got) == ids(want)
    np.testing.assert_allclose([[h.score for h in r] for r in got], [[h.score for h in r] for r in want], rtol=1e-6)
    assert ids(index.search(queries, 10, exact=True)) == ids(want)


def test_add_encodes_the_new_partitions_and_repair_the_damaged_codes(toy, plain_index):
    index = build(toy, "grow", precision="binary", dims=DIMS)
    assert main(["index", "add", str(index.path), str(toy["root"] / "more"), "--no-progress"]) == 0
    index = open_index(index.path)
    assert index.count == 80 and index.info["codes"]["coded"] == 80
    assert sorted(p.name for p in (index.path / "codes").glob("part-*.npy")) == \
        [f"part-00000{i}.npy" for i in range(4)]
    queries = toy["model"].encode_text(toy["captions"][60:70], prompt=prompts.TEXT)
    assert [row[0].id for row in index.search(queries, 1)] == \
        [row[0].id for row in index.search(queries, 1, exact=True)]
    # a flipped byte in one partition's codes: found by verify, encoded again by repair
    path = index.path / "codes" / "part-000001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(index.path)
    assert not report.ok and report.codes and "part-000001.npy" in report.codes[0]
    with pytest.raises(IndexDamagedError, match="do not match their checksum"):
        open_index(index.path).search(queries, 1)
    repair(index.path, progress=False)
    assert verify(index.path).ok
    assert ids(open_index(index.path).search(queries, 3)) == ids(index.search(queries, 3, exact=True))


def test_codes_of_a_rewritten_partition_are_bypassed_until_encoded_again(toy):
    index = build(toy, "stale", precision="int8", dims=DIMS)
    manifest_path = index.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["codes"]["parts"][1]["source"] = "part-000001.r7"  # as if the partition had been rewritten since
    manifest_path.write_text(json.dumps(manifest))
    stale = open_index(index.path)
    assert stale.info["codes"]["coded"] == 35
    queries = toy["model"].encode_text(toy["captions"][25:35], prompt=prompts.TEXT)
    # partition 1 is scanned in its stored form: its items are still found
    found, exact = stale.search(queries, 1), stale.search(queries, 1, exact=True)
    assert [row[0].id for row in found] == [row[0].id for row in exact]
    entry = update_codes(index.path)
    assert entry["parts"][1]["source"] == "part-000001" and open_index(index.path).info["codes"]["coded"] == 60


def test_codes_and_an_approximate_index_exclude_each_other(toy):
    with pytest.raises(ConfigError, match="not both"):
        build(toy, "both", precision="binary", ann={})
    index = build(toy, "binary", precision="binary", dims=DIMS)
    with pytest.raises(ConfigError, match="search codes"):
        build_ann(index.path)


def test_evaluate_prints_the_recall_of_every_setting(toy, plain_index, tmp_path, capsys):
    queries = toy["model"].encode_text(toy["captions"][:60], prompt=prompts.TEXT)
    np.save(tmp_path / "captions.npy", queries)
    out = tmp_path / "recall.md"
    assert main(["index", "evaluate", str(plain_index.path), "--queries", f"text->image={tmp_path / 'captions.npy'}",
                 "--dims", "16", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table == out.read_text()
    lines = table.strip().splitlines()
    assert "text->image R@1 (n=60)" in lines[0] and len(lines) == 2 + 12
    assert lines[2].startswith("| float32 | 128 | no | 512 | - | 1.000 | 1.000 |")
    rows = json.loads(out.with_suffix(".json").read_text())
    assert {(r["precision"], r["dims"], r["rescore"]) for r in rows} >= {("binary", 16, True), ("int8", 128, False)}


def test_export_round_trips_the_stored_vectors_ids_and_metadata(toy, plain_index, tmp_path):
    assert main(["index", "export", str(plain_index.path), str(tmp_path / "toy.parquet")]) == 0
    t = pq.read_table(tmp_path / "toy.parquet")
    assert t.column("id").to_pylist() == plain_index.ids()
    assert t.column("kind").to_pylist() == ["image"] * 60
    assert t.column("image").to_pylist()[3] == str(toy["root"] / "pics" / "003.png")
    vectors = np.stack(t.column("vector").to_numpy(zero_copy_only=False))
    stored = np.concatenate([plain_index.vectors(i) for i in range(len(plain_index.parts))])
    assert vectors.dtype == np.float16 and np.array_equal(vectors.view(np.uint16), stored.view(np.uint16))
    lance = pytest.importorskip("lance", reason="the lance export needs pylance")
    assert main(["index", "export", str(plain_index.path), str(tmp_path / "toy.lance"), "--format", "lance",
                 "--precision", "float32"]) == 0
    back = lance.dataset(str(tmp_path / "toy.lance")).to_table()
    assert back.column("id").to_pylist() == plain_index.ids()
    assert np.array_equal(np.stack(back.column("vector").to_numpy(zero_copy_only=False)), stored.astype(np.float32))


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_embed_writes_codes_and_their_codec(toy, tmp_path, precision):
    out = tmp_path / "captions.npy"
    assert main(["embed", "--texts", str(toy["root"] / "captions.txt"), "--model", str(MINI), "--out", str(out),
                 "--precision", precision, "--no-progress"]) == 0
    codes = np.load(out)
    codec = load_codec(tmp_path / "captions.npy.codec.json")
    full = toy["model"].encode_text(toy["captions"][:60], prompt=prompts.TEXT)
    assert codec.precision == precision and np.array_equal(codes, codec.encode(full))
    if precision == "int8":
        assert np.abs(codec.decode(codes) - full).max() <= (codec.hi - codec.lo).max() / 510 + 1e-6
    # a float run over the same output removes the codec of the earlier one
    assert main(["embed", "--texts", str(toy["root"] / "captions.txt"), "--model", str(MINI), "--out", str(out),
                 "--no-progress"]) == 0
    assert not (tmp_path / "captions.npy.codec.json").exists() and np.load(out).dtype == np.float32


def test_server_dimensions_gives_the_index_pca_size(toy):
    index = build(toy, "binary", precision="binary", dims=DIMS)
    model = toy["model"]
    with running(create_app(model, Settings(model_name="mini"), index)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        texts = toy["captions"][:3]
        full = model.encode_text(texts, prompt=prompts.TEXT)
        r = client.post("/v1/embeddings", json={"input": texts, "dimensions": DIMS})
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert r.status_code == 200 and got.shape == (3, DIMS)
        np.testing.assert_allclose(got, index.transform()[1].apply(full), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)
        r = client.post("/v1/embeddings", json={"input": texts, "dimensions": 128})
        np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], full, atol=1e-5)
        r = client.post("/v1/embeddings", json={"input": texts, "dimensions": 16})
        assert r.status_code == 400
        assert "gives 128 (the model's width) or 24 (the PCA of the served index)" in r.json()["error"]["message"]


def test_codes_precision_names_are_checked(toy):
    with pytest.raises(ConfigError, match="precision must be one of"):
        build(toy, "bad", precision="int4")
    assert make_codec("binary", DIMS).bytes_per_vector == 3


def test_an_interrupted_refit_is_damage_that_repair_fits_again_to_the_manifest(toy, monkeypatch):
    """A re-fit killed after writing the new transform (and codes) but before the manifest: the transform disagrees
    with the manifest's dims and width, which opening reports as damage and repair fits again to the manifest's
    settings."""
    import e5v.store.codes as store_codes

    index = build(toy, "refit", precision="int8", dims=DIMS)
    queries = toy["model"].encode_text(toy["captions"][:10], prompt=prompts.TEXT)

    def killed(folder, manifest):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(store_codes, "write_manifest", killed)
        with pytest.raises(KeyboardInterrupt):
            update_codes(index.path, precision="int8", dims=16)
    assert json.loads((index.path / "codes" / "pca.json").read_text())["dims"] == 16
    with pytest.raises(IndexDamagedError, match="does not match the manifest; `e5v index repair`"):
        open_index(index.path).transform()
    assert not verify(index.path).ok
    repair(index.path, progress=False)
    assert verify(index.path).ok
    repaired = open_index(index.path)
    assert repaired.info["codes"]["dims"] == DIMS and repaired.transform()[1].dims == DIMS
    assert repaired.transform()[0].dim == DIMS and repaired.codes(0).shape == (25, DIMS)
    assert ids(repaired.search(queries, 3)) == ids(repaired.search(queries, 3, exact=True))


def test_codes_of_another_width_with_a_matching_checksum_are_damage(toy):
    index = build(toy, "width", precision="int8", dims=DIMS)
    path = index.path / "codes" / "part-000001.npy"
    np.save(path, np.zeros((25, 16), np.int8))
    manifest = json.loads((index.path / "manifest.json").read_text())
    manifest["codes"]["parts"][1]["sha256"] = digest(path)
    (index.path / "manifest.json").write_text(json.dumps(manifest))
    queries = toy["model"].encode_text(toy["captions"][:2], prompt=prompts.TEXT)
    with pytest.raises(IndexDamagedError, match="do not fit a int8 codec of width 24.*`e5v index repair`"):
        open_index(index.path).search(queries, 1)


def test_codes_are_not_made_beside_an_approximate_index(toy):
    """Rerunning a finished build with int8 on an index that has an HNSW index: refused before anything is
    written, and the index stays searchable and extendable."""
    index = build(toy, "hnsw", precision="float16", ann={"m": 8})
    before = (index.path / "manifest.json").read_text()
    with pytest.raises(ConfigError, match="approximate index; search codes are not made beside it"):
        build(toy, "hnsw", precision="int8")
    with pytest.raises(ConfigError, match="approximate index"):
        update_codes(index.path, precision="binary", dims=DIMS)
    assert (index.path / "manifest.json").read_text() == before and not (index.path / "codes").exists()
    assert main(["index", "add", str(index.path), str(toy["root"] / "more"), "--no-progress"]) == 0
    assert open_index(index.path).info["search"] == "hnsw" and open_index(index.path).count == 80


def test_float_codes_of_the_full_width_are_not_made(toy, plain_index):
    """--dims of the vectors' width (or more) with a float precision: no PCA, so no codes (a second copy of the
    stored vectors); the index is searched exactly, as the plain one."""
    index = build(toy, "fullwidth", precision="float16", dims=128)
    assert index.info["codes"] is None and index.info["search"] == "exact"
    assert not (index.path / "codes").exists()
    with pytest.raises(ConfigError, match="would copy the stored vectors"):
        update_codes(index.path, precision="float32")
    assert not (index.path / "codes").exists()
    assert build(toy, "fullwidth-int8", precision="int8", dims=500).info["codes"]["dims"] is None


def test_repair_hashes_each_code_file_once(toy, monkeypatch):
    import e5v.store.codes as store_codes

    index = build(toy, "hashes", precision="int8")
    hashed = []

    def counting(path):
        hashed.append(path.name)
        return digest(path)

    monkeypatch.setattr(store_codes, "digest", counting)
    report, _ = repair(index.path, progress=False)
    assert report.ok and sorted(hashed) == ["part-000000.npy", "part-000001.npy", "part-000002.npy"]


def test_add_update_encodes_the_rewritten_partition_once(toy, tmp_path, monkeypatch):
    import shutil

    import e5v.store.codes as store_codes
    from e5v.store import add_to_index

    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(30):
        shutil.copy(toy["root"] / "pics" / f"{i:03d}.png", pics / f"{i:03d}.png")
    build_index(pics, tmp_path / "upd", model=str(MINI), precision="int8", part_size=25, progress=False)
    shutil.copy(toy["root"] / "more" / "070.png", pics / "027.png")  # another picture under the same name
    runs = []
    real = store_codes.code_problems
    monkeypatch.setattr(store_codes, "code_problems", lambda *a, **k: runs.append(1) or real(*a, **k))
    summary = add_to_index(tmp_path / "upd", pics, update=True, progress=False)
    assert summary.updated == 1 and len(runs) == 1
    index = open_index(tmp_path / "upd")
    assert index.info["codes"]["coded"] == 30 and verify(index.path).ok
    vec = embed_query(toy["model"], index.info, image=str(pics / "027.png"))
    assert index.search(vec, 1)[0][0].id == "027.png"


def test_a_rerun_that_fits_codes_reports_them(toy, capsys):
    index = build(toy, "later", precision="float16")
    assert main(["index", "build", str(toy["root"] / "pics"), "--out", str(index.path), "--model", str(MINI),
                 "--part-size", "25", "--precision", "binary", "--dims", str(DIMS), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already holds this build (60 items)" in out and f"search codes: binary, {DIMS} dims (PCA" in out
    assert open_index(index.path).info["codes"]["coded"] == 60


def test_evaluate_takes_paths_with_equals_signs_and_explains_codes(toy, plain_index, tmp_path, monkeypatch, capsys):
    queries = toy["model"].encode_text(toy["captions"][:20], prompt=prompts.TEXT)
    (tmp_path / "run=1").mkdir()
    np.save(tmp_path / "run=1" / "captions.npy", queries)
    np.save(tmp_path / "a=b.npy", queries)
    monkeypatch.chdir(tmp_path)
    for spec, name in ((f"{tmp_path}/run=1/captions.npy", "captions"), ("t2i=run=1/captions.npy", "t2i"),
                       ("a=b.npy", "a=b")):
        assert main(["index", "evaluate", str(plain_index.path), "--queries", spec, "--precisions", "float32",
                     "--json"]) == 0, spec
        assert [r["queries"] for r in json.loads(capsys.readouterr().out)] == [name], spec
    np.save(tmp_path / "codes.npy", make_codec("int8", 128).fit(queries).encode(queries))
    assert main(["index", "evaluate", str(plain_index.path), "--queries", "codes.npy"]) == 2
    err = capsys.readouterr().err
    assert "holds int8 codes" in err and "needs float32 or float16 query vectors" in err
