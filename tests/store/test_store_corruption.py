"""The corruption matrix: 28 kinds of damage to an index folder. Each must end DETECTED (a clear E5VError on open,
search, add or verify) or REPAIRED (after `e5v index repair`, search results equal the undamaged index), never
WRONG (results that differ without an error) or a traceback. The matrix is printed (run with -s to see it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from e5v.cli import main
from e5v.errors import E5VError
from e5v.store import open_index

from support import random_images

WORDS = "red blue green dog cat house river tree child guitar sky mountain lazy quick small".split()


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    """An index of 14 texts and 2 images in partitions of 4 (4, 4, 4, 4), with an HNSW index; its source."""
    root = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(5)
    for i, im in enumerate(random_images(2, seed=11)):
        im.save(root / f"im{i}.png")
    rows = [{"id": f"t{i}", "text": " ".join(rng.choice(WORDS, 6))} for i in range(14)]
    rows[3:3] = [{"id": "im0", "image": "im0.png"}]
    rows[9:9] = [{"id": "im1", "image": "im1.png"}]
    source = root / "items.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "base.idx"
    assert main(["index", "build", str(source), "--model", model_dir, "--out", str(out), "--device", "cpu",
                 "--no-progress", "--part-size", "4", "--ann", "hnsw", "--ann-dtype", "float32"]) == 0
    return out, source


def results(folder: Path, queries: np.ndarray):
    """What a user sees: the ids, and top-3 (id, score) of exact and default (HNSW) search."""
    index = open_index(folder)
    out = [index.ids()]
    for exact in (True, False):
        out.append([[(h.id, round(h.score, 4)) for h in row] for row in index.search(queries, 3, exact=exact)])
    return out


def look(folder: Path, queries: np.ndarray):
    try:
        return results(folder, queries)
    except E5VError as exc:
        return exc


def _npy(folder, k=0):
    return folder / f"part-{k:06d}.npy"


def _rows(folder, k=0):
    return folder / f"part-{k:06d}.rows.jsonl"


def _manifest(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def _swap(a: Path, b: Path):
    tmp = a.with_suffix(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _lines(path: Path, edit):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def _flip(path: Path, at: int):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_id(lines):
    lines[1] = lines[1].replace('"t1"', '"t9"', 1)  # same length: only the checksum can tell
    return lines


def _stray(f):
    shutil.copy(_npy(f, 1), _npy(f, 7))
    shutil.copy(_rows(f, 1), _rows(f, 7))


DAMAGE = {
    "truncate a vector file": lambda f: _npy(f).write_bytes(_npy(f).read_bytes()[:300]),
    "empty a vector file": lambda f: _npy(f).write_bytes(b""),
    "delete a vector file": lambda f: _npy(f).unlink(),
    "swap two vector files": lambda f: _swap(_npy(f, 0), _npy(f, 2)),
    "swap two whole partitions": lambda f: (_swap(_npy(f, 0), _npy(f, 2)), _swap(_rows(f, 0), _rows(f, 2))),
    "flip a byte in a vector file": lambda f: _flip(_npy(f, 1), -5),
    "vector file from another index's dtype": lambda f: np.save(_npy(f, 1), np.load(_npy(f, 1)).astype(np.float16)),
    "a valid vector file a row short": lambda f: np.save(_npy(f, 1), np.load(_npy(f, 1))[:3]),
    "both files of a partition a row short": lambda f: (np.save(_npy(f, 2), np.load(_npy(f, 2))[1:]),
                                                         _lines(_rows(f, 2), lambda ls: ls[1:])),
    "drop a rows line": lambda f: _lines(_rows(f), lambda ls: ls[:1] + ls[2:]),
    "duplicate a rows line": lambda f: _lines(_rows(f), lambda ls: ls[:2] + ls[1:]),
    "edit an id in a rows line": lambda f: _lines(_rows(f), _edit_id),
    "garbage in a rows file": lambda f: _rows(f, 2).write_bytes(b"\x00" * _rows(f, 2).stat().st_size),
    "delete a rows file": lambda f: _rows(f, 3).unlink(),
    "edit dim in the manifest": lambda f: _manifest(f, lambda m: m.update(dim=32)),
    "edit a partition count": lambda f: _manifest(f, lambda m: m["partitions"][1].update(count=3)),
    "edit counts consistently": lambda f: _manifest(f, lambda m: (m["partitions"][1].update(count=3),
                                                                  m.update(count=15), m["counts"].update(text=13))),
    "wrong types in the manifest": lambda f: _manifest(f, lambda m: m.update(count="16")),
    "wrong types in a partition's counts": lambda f: _manifest(f, lambda m: m["partitions"][1].update(counts="4")),
    "edit precision in the manifest": lambda f: _manifest(f, lambda m: m.update(precision="float16")),
    "reorder partitions in the manifest": lambda f: _manifest(f, lambda m: m["partitions"].reverse()),
    "point a partition at another's files": lambda f: _manifest(f, lambda m: m["partitions"][0].update(
        file="part-000002")),
    "delete the manifest": lambda f: (f / "manifest.json").unlink(),
    "truncated manifest JSON": lambda f: (f / "manifest.json").write_text((f / "manifest.json").read_text()[:200]),
    "stray partition": _stray,
    "truncate the ANN file": lambda f: (f / "ann-hnsw-float32.faiss").write_bytes(
        (f / "ann-hnsw-float32.faiss").read_bytes()[:1000]),
    "flip bytes in the ANN file": lambda f: _flip(f / "ann-hnsw-float32.faiss", -100),
    "delete the ANN file": lambda f: (f / "ann-hnsw-float32.faiss").unlink(),
}

#: damage to files (not to the manifest's own record) must be repaired, not only detected
REPAIRABLE = {"truncate a vector file", "empty a vector file", "delete a vector file", "swap two vector files",
              "swap two whole partitions", "flip a byte in a vector file", "vector file from another index's dtype",
              "a valid vector file a row short", "both files of a partition a row short",
              "drop a rows line", "duplicate a rows line", "edit an id in a rows line", "garbage in a rows file",
              "delete a rows file", "stray partition", "truncate the ANN file", "flip bytes in the ANN file",
              "delete the ANN file"}


def outcome(folder: Path, source: Path, damage, reference, queries, e5v) -> str:
    """DETECTED, REPAIRED, WRONG: ..., or UNDETECTED (an error is expected to surface somewhere)."""
    damage(folder)
    seen = look(folder, queries)
    if not isinstance(seen, Exception) and seen != reference:
        return "WRONG (search after the damage)"
    # `add` of the same source must not re-add anything out of alignment
    code = e5v("index", "add", folder, source, "--device", "cpu", "--no-progress")
    after_add = look(folder, queries)
    if code == 0 and not isinstance(after_add, Exception) and after_add != reference:
        return "WRONG (add re-added items)"
    detected = isinstance(seen, Exception) or code == 1
    if e5v("index", "verify", folder) == 1:
        detected = True
    elif not detected:
        return "UNDETECTED"
    code = e5v("index", "repair", folder, "--device", "cpu", "--no-progress")
    repaired = look(folder, queries)
    if not isinstance(repaired, Exception):
        if repaired != reference:
            return "WRONG (after repair)"
        return "REPAIRED" if code == 0 and e5v("index", "verify", folder) == 0 else "WRONG (verify)"
    return "DETECTED" if code == 1 else f"WRONG (repair said {code} and left {repaired})"


@pytest.mark.slow
def test_corruption_matrix(base, tmp_path, capsys):
    def e5v(*args) -> int:
        """``e5v ARGS`` in-process; a traceback, or an error that is not e5v's own, raises."""
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # a verb this e5v does not know
            raise RuntimeError(f"e5v {' '.join(map(str, args[:2]))}: usage error {exc.code}") from None
        err = capsys.readouterr().err
        if "Traceback" in err or "rerun with --debug" in err:
            raise RuntimeError(f"e5v {' '.join(map(str, args[:2]))}: {err.strip()[-300:]}")
        return code

    folder, source = base
    queries = open_index(folder).gather(np.arange(16))
    queries = queries + 0.05 * np.random.default_rng(0).standard_normal(queries.shape).astype(np.float32)
    reference = results(folder, queries)
    matrix = {}
    for kind, damage in DAMAGE.items():
        copy = tmp_path / kind.replace(" ", "-").replace("'", "")
        shutil.copytree(folder, copy)
        try:
            matrix[kind] = outcome(copy, source, damage, reference, queries, e5v)
        except Exception as exc:  # noqa: BLE001 - a traceback is the failure this test looks for
            matrix[kind] = f"TRACEBACK ({type(exc).__name__}: {exc})"
    capsys.readouterr()
    table = "\n".join(f"{kind:42s} -> {result}" for kind, result in matrix.items())
    with capsys.disabled():
        print(f"\ncorruption matrix ({len(matrix)} kinds):\n{table}")
    assert len(matrix) >= 15
    assert all(r in ("DETECTED", "REPAIRED") for r in matrix.values()), table
    assert {k for k, r in matrix.items() if r == "REPAIRED"} >= REPAIRABLE, table


def test_texts_were_really_compared(base):
    """The matrix's reference is not vacuous: the stored vectors are the engine's, and distinct."""
    folder, _ = base
    index = open_index(folder)
    assert index.count == 16 and len(set(index.ids())) == 16
    v = index.gather(np.arange(16))
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4) and (v @ v.T - np.eye(16)).max() < 0.9999
