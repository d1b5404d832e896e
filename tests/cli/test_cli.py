"""``e5v embed`` end to end on the tiny llava-next-llama3 checkpoint: texts, images and pairs against the
Python API, the output files (vectors, ids, skip report), resuming from parts (reuse, kill -9, changed
settings), and user errors (a message and an exit status, never a traceback)."""
from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import e5v.cli
import e5v.cli.embed
from e5v import E5V
from e5v.cli import main

from support import TEXTS

@pytest.fixture
def cli(model_dir, capsys):
    """Run ``e5v embed`` in-process on the tiny checkpoint; returns (exit status, stdout, stderr)."""

    def run(*args, model=None):
        code = main(["embed", "--model", model or model_dir, "--device", "cpu", "--no-progress", *map(str, args)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run


def read_ids(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ids_of(out: Path) -> Path:
    return out.with_name(out.name + ".ids.jsonl")


def skipped_of(out: Path) -> Path:
    return out.with_name(out.name + ".skipped.jsonl")


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def no_cleanup(monkeypatch):
    """Keep the parts folder that a finished job would delete."""
    monkeypatch.setattr(e5v.cli.embed.shutil, "rmtree", lambda *a, **k: None)


def count_embedded(monkeypatch) -> list[int]:
    """Record how many items each ``E5V.embed`` call gets (the work actually done)."""
    calls, orig = [], E5V.embed

    def embed(self, items, **kw):
        calls.append(len(items))
        return orig(self, items, **kw)

    monkeypatch.setattr(E5V, "embed", embed)
    return calls


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the a dog cat runs quickly over lazy river mountain blue green sky house tree child guitar".split()
    return [f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for i in range(n)]


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- texts ------------------------------------------------------------------------------------------------
def test_texts_txt_blank_lines_are_not_items(cli, engine, tmp_path):
    """Blank lines (empty or only spaces) are not items: nothing is skipped, and ids stay line indices."""
    lines = [TEXTS[0], "", TEXTS[1], "  \t", TEXTS[2], TEXTS[4]]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "emb.npy"
    code, stdout, stderr = cli("--texts", src, "--out", out)

    assert code == 0
    kept = [0, 2, 4, 5]
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (4, engine.dim)
    np.testing.assert_allclose(vectors, engine.encode_text([lines[i] for i in kept]), atol=1e-5)
    assert read_ids(ids_of(out)) == [{"id": str(i), "index": k} for k, i in enumerate(kept)]
    assert not skipped_of(out).exists()
    assert "embedded 4 of 4 items, skipped 0" in stdout
    assert "empty text" not in stderr
    assert not parts_dir(out).exists()


def test_texts_jsonl_with_ids(cli, engine, tmp_path):
    rows = [{"id": "q7", "text": TEXTS[3]}, {"id": "a", "text": TEXTS[1], "lang": "en"}, {"text": TEXTS[0]}]
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "emb.npy"
    stale = skipped_of(out)  # left by an earlier run with a bad item
    stale.write_text('{"id": "1", "item": "old", "reason": "empty text"}\n')
    code, stdout, _ = cli("--texts", src, "--out", out)

    assert code == 0
    np.testing.assert_allclose(np.load(out), engine.encode_text([r["text"] for r in rows]), atol=1e-5)
    # an id-less line takes its line index as id
    assert read_ids(ids_of(out)) == [{"id": "q7", "index": 0}, {"id": "a", "index": 1},
                                                       {"id": "2", "index": 2}]
    assert not stale.exists()
    assert "embedded 3 of 3 items, skipped 0" in stdout
    assert not parts_dir(out).exists()
    # outputs are ordinary files (not mkstemp's 0600)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask()


# --- images -----------------------------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path, mixed_images):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    mixed_images[0].save(root / "a.png")
    mixed_images[1].save(root / "b.jpg", quality=90)
    mixed_images[2].save(root / "sub" / "c.png")
    mixed_images[4].save(root / "d.jpeg")
    whole = root / "d.jpeg"
    (root / "corrupt.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # truncated JPEG
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")  # not an image extension: not listed at all
    return root


def test_images_folder(cli, engine, image_folder, tmp_path):
    out = tmp_path / "emb.safetensors"
    code, stdout, stderr = cli("--images", image_folder, "--out", out)

    assert code == 3
    from safetensors.numpy import load_file

    vectors = load_file(out)["embeddings"]
    listed = ["a.png", "b.jpg", "corrupt.jpg", "d.jpeg", "empty.png", "sub/c.png"]  # sorted, recursive
    good = ["a.png", "b.jpg", "d.jpeg", "sub/c.png"]
    assert vectors.dtype == np.float32 and vectors.shape == (4, engine.dim)
    np.testing.assert_allclose(vectors, engine.encode_image([str(image_folder / g) for g in good]), atol=1e-5)
    assert read_ids(ids_of(out)) == [{"id": g, "index": listed.index(g)} for g in good]

    skipped = {r["id"]: r for r in read_ids(skipped_of(out))}
    assert sorted(skipped) == ["corrupt.jpg", "empty.png"]
    assert skipped["corrupt.jpg"]["item"] == str(image_folder / "corrupt.jpg")
    assert "truncated or corrupt" in skipped["corrupt.jpg"]["reason"]
    assert skipped["empty.png"]["item"] == str(image_folder / "empty.png")
    assert skipped["empty.png"]["reason"] == "empty file (0 bytes)"
    assert "embedded 4 of 6 items, skipped 2" in stdout
    assert str(image_folder / "corrupt.jpg") in stderr and str(image_folder / "empty.png") in stderr

    out16 = tmp_path / "emb16.npy"
    code, _, _ = cli("--images", image_folder, "--out", out16, "--precision", "float16")
    assert code == 3
    v16 = np.load(out16)
    assert v16.dtype == np.float16 and v16.shape == vectors.shape
    np.testing.assert_allclose(v16.astype(np.float32), vectors, atol=2e-3)


# --- pairs ------------------------------------------------------------------------------------------------
def test_pairs_tasks(cli, engine, image_folder, tmp_path):
    rows = [{"image": "imgs/a.png", "text": "make it red"},
            {"id": "p2", "image": str(image_folder / "sub" / "c.png"), "text": "remove the background"},
            {"image": "imgs/b.jpg", "text": "the same but at night"}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [(str(tmp_path / r["image"]), r["text"]) for r in rows]

    out = tmp_path / "cirr.npy"
    assert cli("--pairs", src, "--task", "cirr", "--out", out)[0] == 0
    cirr = np.load(out)
    np.testing.assert_allclose(cirr, engine.encode_composed(pairs, task="cirr"), atol=1e-5)
    assert [r["id"] for r in read_ids(ids_of(out))] == ["0", "p2", "2"]

    out2 = tmp_path / "fiq.npy"
    assert cli("--pairs", src, "--task", "fashioniq-toptee", "--out", out2)[0] == 0
    fiq = np.load(out2)
    np.testing.assert_allclose(fiq, engine.encode_composed(pairs, task="fashioniq-toptee"), atol=1e-5)
    assert np.abs(fiq - cirr).max() > 1e-3  # another prompt, other vectors


# --- resume -----------------------------------------------------------------------------------------------
def test_resume_reuses_finished_parts(cli, tmp_path, monkeypatch):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(sentences(12)) + "\n")
    out = tmp_path / "emb.npy"
    ids = ids_of(out)
    parts = parts_dir(out)
    with monkeypatch.context() as m:
        no_cleanup(m)
        assert cli("--texts", src, "--out", out, "--part-size", "3")[0] == 0
        first_vectors, first_ids = out.read_bytes(), ids.read_bytes()
        assert sorted(p.name for p in parts.glob("part-*.npz")) == [f"part-00000{k}.npz" for k in range(4)]

        # an interrupted job: no output yet, parts 1 and 3 missing
        out.unlink()
        ids.unlink()
        (parts / "part-000001.npz").unlink()
        (parts / "part-000003.npz").unlink()
        calls = count_embedded(m)
        assert cli("--texts", src, "--out", out, "--part-size", "3")[0] == 0
        assert calls == [3, 3]  # only the two missing parts were embedded again
        assert out.read_bytes() == first_vectors and ids.read_bytes() == first_ids

    # every part done: the model is not even loaded
    out.unlink()
    loads = []
    monkeypatch.setattr(e5v.cli.embed, "load_model", lambda args: loads.append(args) or pytest.fail("model loaded"))
    code, stdout, _ = cli("--texts", src, "--out", out, "--part-size", "3")
    assert code == 0 and loads == []
    assert "nothing left to embed" in stdout
    assert out.read_bytes() == first_vectors and ids.read_bytes() == first_ids
    assert not parts.exists()


@pytest.mark.slow
def test_resume_after_kill_9(cli, model_dir, tmp_path, monkeypatch):
    n, part_size = 600, 5
    for attempt in range(3):
        src = tmp_path / f"texts{attempt}.txt"
        src.write_text("\n".join(sentences(n, seed=attempt)) + "\n")
        out = tmp_path / f"run{attempt}" / "emb.npy"
        parts = parts_dir(out)
        args = ["--texts", str(src), "--out", str(out), "--part-size", str(part_size)]
        cmd = [sys.executable, "-m", "e5v.cli", "embed", "--model", model_dir, "--device", "cpu", "--no-progress",
               *args]
        with open(tmp_path / "killed.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 120
            while proc.poll() is None and not any(parts.glob("part-*.npz")) and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
        n *= 4  # it finished before the kill: make the job longer
    else:
        pytest.fail(f"could not kill the job mid-way: {(tmp_path / 'killed.log').read_text()[-2000:]}")

    nparts = n // part_size
    done = len(list(parts.glob("part-*.npz")))
    assert 1 <= done < nparts, "the kill should land mid-way"
    assert not out.exists() and not ids_of(out).exists()

    calls = count_embedded(monkeypatch)
    code, stdout, _ = cli(*args)
    assert code == 0
    assert sum(calls) <= n - done * part_size  # the parts written before the kill were reused
    assert f"embedded {n} of {n} items, skipped 0" in stdout
    assert not parts.exists()

    clean = tmp_path / "clean" / "emb.npy"
    assert cli("--texts", src, "--out", clean, "--part-size", part_size)[0] == 0
    resumed_ids, clean_ids = read_ids(ids_of(out)), read_ids(ids_of(clean))
    assert resumed_ids == clean_ids
    assert [r["index"] for r in resumed_ids] == list(range(n))  # nothing lost
    assert len({r["id"] for r in resumed_ids}) == n  # no duplicates
    resumed, reference = np.load(out), np.load(clean)
    assert resumed.shape == reference.shape == (n, resumed.shape[1])
    np.testing.assert_allclose(resumed, reference, atol=1e-6)


def test_resume_with_other_settings_is_refused(cli, tmp_path, monkeypatch):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "emb.npy"
    parts = parts_dir(out)
    with monkeypatch.context() as m:
        no_cleanup(m)
        assert cli("--texts", src, "--out", out, "--part-size", "2")[0] == 0
    (parts / "part-000002.npz").unlink()  # an unfinished job
    snapshot = {p.name: p.read_bytes() for p in [*parts.iterdir(), out, ids_of(out)]}

    code, stdout, stderr = cli("--texts", src, "--out", out, "--part-size", "2", "--prompt", "<sent> In one word:")
    assert code == 1
    assert str(parts) in stderr and "prompt" in stderr and "e5v embed: error:" in stderr
    assert "embedded" not in stdout
    assert {p.name: p.read_bytes() for p in [*parts.iterdir(), out, ids_of(out)]} == snapshot

    # the same settings resume it
    assert cli("--texts", src, "--out", out, "--part-size", "2")[0] == 0
    assert not parts.exists()


# --- bad usage --------------------------------------------------------------------------------------------
def test_out_must_be_npy_or_safetensors(cli, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("hello\n")
    code, stdout, stderr = cli("--texts", src, "--out", tmp_path / "x.txt")
    assert code == 2
    assert "x.txt" in stderr and ".npy or .safetensors" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt"]  # nothing written


def test_missing_texts_file(cli, tmp_path):
    missing = tmp_path / "nope.txt"
    code, _, stderr = cli("--texts", missing, "--out", tmp_path / "emb.npy")
    assert code == 1
    assert str(missing) in stderr and "file not found" in stderr
    assert list(tmp_path.iterdir()) == []


def test_argparse_usage_errors(cli, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli("--texts", "a.txt", "--images", "imgs", "--out", tmp_path / "emb.npy")
    assert exc.value.code == 2


@pytest.mark.slow
def test_unknown_model_dir(cli, engine, model_dir, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "emb.npy"
    bad = tmp_path / "no-such-model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "e5v.cli", "embed", "--model", str(bad), "--texts", str(src),
                           "--out", str(out), "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "e5v embed: error:" in proc.stderr and str(bad) in proc.stderr
    assert not out.exists()

    # the corrected command then runs (the failed attempt left no finished part to protect)
    code, _, _ = cli("--texts", src, "--out", out)
    assert code == 0
    np.testing.assert_allclose(np.load(out), engine.encode_text(TEXTS), atol=1e-5)


def test_output_into_a_closed_pipe_is_not_an_error(model_dir, tmp_path, monkeypatch, capsys):
    """`e5v ... | head` stops reading early: the command still finishes its job, without a traceback."""
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: the summary line meets a broken pipe
    closed = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", closed)
    out = tmp_path / "v.npy"
    code = main(["embed", "--model", model_dir, "--device", "cpu", "--no-progress", "--texts", str(src),
                 "--out", str(out)])
    closed.close()
    assert code == 0 and np.load(out).shape[0] == len(TEXTS)
    assert "Traceback" not in capsys.readouterr().err


# --- the CLI tells the truth ---------------------------------------------------------------------------------
def test_two_outputs_side_by_side_keep_their_own_ids(cli, engine, tmp_path):
    """`--out x.npy` then `--out x.safetensors` (the README's own examples): each output keeps the ids of its own
    rows; a shared x.ids.jsonl would leave the first one with the second one's list."""
    first, second = tmp_path / "a.txt", tmp_path / "b.jsonl"
    first.write_text("\n".join(TEXTS[:3]) + "\n")
    second.write_text("".join(json.dumps({"id": f"b{k}", "text": t}) + "\n" for k, t in enumerate(TEXTS[2:])))
    npy, st = tmp_path / "x.npy", tmp_path / "x.safetensors"
    assert cli("--texts", first, "--out", npy)[0] == 0
    code, stdout, _ = cli("--texts", second, "--out", st)
    assert code == 0 and f"ids -> {ids_of(st)}" in stdout

    assert ids_of(npy).name == "x.npy.ids.jsonl" and ids_of(st).name == "x.safetensors.ids.jsonl"
    assert read_ids(ids_of(npy)) == [{"id": str(k), "index": k} for k in range(3)]
    assert read_ids(ids_of(st)) == [{"id": f"b{k}", "index": k} for k in range(3)]
    assert np.load(npy).shape == (3, engine.dim)
    assert not (tmp_path / "x.ids.jsonl").exists()


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_input_is_0_by_dim_and_says_so(cli, engine, tmp_path, content):
    src = tmp_path / "texts.txt"
    src.write_text(content)
    out = tmp_path / "emb.npy"
    code, stdout, _ = cli("--texts", src, "--out", out)
    assert code == 0
    assert np.load(out).shape == (0, engine.dim)
    assert ids_of(out).read_text() == ""
    assert "embedded 0 of 0 items, skipped 0; the input holds 0 items" in stdout
    assert "resumed" not in stdout  # a fresh run


def test_every_item_skipped_keeps_the_width(cli, engine, tmp_path):
    src = tmp_path / "texts.jsonl"
    src.write_text('{"text": " "}\n{"text": ""}\n')
    out = tmp_path / "emb.npy"
    code, stdout, _ = cli("--texts", src, "--out", out)
    assert code == 3 and np.load(out).shape == (0, engine.dim)
    assert "embedded 0 of 2 items, skipped 2" in stdout and "resumed" not in stdout


def test_each_skipped_item_is_reported_once(cli, tmp_path, caplog):
    src = tmp_path / "texts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "ok", "text": TEXTS[0]}, {"id": "blank", "text": " "},
                                                         {"id": "ok2", "text": TEXTS[1]}]))
    out = tmp_path / "emb.npy"
    code, stdout, stderr = cli("--texts", src, "--out", out)
    assert code == 3
    name = f"{src} id=blank"
    said = stderr + "".join(r.getMessage() + "\n" for r in caplog.records)
    assert said.count(name) == 1, said
    assert f"skipped {name}: empty text" in stderr
    assert "skipped 1" in stdout and read_ids(skipped_of(out))[0]["reason"] == "empty text"


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e5v embed: error: "), stderr
    return lines[0]


def test_os_errors_end_with_one_line_and_status_1(cli, tmp_path, monkeypatch):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    code, stdout, stderr = cli("--texts", src, "--out", blocker / "emb.npy")
    assert code == 1 and stdout == ""
    assert str(blocker) in one_error_line(stderr)

    import e5v.parts

    # a read-only folder (as root, chmod does not stop writes: the OS error is raised where it would be) and a full disk
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:
        def mkstemp(dir=None, **kw):
            raise PermissionError(13, "Permission denied", str(dir))

        monkeypatch.setattr(e5v.parts.tempfile, "mkstemp", mkstemp)
    code, _, stderr = cli("--texts", src, "--out", readonly / "emb.npy")
    assert code == 1 and "Permission denied" in one_error_line(stderr) and str(readonly) in stderr
    monkeypatch.undo()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(e5v.parts.os, "fsync", full)
    out = tmp_path / "full" / "emb.npy"
    code, _, stderr = cli("--texts", src, "--out", out)
    assert code == 1 and one_error_line(stderr) == "e5v embed: error: No space left on device"
    assert not out.exists()


def test_corrupt_resume_part_and_debug_traceback(cli, model_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "emb.npy"
    with monkeypatch.context() as m:
        no_cleanup(m)
        assert cli("--texts", src, "--out", out, "--part-size", "2")[0] == 0
    (parts_dir(out) / "part-000001.npz").write_bytes(b"PK\x03\x04 not a zip any more")
    code, _, stderr = cli("--texts", src, "--out", out, "--part-size", "2")
    line = one_error_line(stderr)
    assert code == 1 and str(parts_dir(out) / "part-000001.npz") in line and "is damaged" in line

    code = main(["--debug", "embed", "--model", model_dir, "--device", "cpu", "--no-progress", "--texts", str(src),
                 "--out", str(out), "--part-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("e5v embed: error: ")


@pytest.mark.parametrize("flag", ["--part-size", "--max-batch-size", "--max-batch-tokens", "--max-length",
                                  "--anyres-max-tiles"])
def test_bad_argument_values_are_usage_errors(cli, tmp_path, capsys, flag):
    src = tmp_path / "texts.txt"
    src.write_text("hello\n")
    for value in ("0", "-3", "many"):
        with pytest.raises(SystemExit) as exc:
            cli("--texts", src, "--out", tmp_path / "emb.npy", flag, value)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: " in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts.txt"]


# --- names and texts that UTF-8 cannot encode -------------------------------------------------------------
def test_lone_surrogates_in_texts_are_skipped_once(cli, engine, tmp_path, caplog):
    src = tmp_path / "texts.jsonl"
    rows = [{"id": "a", "text": TEXTS[0]}, {"id": "bad", "text": "x \ud800 y"}, {"id": "c\ud800", "text": TEXTS[1]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON escapes: the file itself is valid UTF-8
    out = tmp_path / "emb.npy"
    code, stdout, stderr = cli("--texts", src, "--out", out)
    assert code == 3 and "embedded 2 of 3 items, skipped 1" in stdout
    np.testing.assert_allclose(np.load(out), engine.encode_text([TEXTS[0], TEXTS[1]]), atol=1e-5)
    assert [r["id"] for r in read_ids(ids_of(out))] == ["a", "c\ud800"]  # an odd id is kept as it was given
    assert read_ids(skipped_of(out))[0]["id"] == "bad"
    said = stderr + "".join(r.getMessage() + "\n" for r in caplog.records)
    assert said.count(f"{src} id=bad") == 1

    # a line of a text file that is not UTF-8 (here a lone surrogate written as WTF-8): that line, not the file
    txt = tmp_path / "texts.txt"
    txt.write_bytes(TEXTS[0].encode() + b"\nx \xed\xa0\x80 y\n" + TEXTS[1].encode() + b"\n")
    out = tmp_path / "emb2.npy"
    code, stdout, _ = cli("--texts", txt, "--out", out)
    assert code == 3 and "embedded 2 of 3 items, skipped 1" in stdout
    np.testing.assert_allclose(np.load(out), engine.encode_text([TEXTS[0], TEXTS[1]]), atol=1e-5)
    assert [r["id"] for r in read_ids(skipped_of(out))] == ["1"]


def test_file_names_that_are_not_utf8_round_trip(cli, engine, tmp_path, mixed_images):
    root = tmp_path / "imgs"
    root.mkdir()
    names = [b"plain.png", b"caf\xe9-\xff.png", b"two\nlines.png"]  # \xe9 \xff: not UTF-8; a newline in a name
    for name, im in zip(names, mixed_images):
        im.save(os.fsdecode(os.path.join(os.fsencode(root), name)), format="PNG")
    (root / os.fsdecode(b"bad-\xfe.png")).write_bytes(b"not an image")
    out = tmp_path / os.fsdecode(b"out-\xff.npy")  # the summary line names it: printing must not fail
    code, stdout, stderr = cli("--images", root, "--out", out)
    assert code == 3, stderr
    skipped = read_ids(skipped_of(out))
    assert [os.fsencode(r["id"]) for r in skipped] == [b"bad-\xfe.png"] and "bad-\\udcfe.png" in stderr
    rows = [json.loads(line) for line in ids_of(out).read_bytes().decode("ascii").splitlines()]  # escapes: ASCII
    assert sorted(os.fsencode(r["id"]) for r in rows) == sorted(names)  # given back unchanged
    paths = [os.path.join(root, r["id"]) for r in rows]
    np.testing.assert_allclose(np.load(out), engine.encode_image(paths), atol=1e-5)
    assert "embedded 3 of 4 items, skipped 1" in stdout
