"""The index never answers wrongly: checksums recorded and checked (indexes of older versions still open),
`index verify` / `index repair` (only damaged partitions re-embedded, resumable), ids that cannot collide across
folders, changed sources noticed and updated in place, file names that are not UTF-8 or hold a newline, and an
item the engine cannot take failing alone."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from e5v import E5V
from e5v.errors import IndexDamagedError
from e5v.store import open_index
from e5v.store.layout import read_jsonl

from support import TEXTS, random_images


def build(cli, model_dir, source, out, *extra):
    return cli("index", "build", source, "--model", model_dir, "--out", out, "--device", "cpu", "--no-progress",
               *extra)


def texts_source(folder: Path, n: int = 10) -> Path:
    path = folder / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": f"{TEXTS[i % 5]} number {i}"}) + "\n"
                            for i in range(n)))
    return path


# --- integrity ------------------------------------------------------------------------------------------
def test_old_index_without_checksums_opens_and_gets_them(cli, model_dir, tmp_path):
    out = tmp_path / "old.idx"
    assert build(cli, model_dir, texts_source(tmp_path), out, "--part-size", "4")[0] == 0
    before = open_index(out).gather(np.arange(10))
    manifest = json.loads((out / "manifest.json").read_text())
    for p in manifest["partitions"]:  # what an index written before this version looks like
        for key in ("bytes", "sha256", "counts"):
            p.pop(key)
    manifest.pop("root")
    (out / "manifest.json").write_text(json.dumps(manifest))
    for marker in out.glob("*.done.json"):
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items()
                                      if k not in ("ids", "bytes", "sha256")}))
    index = open_index(out)
    assert index.search(before[:1], 1)[0][0].id == "t0"
    code, stdout, stderr = cli("index", "verify", out)
    assert code == 0 and "3 partitions have no checksums" in stderr and "--write" in stderr

    # counts are checked even without checksums: a partition that lost a row is an error, not a lost item
    rows = (out / "part-000001.rows.jsonl").read_text().splitlines(keepends=True)
    (out / "part-000001.rows.jsonl").write_text("".join(rows[1:]))
    with pytest.raises(IndexDamagedError, match=r"part-000001.rows.jsonl: 3 rows, the manifest says 4"):
        open_index(out).ids()
    (out / "part-000001.rows.jsonl").write_text("".join(rows))

    code, _, stderr = cli("index", "verify", out, "--write")
    assert code == 0 and "recorded checksums of 3 partitions" in stderr
    assert all("sha256" in p for p in json.loads((out / "manifest.json").read_text())["partitions"])
    npy = [out / f"part-00000{k}.npy" for k in (0, 1)]
    a, b = (p.read_bytes() for p in npy)
    npy[0].write_bytes(b), npy[1].write_bytes(a)  # same shape, other vectors: only the checksum can tell
    index = open_index(out)
    with pytest.raises(IndexDamagedError, match="part-000000.npy: does not match its checksum"):
        index.search(before[:1], 1)
    (out / "part-000002.rows.jsonl").unlink()  # repaired from the recorded source: the build's items, in order
    code, stdout, _ = cli("index", "repair", out, "--device", "cpu", "--no-progress")
    assert code == 0 and "re-embedded 3 partitions (part-000000, part-000001, part-000002)" in stdout
    assert cli("index", "verify", out)[0] == 0
    np.testing.assert_allclose(open_index(out).gather(np.arange(10)), before, atol=1e-5)
    assert open_index(out).ids() == [f"t{i}" for i in range(10)]


def test_verify_names_damage_and_repair_reembeds_only_it(cli, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "r.idx"
    assert build(cli, model_dir, texts_source(tmp_path, 12), out, "--part-size", "4")[0] == 0
    before = open_index(out).gather(np.arange(12))
    ids = open_index(out).ids()
    data = bytearray((out / "part-000000.npy").read_bytes())
    data[-3] ^= 0x10
    (out / "part-000000.npy").write_bytes(bytes(data))  # a flipped bit in the vectors
    (out / "part-000002.rows.jsonl").unlink()  # rows gone: items come from the source again

    code, stdout, stderr = cli("index", "verify", out)
    assert code == 1
    assert "part-000000: part-000000.npy does not match its checksum" in stdout
    assert "part-000002: part-000002.rows.jsonl is missing" in stdout and "part-000001" not in stdout
    assert "damaged: part-000000, part-000002" in stderr

    # interrupted after the first damaged partition: that one is kept, the rerun does the other only
    original = E5V.embed
    state = {"n": 0}

    def dies(self, items, **kw):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return original(self, items, **kw)

    monkeypatch.setattr(E5V, "embed", dies)
    assert cli("index", "repair", out, "--device", "cpu", "--no-progress")[0] == 130
    monkeypatch.setattr(E5V, "embed", original)
    code, stdout, _ = cli("index", "verify", out)
    assert code == 1 and "part-000000" not in stdout and "part-000002" in stdout

    counted = []
    monkeypatch.setattr(E5V, "embed", lambda self, items, **kw: (counted.append(len(items)),
                                                                 original(self, items, **kw))[1])
    code, stdout, _ = cli("index", "repair", out, "--device", "cpu", "--no-progress")
    assert code == 0 and "re-embedded 1 partitions (part-000002)" in stdout
    assert sum(counted) == 4  # only the damaged partition's items
    assert cli("index", "verify", out)[0] == 0
    index = open_index(out)
    assert index.ids() == ids
    np.testing.assert_allclose(index.gather(np.arange(12)), before, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p.get("file") for p in manifest["partitions"]] == ["part-000000.r1", None, "part-000002.r1"]
    assert not (out / "part-000000.npy").exists()  # the old files went once the manifest switched
    assert cli("index", "repair", out, "--device", "cpu")[1].endswith("nothing to repair\n")


@pytest.mark.slow
def test_repair_survives_kill_9(cli, model_dir, tmp_path):
    """kill -9 at random points of a repair; reruns finish it: the index equals the undamaged one, nothing stray."""
    out = tmp_path / "k.idx"
    assert build(cli, model_dir, texts_source(tmp_path, 24), out, "--part-size", "3")[0] == 0
    before, ids = open_index(out).gather(np.arange(24)), open_index(out).ids()
    for k in range(7):
        path = out / f"part-{k:06d}.npy"
        data = bytearray(path.read_bytes())
        data[-1 - k] ^= 0x01
        path.write_bytes(bytes(data))
    (out / "part-000003.rows.jsonl").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "e5v.cli", "index", "repair", str(out), "--device", "cpu", "--no-progress"]
    rng, kills, seen = random.Random(3), 0, []
    for _ in range(3):
        target = len(list(out.glob("*.r*.npy"))) + rng.randint(1, 2)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(list(out.glob("*.r*.npy"))) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))  # anywhere: mid-partition, between its files, in a manifest write
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        seen.append(sum(p.get("file") is not None for p in json.loads((out / "manifest.json").read_text())
                        ["partitions"]))
    assert kills >= 2 and seen == sorted(seen) and seen[0] < 7, seen
    code, stdout, _ = cli("index", "repair", out, "--device", "cpu", "--no-progress")
    assert code == 0
    assert cli("index", "verify", out)[0] == 0  # no damage, no stray files left by the kills
    index = open_index(out)
    assert index.ids() == ids
    np.testing.assert_allclose(index.gather(np.arange(24)), before, atol=1e-5)


# --- ids --------------------------------------------------------------------------------------------------
@pytest.fixture
def two_folders(tmp_path):
    ims = random_images(5, seed=21)
    photos, other = tmp_path / "photos", tmp_path / "other"
    (photos / "sub").mkdir(parents=True), other.mkdir()
    ims[0].save(photos / "IMG_0001.png"), ims[1].save(photos / "IMG_0002.png"), ims[2].save(photos / "sub/a.png")
    ims[3].save(other / "IMG_0001.png"), ims[4].save(other / "IMG_0003.png")  # a camera's names, again
    return photos, other


def test_add_from_another_folder_never_drops_a_same_named_file(cli, model_dir, two_folders, engine, tmp_path):
    photos, other = two_folders
    out = tmp_path / "ids.idx"
    assert build(cli, model_dir, photos, out)[0] == 0
    assert open_index(out).ids() == ["IMG_0001.png", "IMG_0002.png", "sub/a.png"]  # ids as before: stable

    code, stdout, _ = cli("index", "add", out, other, "--device", "cpu", "--no-progress")
    assert code == 0 and "this job: 2 items, 0 already in the index" in stdout
    index = open_index(out)
    assert index.ids() == ["IMG_0001.png", "IMG_0002.png", "sub/a.png", str(other / "IMG_0001.png"),
                           str(other / "IMG_0003.png")]
    hit = index.search(engine.encode_image([str(other / "IMG_0001.png")]), 1)[0][0]
    assert hit.id == str(other / "IMG_0001.png") and hit.score == pytest.approx(1, abs=1e-5)
    assert index.path_of("IMG_0001.png") == str(photos / "IMG_0001.png")

    (photos / "new").mkdir()
    random_images(1, seed=99)[0].save(photos / "new" / "b.png")
    code, stdout, _ = cli("index", "add", out, photos / "new", "--device", "cpu", "--no-progress")
    assert code == 0 and open_index(out).ids()[-1] == "new/b.png"  # inside the index's root: relative to it
    code, stdout, _ = cli("index", "add", out, photos, "--device", "cpu", "--no-progress")
    assert code == 0 and "this job: 0 items, 4 already in the index" in stdout and open_index(out).count == 6

    clash = tmp_path / "clash.jsonl"
    random_images(1, seed=98)[0].save(tmp_path / "c.png")
    clash.write_text(json.dumps({"id": "IMG_0002.png", "image": str(tmp_path / "c.png")}) + "\n")
    code, _, stderr = cli("index", "add", out, clash, "--device", "cpu")
    assert code == 1 and "'IMG_0002.png': the index holds" in stderr and "give them other ids" in stderr
    assert open_index(out).count == 6


def test_texts_of_another_file_with_the_same_ids_are_refused_not_merged(cli, model_dir, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))  # ids 0, 1, 2 by line
    second.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[3:]))  # ids 0, 1 again
    out = tmp_path / "t.idx"
    assert build(cli, model_dir, first, out)[0] == 0
    code, _, stderr = cli("index", "add", out, second, "--device", "cpu")
    assert code == 1 and "2 item(s)" in stderr and "give them other ids" in stderr and str(first) in stderr
    assert cli("index", "add", out, second, "--device", "cpu", "--update")[0] == 1  # not a change: never replaced
    assert [open_index(out).row(i)["text"] for i in range(3)] == TEXTS[:3]  # nothing replaced
    subset = tmp_path / "subset.jsonl"  # the same items listed by another file are known, not a clash
    subset.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS[:2])))
    code, stdout, _ = cli("index", "add", out, subset, "--device", "cpu")
    assert code == 0 and "2 already in the index" in stdout and open_index(out).count == 3


# --- changed sources --------------------------------------------------------------------------------------
def test_changed_sources_are_reported_and_updated_in_place(cli, model_dir, two_folders, engine, tmp_path):
    photos, _ = two_folders
    source = tmp_path / "mixed.jsonl"
    items = [{"id": "a", "image": str(photos / "IMG_0001.png")}, {"id": "b", "image": str(photos / "IMG_0002.png")},
             {"id": "t", "text": TEXTS[0]}, {"id": "u", "text": TEXTS[1]}]
    source.write_text("".join(json.dumps(r) + "\n" for r in items))
    out = tmp_path / "ch.idx"
    assert build(cli, model_dir, source, out, "--part-size", "2", "--ann", "hnsw", "--ann-dtype", "float32")[0] == 0
    old = open_index(out).gather(np.arange(4))

    time.sleep(0.01)
    random_images(1, seed=77)[0].save(photos / "IMG_0002.png")  # the photo was edited
    items[3]["text"] = TEXTS[4]  # and a caption
    source.write_text("".join(json.dumps(r) + "\n" for r in items))
    code, stdout, stderr = cli("index", "add", out, source, "--device", "cpu", "--no-progress")
    assert code == 0 and "2 changed (not updated)" in stdout
    assert f"changed since indexed: {photos / 'IMG_0002.png'}" in stderr and "--update" in stderr
    np.testing.assert_array_equal(open_index(out).gather(np.arange(4)), old)  # reported, not touched

    code, stdout, _ = cli("index", "add", out, source, "--update", "--device", "cpu", "--no-progress")
    assert code == 0 and "2 changed re-embedded" in stdout
    index = open_index(out)
    assert index.ids() == ["a", "b", "t", "u"] and index.count == 4  # replaced, not duplicated
    expected = np.concatenate([old[:1], engine.encode_image([str(photos / "IMG_0002.png")]), old[2:3],
                               engine.encode_text([TEXTS[4]])])
    np.testing.assert_allclose(index.gather(np.arange(4)), expected, atol=1e-5)
    assert index.info["ann"]["count"] == 4 and "stale" not in index.info["ann"]  # rebuilt over the new vectors
    assert index.search(expected[1:2], 1)[0][0].id == "b"
    assert cli("index", "verify", out)[0] == 0
    code, stdout, _ = cli("index", "add", out, source, "--device", "cpu", "--no-progress")
    assert code == 0 and "changed (not updated)" not in stdout  # up to date now


def test_update_refuses_a_damaged_partition_instead_of_sealing_the_damage(cli, model_dir, tmp_path):
    """--update copies a partition's other vectors into new files with new checksums: copying damaged ones would
    make the damage pass `index verify`, so the partition must be repaired first."""
    source = texts_source(tmp_path, 4)
    out = tmp_path / "u.idx"
    assert build(cli, model_dir, source, out)[0] == 0
    data = bytearray((out / "part-000000.npy").read_bytes())
    data[-3] ^= 0x10
    (out / "part-000000.npy").write_bytes(bytes(data))  # t0..t2's vectors are kept by the update; one is hurt
    source.write_text(source.read_text().replace("number 3", "number three"))
    code, _, stderr = cli("index", "add", out, source, "--update", "--device", "cpu", "--no-progress")
    assert code == 1 and "part-000000.npy does not match its checksum" in stderr and "index repair" in stderr
    assert not list(out.glob("*.r1.npy")) and cli("index", "verify", out)[0] == 1  # not rewritten, still seen
    assert cli("index", "repair", out, "--device", "cpu", "--no-progress")[0] == 0
    code, stdout, _ = cli("index", "add", out, source, "--update", "--device", "cpu", "--no-progress")
    assert code == 0 and "1 changed re-embedded" in stdout and cli("index", "verify", out)[0] == 0


# --- file names and items the engine cannot take ----------------------------------------------------------
def test_names_that_are_not_utf8_or_hold_a_newline(cli, model_dir, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    names = [b"caf\xe9-latin1.png", b"two\nlines.png", "plain.png".encode()]
    for name, im in zip(names, random_images(3, seed=4)):
        im.save(os.path.join(os.fsencode(folder), name))
    out = tmp_path / "names.idx"
    code, stdout, _ = build(cli, model_dir, folder, out)
    assert code == 0, stdout
    index = open_index(out)
    assert sorted(index.ids()) == sorted(os.fsdecode(n) for n in names)
    for name in names:  # the stored path is the very file, byte for byte
        path = index.path_of(os.fsdecode(name))
        assert os.fsencode(path) == os.path.join(os.fsencode(folder), name)
        assert index.image_bytes(os.fsdecode(name)) == Path(path).read_bytes()
    query = index.gather(np.array([index.position(os.fsdecode(names[0]))]))
    assert index.search(query, 1)[0][0].id == os.fsdecode(names[0])

    code, stdout, _ = cli("search", out, "--image", os.fsdecode(os.path.join(os.fsencode(folder), names[1])),
                          "--json", "-k", "3", "--device", "cpu")
    assert code == 0
    results = json.loads(stdout)["results"]  # JSON that reads back to the same names
    assert results[0]["id"] == "two\nlines.png" and {r["id"] for r in results} == {os.fsdecode(n) for n in names}
    code, stdout, _ = cli("search", out, "a picture", "-k", "3", "--device", "cpu")
    assert code == 0 and "caf\\udce9-latin1.png" in stdout  # shown escaped, not a crash


def test_texts_the_engine_cannot_take_fail_alone(cli, model_dir, engine, tmp_path, monkeypatch):
    source = tmp_path / "hostile.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "text": TEXTS[0]},
        {"id": "lone", "text": "broken \ud800 surrogate"},  # written as the JSON escape \ud800
        {"id": "sep", "text": "one\u2028two\x85three"},  # separators that are not newlines in JSON lines
        {"id": "b", "text": TEXTS[1]},
        {"id": "boom", "text": "the engine raises on this one"}]))
    original = E5V.embed

    def picky(self, items, **kw):  # an engine that raises for a whole batch because of one item
        if any(getattr(i, "text", None) == "the engine raises on this one" for i in items):
            raise RuntimeError("cannot prepare this item")
        return original(self, items, **kw)

    monkeypatch.setattr(E5V, "embed", picky)
    out = tmp_path / "hostile.idx"
    code, stdout, stderr = build(cli, model_dir, source, out)
    assert code == 3 and "skipped 2" in stdout
    index = open_index(out)
    assert index.ids() == ["a", "sep", "b"]
    np.testing.assert_allclose(index.gather(np.arange(3)),
                               engine.encode_text([TEXTS[0], "one\u2028two\x85three", TEXTS[1]]), atol=1e-5)
    skipped = {s["id"]: s["reason"] for s in read_jsonl(out / "skipped.jsonl")}
    assert set(skipped) == {"lone", "boom"} and "cannot prepare this item" in skipped["boom"]
    assert "text id=lone" in stderr and "text id=boom" in stderr
    shutil.rmtree(out)
