"""Index builds that stop half-way: kill -9 of a build at several random points, an interrupted add, two ranks
under torchrun, and worker processes. Each must give the index a clean single-process build gives."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from e5v import E5V
from e5v.cli import main
from e5v.store import open_index

from support import random_images

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A JSONL manifest of 150 texts and 30 images (two of them unreadable), mixed."""
    root = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)
    words = "the a dog cat runs quickly over lazy river mountain blue green sky house tree child guitar".split()
    rows = []
    for i, im in enumerate(random_images(30, seed=7)):
        if i in (4, 17):
            (root / f"im{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            im.save(root / f"im{i}.png")
        rows.append({"id": f"img-{i}", "image": f"im{i}.png", "n": i})
    rows += [{"id": f"txt-{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 25))), "n": i}
             for i in range(150)]
    rng.shuffle(rows)
    path = root / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(model_dir, src, out, *extra) -> int:
    return main(["index", "build", str(src), "--model", model_dir, "--out", str(out), "--device", "cpu",
                 "--no-progress", "--part-size", "5", *map(str, extra)])


@pytest.fixture(scope="module")
def clean(model_dir, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "clean.idx"
    assert build(model_dir, source, out) == 3  # two unreadable images
    return out


def assert_same_index(a: Path, b: Path) -> None:
    ia, ib = open_index(a), open_index(b)
    assert ia.ids() == ib.ids()  # same items, same order: nothing lost, nothing twice
    assert len(set(ia.ids())) == ia.count == 178
    np.testing.assert_allclose(ia.gather(np.arange(ia.count)), ib.gather(np.arange(ib.count)), atol=1e-6)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["partitions"] == mb["partitions"] and ma["counts"] == mb["counts"] and ma["job"] is mb["job"] is None
    assert (a / "skipped.jsonl").read_text() == (b / "skipped.jsonl").read_text()


def done_markers(out: Path) -> int:
    return len(list(out.glob("part-*.done.json")))


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume(model_dir, source, clean, tmp_path):
    out = tmp_path / "killed.idx"
    cmd = [sys.executable, "-m", "e5v.cli", "index", "build", str(source), "--model", model_dir, "--out", str(out),
           "--device", "cpu", "--no-progress", "--part-size", "5"]
    rng = random.Random(1)
    kills, seen = 0, []
    for _ in range(3):
        target = done_markers(out) + rng.randint(1, 4)
        with open(tmp_path / "run.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV)
            deadline = time.monotonic() + 120
            while proc.poll() is None and done_markers(out) < target and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.05))  # land anywhere: mid-partition, between files, in a manifest write
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
        seen.append(done_markers(out))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["job"] is None or manifest["job"]["kind"] == "build"
        # what a reader sees in the meantime is consistent: the committed partitions only
        index = open_index(out)
        assert index.ids() == open_index(clean).ids()[:index.count]
    assert kills >= 2, f"the build finished before it could be killed: {(tmp_path / 'run.log').read_text()[-2000:]}"
    assert seen == sorted(seen) and seen[0] < 36  # progress kept across kills, the first kill mid-way

    embedded = []
    original = E5V.embed

    def counting(self, items, **kw):
        embedded.append(len(items))
        return original(self, items, **kw)

    E5V.embed = counting
    try:
        assert build(model_dir, source, out) == 3
    finally:
        E5V.embed = original
    assert sum(embedded) <= 180 - 5 * seen[-1]  # finished partitions were not embedded again
    assert_same_index(out, clean)


def test_interrupted_add_resumes(model_dir, source, clean, tmp_path, monkeypatch):
    lines = source.read_text().splitlines()
    first = source.parent / "first.jsonl"
    first.write_text("\n".join(lines[:60]) + "\n")
    out = tmp_path / "grown.idx"
    assert build(model_dir, first, out) in (0, 3)

    calls = []
    original = E5V.embed

    def dies(self, items, **kw):
        calls.append(len(items))
        if len(calls) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the add
        return original(self, items, **kw)

    monkeypatch.setattr(E5V, "embed", dies)
    args = ["index", "add", str(out), str(source), "--device", "cpu", "--no-progress", "--part-size", "5"]
    assert main(args) == 130
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["kind"] == "add" and manifest["job"]["items"] == 120
    monkeypatch.setattr(E5V, "embed", original)
    other = source.parent / "other.jsonl"
    other.write_text(lines[0] + "\n")
    assert main(["index", "add", str(out), str(other), "--device", "cpu"]) == 1  # another job must wait
    assert main(args) in (0, 3)
    index, reference = open_index(out), open_index(clean)
    assert sorted(index.ids()) == sorted(reference.ids()) and len(set(index.ids())) == 178
    pos = [reference.position(i) for i in index.ids()]
    np.testing.assert_allclose(index.gather(np.arange(178)), reference.gather(pos), atol=1e-5)


@pytest.mark.slow
def test_two_ranks_under_torchrun_equal_one_process(model_dir, source, clean, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ranks.idx"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "e5v.cli", "index", "build",
                           str(source), "--model", model_dir, "--out", str(out), "--device", "cpu", "--no-progress",
                           "--part-size", "5"], env=ENV, capture_output=True, text=True, timeout=300)
    # rank 0 exits 3 (done, with skipped items), which torchrun reports as a failed child
    assert proc.returncode == 1 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert "built" in proc.stdout and proc.stdout.count("built") == 1, proc.stdout + proc.stderr[-3000:]
    assert_same_index(out, clean)


def test_worker_processes_give_the_same_index(model_dir, source, tmp_path, monkeypatch):
    """Images decoded in two worker processes (the engine's ``num_workers``) give the same vectors."""
    rows = [r for r in source.read_text().splitlines() if '"image"' in r][:12]
    small = source.parent / "images.jsonl"
    small.write_text("\n".join(rows) + "\n")
    plain, workers = tmp_path / "plain.idx", tmp_path / "workers.idx"
    build(model_dir, small, plain)
    engines, close = [], E5V.close
    monkeypatch.setattr(E5V, "close", lambda self: (engines.append(self.num_workers), close(self))[1])
    build(model_dir, small, workers, "--workers", "2")
    assert 2 in engines  # the option reached the engine
    a, b = open_index(plain), open_index(workers)
    assert a.ids() == b.ids() and a.count >= 10
    np.testing.assert_allclose(a.gather(np.arange(a.count)), b.gather(np.arange(b.count)), atol=1e-6)
