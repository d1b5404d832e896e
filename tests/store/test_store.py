"""``e5v index`` / ``e5v search`` and :mod:`e5v.store` on the tiny llava-next-llama3 checkpoint: every source kind
against the engine's own vectors, skipped items, add, the search contract and CLI (text, image, composed, --json),
the approximate index's recall, and refused misuse."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e5v import E5V, prompts
from e5v.cli import main
from e5v.errors import ConfigError
from e5v.store import Hit, embed_query, open_index
from e5v.store.layout import read_jsonl

from support import TEXTS, random_images


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 9 images (one in a sub-folder), a corrupt one, and a non-image file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, im in enumerate(random_images(9)):
        im.save(root / ("sub" if i == 4 else ".") / f"p{i}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "readme.md").write_text("not an image")
    return root


GOOD = ["p0.png", "p1.png", "p2.png", "p3.png", "p5.png", "p6.png", "p7.png", "p8.png", "sub/p4.png"]


@pytest.fixture(scope="module")
def photo_index(photos, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "photos.idx"
    code = main(["index", "build", str(photos), "--model", model_dir, "--out", str(out), "--device", "cpu",
                 "--part-size", "4", "--no-progress"])
    assert code == 3  # done, with a skipped item
    return out


# --- build from each source kind ----------------------------------------------------------------------------
def engine_dir(engine) -> str:
    return engine.backbone.model.name_or_path


def test_build_from_folder(photo_index, photos, engine):
    index = open_index(photo_index)
    info = index.info
    assert info["model"] == str(Path(engine_dir(engine)))
    assert info["dim"] == engine.dim and info["count"] == 9 and info["counts"] == {"image": 9, "text": 0}
    assert info["prompt"] == {"image": prompts.IMAGE_PROMPT, "text": prompts.TEXT} and info["precision"] == "float32"
    manifest = json.loads((photo_index / "manifest.json").read_text())
    assert [p["items"] for p in manifest["partitions"]] == [4, 4, 2]  # 10 listed images, 4 per partition
    assert manifest["job"] is None and manifest["skipped"] == 1
    assert index.ids() == GOOD  # sorted listing, the broken file dropped
    np.testing.assert_allclose(index.gather(np.arange(9)), engine.encode_image([str(photos / g) for g in GOOD]),
                               atol=1e-5)
    skipped = read_jsonl(photo_index / "skipped.jsonl")
    assert [(s["id"], s["item"]) for s in skipped] == [("broken.jpg", str(photos / "broken.jpg"))]
    assert "not a recognised image file" in skipped[0]["reason"]
    assert index.path_of("sub/p4.png") == str(photos / "sub" / "p4.png")
    assert index.image_bytes("p0.png") == (photos / "p0.png").read_bytes()
    assert index.path_of("nope") is None and index.image_bytes("nope") is None


def test_build_from_manifests_jsonl_csv_parquet(cli, model_dir, photos, engine, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "cap0", "image": str(photos / "p0.png"), "text": "a caption", "split": "val"},
            {"id": "t1", "text": TEXTS[1], "split": "train"},
            {"id": "t2", "text": TEXTS[3], "split": "val"},
            {"id": "p2", "image": "../" + photos.name + "/p2.png", "split": "val"}]  # relative to the manifest
    (photos.parent / "m").mkdir(exist_ok=True)
    jsonl = photos.parent / "m" / "items.jsonl"  # beside the photos folder, so the relative path resolves
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = photos.parent / "m" / "items.csv"
    csv.write_text("id,image,text,split\n" + "".join(
        f"{r['id']},{r.get('image', '')},\"{r['text'] if 'text' in r else ''}\",{r['split']}\n" for r in rows))
    parquet = photos.parent / "m" / "items.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "image": r.get("image"), "text": r.get("text")} for r in rows]),
                   parquet)
    expected = np.concatenate([engine.encode_image([str(photos / "p0.png")]), engine.encode_text([TEXTS[1], TEXTS[3]]),
                               engine.encode_image([str(photos / "p2.png")])])
    for src in (jsonl, csv, parquet):
        out = tmp_path / f"{src.suffix[1:]}.idx"
        code, stdout, _ = cli("index", "build", src, "--model", model_dir, "--out", out, "--device", "cpu",
                              "--no-progress", "--part-size", "3")
        assert code == 0, stdout
        assert "4 items (2 images, 2 texts) in 2 partitions" in stdout
        index = open_index(out)
        assert index.ids() == ["cap0", "t1", "t2", "p2"]
        np.testing.assert_allclose(index.gather(np.arange(4)), expected, atol=1e-5)
        hits = index.search(expected, 1, exact=True)
        assert [h[0].id for h in hits] == ["cap0", "t1", "t2", "p2"]
        cap, t1 = hits[0][0].meta, hits[1][0].meta
        assert cap["kind"] == "image" and cap["image"] == str(photos / "p0.png") and cap["text"] == "a caption"
        assert cap["split"] == "val" and t1 == {"kind": "text", "text": TEXTS[1], "split": "train"}
        assert hits[3][0].meta["image"] == str(photos / "p2.png")  # made absolute


def write_shard(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_build_from_webdataset_shards(cli, model_dir, engine, tmp_path):
    ims = random_images(4, seed=3)
    write_shard(tmp_path / "shard-000.tar", [
        ("s/000", {"png": png(ims[0]), "txt": b"first caption", "json": b'{"source": "web", "w": 1}'}),
        ("s/001", {"txt": TEXTS[0].encode()}),  # a text sample
        ("s/002", {"jpg": b"garbage bytes"}),  # an image that does not decode
    ])
    write_shard(tmp_path / "shard-001.tar", [
        ("s/003", {"png": png(ims[1]), "json": b"{broken"}),  # bad metadata: skipped with its reason
        ("s/004", {"cls": b"7"}),  # nothing to embed
        ("s/005", {"webp": png(ims[2])}),  # content, not the extension, decides the decoder
        ("s/000", {"png": png(ims[3])}),  # a key already seen in the first shard
    ])
    out = tmp_path / "wds.idx"
    code, stdout, stderr = cli("index", "build", tmp_path / "shard-{000..001}.tar", "--model", model_dir, "--out",
                               out, "--device", "cpu", "--no-progress")
    assert code == 3
    index = open_index(out)
    assert index.ids() == ["s/000", "s/001", "s/005"]
    expected = np.concatenate([engine.encode_image([png(ims[0])]), engine.encode_text([TEXTS[0]]),
                               engine.encode_image([png(ims[2])])])
    np.testing.assert_allclose(index.gather(np.arange(3)), expected, atol=1e-5)
    meta = index.search(expected[:1], 1)[0][0].meta
    assert meta["text"] == "first caption" and meta["source"] == "web" and meta["image"] is None
    assert meta["shard"] == str(tmp_path / "shard-000.tar") and meta["member"] == "s/000.png"
    assert index.image_bytes("s/000") == png(ims[0]) and index.path_of("s/000") is None
    reasons = {s["id"]: s["reason"] for s in read_jsonl(out / "skipped.jsonl")}
    assert set(reasons) == {"s/002", "s/003", "s/004", "s/000"}
    assert "not a recognised image file" in reasons["s/002"]
    assert "not valid JSON" in reasons["s/003"] and "no image" in reasons["s/004"]
    assert "duplicate id" in reasons["s/000"]
    assert "skipped 4" in stdout and "s/002" in stderr


# --- add -------------------------------------------------------------------------------------------------
def test_add_appends_only_new_items(cli, model_dir, photos, engine, tmp_path, tiny_dirs):
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({"id": g, "image": str(photos / g)}) + "\n" for g in GOOD[:5]))
    everything = tmp_path / "all.jsonl"
    everything.write_text("".join(json.dumps({"id": g, "image": str(photos / g)}) + "\n" for g in GOOD)
                          + json.dumps({"id": "note", "text": TEXTS[2]}) + "\n")
    out = tmp_path / "grow.idx"
    assert cli("index", "build", first, "--model", model_dir, "--out", out, "--device", "cpu", "--no-progress",
               "--part-size", "2", "--ann", "hnsw", "--ann-dtype", "float16")[0] == 0
    assert open_index(out).info["ann"]["count"] == 5

    code, stdout, _ = cli("index", "add", out, everything, "--device", "cpu", "--no-progress")  # model from manifest
    assert code == 0
    assert "this job: 5 items, 5 already in the index" in stdout and "recall@10" in stdout
    index = open_index(out)
    assert index.ids() == GOOD + ["note"] and index.info["counts"] == {"image": 9, "text": 1}
    assert index.info["ann"]["count"] == 10  # the approximate index was extended
    np.testing.assert_allclose(index.gather(np.arange(9)), engine.encode_image([str(photos / g) for g in GOOD]),
                               atol=1e-5)
    assert index.search(engine.encode_text([TEXTS[2]]), 1)[0][0].id == "note"

    code, stdout, _ = cli("index", "add", out, everything, "--device", "cpu", "--no-progress")
    assert code == 0 and "10 already in the index" in stdout and open_index(out).count == 10

    other = str(tiny_dirs["llava-next-mistral"])
    code, _, stderr = cli("index", "add", out, everything, "--model", other, "--device", "cpu")
    assert code == 1 and "other settings" in stderr and "model" in stderr


# --- the Python API and the vectors' space ---------------------------------------------------------------
def test_python_api_builds_what_the_cli_builds(photos, photo_index, model_dir, tmp_path):
    from e5v.config import EngineConfig
    from e5v.store import build_index
    from e5v.store.build import SETTINGS

    out = tmp_path / "api.idx"
    summary = build_index(photos, out, model=model_dir, config=EngineConfig(device="cpu"), part_size=4,
                          progress=False)
    assert not summary.finished_before and summary.items == 10 and [s["id"] for s in summary.skipped] == ["broken.jpg"]
    built, reference = open_index(out), open_index(photo_index)
    assert built.ids() == reference.ids() == GOOD
    np.testing.assert_array_equal(built.gather(np.arange(9)), reference.gather(np.arange(9)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {**json.loads((photo_index / "manifest.json").read_text()),
                        "sources": manifest["sources"]}  # only the job's time differs
    # the index records what EngineConfig.vector_settings calls the settings that change the vectors
    assert set(SETTINGS) == {*EngineConfig(model=model_dir).vector_settings(), "prompt", "precision"}
    assert manifest["model"] == str(Path(model_dir).resolve()) and manifest["dtype"] == "float32"
    assert manifest["weights"]["model"] and manifest["weights"]["adapter"] is None
    assert build_index(photos, out, model=model_dir, part_size=4, progress=False).finished_before
    with pytest.raises(ConfigError, match="needs a model"):
        build_index(photos, tmp_path / "none.idx")


def test_new_vectors_must_come_from_the_index_space(model_dir, tmp_path, caplog):
    """Options not given are the index's, and one that differs from the index's is refused. The compute dtype and
    the checkpoint files' fingerprint are recorded but not enforced: ``auto`` resolves on the machine that runs, and
    add and repair warn (one warning naming both values of each) when they differ from the recorded ones."""
    import logging
    import os
    import shutil

    from e5v.config import EngineConfig
    from e5v.store import add_to_index, build_index
    from e5v.store.indexing import index_config
    from e5v.store.repair import repair

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i]}) + "\n" for i in range(3)))
    more.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i]}) + "\n" for i in range(5)))
    out = tmp_path / "bf16.idx"
    build_index(first, out, config=EngineConfig(model=str(model), device="cpu", dtype="bfloat16"), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["weights"]["model"]
    assert index_config(manifest).dtype == "auto" and index_config(manifest).model == str(model)
    with pytest.raises(ConfigError, match="max_length: index has None, asked 8"):  # still enforced
        add_to_index(out, more, config=EngineConfig(device="cpu", max_length=8))

    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))  # as a copy without preserved mtimes
    (out / "part-000000.npy").unlink()
    caplog.set_level(logging.WARNING, logger="e5v.store.build")
    report, _ = repair(out, EngineConfig(device="cpu"), progress=False)  # auto: float32 on this CPU
    assert list(report.partitions) == ["part-000000"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "dtype: index has 'bfloat16', this run 'float32'" in warned[0]
    assert "weights: index has {'model': '" + manifest["weights"]["model"] in warned[0]
    assert "the checkpoint files changed since the index was built" in warned[0]
    caplog.clear()
    summary = add_to_index(out, more, config=EngineConfig(device="cpu"), progress=False)
    assert summary.known == 3 and summary.embedded == 2 and open_index(out).count == 5
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert open_index(out).info["dtype"] == "bfloat16"  # the record stays the build's
    with E5V.from_pretrained(str(model), device="cpu", dtype="float32") as fp32:  # repaired and added on this CPU
        want = fp32.encode_text(TEXTS[:5])
    np.testing.assert_allclose(open_index(out).gather(np.arange(5)), want, atol=1e-6)


def test_index_of_format_version_1_opens_searches_and_grows(cli, model_dir, engine, tmp_path):
    """An index written before the compute settings were recorded (its ``dtype`` is the storage precision)."""
    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i]}) + "\n" for i in range(3)))
    more.write_text("".join(json.dumps({"id": f"t{i}", "text": TEXTS[i]}) + "\n" for i in range(5)))
    out = tmp_path / "v1.idx"
    assert cli("index", "build", first, "--model", model_dir, "--out", out, "--device", "cpu", "--no-progress",
               "--precision", "float16")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("weights", "alpha", "dtype"):
        manifest.pop(key)
    manifest.update(version=1, dtype=manifest.pop("precision"))
    (out / "manifest.json").write_text(json.dumps(manifest))

    code, stdout, _ = cli("index", "info", out)
    info = json.loads(stdout)
    assert code == 0 and info["precision"] == "float16" and info["dtype"] is None
    code, stdout, _ = cli("search", out, TEXTS[1], "--json", "-k", "1", "--device", "cpu")
    assert code == 0 and json.loads(stdout)["results"][0]["id"] == "t1"
    code, stdout, _ = cli("index", "add", out, more, "--device", "cpu", "--no-progress")
    assert code == 0 and "5 items (0 images, 5 texts)" in stdout
    np.testing.assert_allclose(open_index(out).gather(np.arange(5)), engine.encode_text(TEXTS[:5]), atol=2e-3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["precision"] == "float16"
    assert not {"dtype", "weights", "alpha"} & set(manifest)  # nothing recorded that the old vectors did not have


# --- search -----------------------------------------------------------------------------------------------
def test_search_contract(photo_index):
    index = open_index(photo_index)
    vectors = index.gather(np.arange(index.count))
    hits = index.search(vectors, 3)
    assert len(hits) == 9 and all(len(h) == 3 for h in hits)
    for i, row in enumerate(hits):  # every item finds itself first
        assert isinstance(row[0], Hit) and row[0].id == GOOD[i] and row[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    q = np.random.default_rng(1).standard_normal((4, index.dim)).astype(np.float32)
    brute = q @ vectors.T
    for qi, row in enumerate(index.search(q, 5)):
        assert [h.id for h in row] == [GOOD[j] for j in np.argsort(-brute[qi], kind="stable")[:5]]
        np.testing.assert_allclose([h.score for h in row], np.sort(brute[qi])[::-1][:5], rtol=1e-5)
    assert len(index.search(q[:1], 100)[0]) == 9  # k beyond the collection
    with pytest.raises(ConfigError, match="64-d vectors"):
        index.search(np.ones((1, 5), np.float32), 3)
    with pytest.raises(ConfigError, match="NaN"):
        index.search(np.full((1, index.dim), np.nan, np.float32), 3)


def test_search_cli_text_image_composed(cli, photo_index, photos, engine):
    index = open_index(photo_index)
    gallery = index.gather(np.arange(index.count))

    def ranking(q):
        return [GOOD[j] for j in np.argsort(-(gallery @ q), kind="stable")[:4]]

    code, stdout, _ = cli("search", photo_index, "--image", photos / "p3.png", "--json", "-k", "4", "--device", "cpu")
    assert code == 0
    res = json.loads(stdout)
    assert res["search"] == "exact" and [r["rank"] for r in res["results"]] == [1, 2, 3, 4]
    assert res["results"][0]["id"] == "p3.png" and res["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert res["results"][0]["meta"] == {"kind": "image", "image": str(photos / "p3.png")}

    q = embed_query(engine, index.info, text="a red bicycle")
    np.testing.assert_allclose(q, engine.encode_text(["a red bicycle"])[0], atol=1e-6)
    code, stdout, _ = cli("search", photo_index, "a red bicycle", "--json", "-k", "4", "--device", "cpu")
    assert [r["id"] for r in json.loads(stdout)["results"]] == ranking(q)

    composed = engine.encode_composed([(str(photos / "p5.png"), "make it blue")], task="fashioniq-dress")[0]
    code, stdout, _ = cli("search", photo_index, "--image", photos / "p5.png", "--text", "make it blue", "--task",
                          "fashioniq-dress", "-k", "4", "--json", "--device", "cpu")
    res = json.loads(stdout)
    assert res["query"]["task"] == "fashioniq-dress" and [r["id"] for r in res["results"]] == ranking(composed)
    assert [r["score"] for r in res["results"]] == pytest.approx(np.sort(gallery @ composed)[::-1][:4], abs=1e-5)

    code, stdout, stderr = cli("search", photo_index, "a red bicycle", "-k", "2", "--device", "cpu")
    lines = stdout.splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split()[2] == ranking(q)[0]
    assert str(photos) in lines[0] and "2 of 9 items (exact search" in stderr

    assert cli("search", photo_index, "--device", "cpu")[0] == 2  # no query
    code, _, stderr = cli("search", photo_index, "--image", photos / "broken.jpg", "--device", "cpu")
    assert code == 1 and "broken.jpg" in stderr and "not a recognised image file" in stderr


# --- approximate index -----------------------------------------------------------------------------------
def test_ann_recall_on_a_larger_collection(tmp_path):
    """5,000 clustered unit vectors written through the build's own partition writer; HNSW int8 recall@10
    against exact search is measured, recorded, and matches an independent count."""
    from e5v.store.ann import build_ann
    from e5v.store.build import IndexJob, commit, new_manifest, write_part
    from e5v.store.sources import Entry

    rng = np.random.default_rng(0)
    dim, n = 64, 5000
    centers = rng.standard_normal((50, dim))
    vecs = centers[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, dim))
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    entries = [Entry(id=f"v{i}", text=f"item {i}") for i in range(n)]
    settings = {"model": "synthetic", "adapter": None, "chat_format": None, "max_length": None,
                "prompt": {"image": prompts.IMAGE_PROMPT, "text": prompts.TEXT}, "precision": "float16"}
    job = IndexJob("build", "synthetic", "x", 0, 1000, entries)
    manifest = new_manifest(settings)
    for j in range(job.nparts):
        part = job.part(j)
        write_part(tmp_path, job, j, vecs[j * 1000:(j + 1) * 1000], [e.row() for e in part], [], "float16")
    manifest = commit(tmp_path, manifest, job)
    assert manifest["count"] == n and manifest["job"] is None

    queries = (vecs[:200] + 0.3 * rng.standard_normal((200, dim))).astype(np.float32)
    info = build_ann(tmp_path, dtype="int8", m=16, ef_search=64, queries=queries)
    index = open_index(tmp_path)
    assert index.info["ann"] == info and info["count"] == n and info["recall_queries"] == 200
    exact, approx = index.search(queries, 10, exact=True), index.search(queries, 10)
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact)])
    assert info["recall_at_10"] == pytest.approx(recall, abs=1e-4) and recall >= 0.9
    stored = index.gather(np.arange(n))  # float16 on disk
    for row, q in zip(approx[:20], queries):  # scores of approximate hits are exact inner products
        pos = [int(h.id[1:]) for h in row]
        np.testing.assert_allclose([h.score for h in row], stored[pos] @ q, rtol=1e-5, atol=1e-6)


# --- misuse ---------------------------------------------------------------------------------------------
def test_misuse_is_refused(cli, model_dir, photos, photo_index, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    code, _, stderr = cli("index", "build", photos, "--model", model_dir, "--out", busy, "--device", "cpu")
    assert code == 1 and "not an e5v index" in stderr and (busy / "mine.txt").read_text() == "keep me"

    before = (photo_index / "manifest.json").read_bytes()
    other = tmp_path / "one.jsonl"
    other.write_text(json.dumps({"text": "x"}) + "\n")
    code, _, stderr = cli("index", "build", other, "--model", model_dir, "--out", photo_index, "--device", "cpu")
    assert code == 1 and "e5v index add" in stderr
    code, _, stderr = cli("index", "build", photos, "--model", model_dir, "--out", photo_index, "--device", "cpu",
                          "--task", "cirr")
    assert code == 1 and "prompt" in stderr
    code, stdout, stderr = cli("index", "build", photos, "--model", model_dir, "--out", photo_index, "--device",
                               "cpu", "--part-size", "4")
    assert code == 0 and "nothing to do" in stdout, stderr
    assert (photo_index / "manifest.json").read_bytes() == before

    code, _, stderr = cli("index", "add", tmp_path / "none", other, "--device", "cpu")
    assert code == 1 and "no index there" in stderr
    code, _, stderr = cli("search", tmp_path, "x", "--device", "cpu")
    assert code == 1 and "not an e5v index" in stderr
    code, _, stderr = cli("index", "build", tmp_path / "nothing-*.png", "--model", model_dir, "--out",
                          tmp_path / "x.idx")
    assert code == 1 and "no image files found" in stderr
