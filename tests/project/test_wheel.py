"""Installing e5v. The set-up script installs the runtime, or with ``--test`` the test set too. The package works
when installed from its wheel: built offline from this checkout, installed into a fresh virtual environment, run
from a folder outside the checkout. Everything e5v reads at run time must ship inside
the wheel (pyproject.toml's package data): the bench's architecture config, the demo's mini model, the search page.

To keep torch & co. from being installed again, the fresh environment sees this environment's site-packages
through a ``.pth`` line (which adds the folder only: this environment's editable e5v is not activated); e5v
itself comes from the wheel alone, which the test checks."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from support import ROOT
DEMO_SCENES = 20


def _run(cmd, *, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _build_wheel(tmp: Path, env: dict) -> Path:
    """The wheel of a copy of the checkout's package files (the build writes nothing into the checkout)."""
    source, dist = tmp / "source", tmp / "dist"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, source], cwd=tmp, env=env)
    (wheel,) = dist.glob("e5v-*.whl")
    return wheel


def _fresh_venv(venv: Path, env: dict) -> Path:
    """A new virtual environment that sees this one's site-packages (not its e5v); returns its interpreter."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv.parent, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=venv.parent, env=env).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "project-site-packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    wheel = _build_wheel(tmp_path, env)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert {"e5v/py.typed", "e5v/bench/llama3-llava-next-8b/config.json", "e5v/serve/static/index.html",
            "e5v/toyworld/mini/model.safetensors"} <= shipped

    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = _fresh_venv(venv, env)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
         cwd=elsewhere, env=env)
    where = _run([python, "-c", "import e5v; print(e5v.__file__)"], cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # e5v from the wheel, not the checkout
    e5v = venv / "bin" / "e5v"

    verbs = _run([e5v, "--help"], cwd=elsewhere, env=env).stdout
    assert all(verb in verbs for verb in ("embed", "demo", "serve", "index", "train", "bench", "eval"))
    assert "--config" in _run([e5v, "bench", "--tiny", "--help"], cwd=elsewhere, env=env).stdout

    # the bench reads its shipped architecture config: the smallest run on the CPU
    bench = _run([e5v, "bench", "--tiny", "--device", "cpu", "--images", "2", "--texts", "4", "--workers", "0",
                  "--image-batches", "1", "--text-batches", "4", "--variants", "", "--out", "bench.json"],
                 cwd=elsewhere, env=env)
    result = json.loads((elsewhere / "bench.json").read_text())
    assert result["meta"]["model"].startswith("llama3-llava-next-8b (tiny widths)")
    assert "smallest cosine between the official recipe and e5v" in bench.stdout

    # the demo: the shipped mini model, the gallery, the index, the queries, the summary and the page
    out = tmp_path / "demo"
    demo = _run([e5v, "demo", "--scenes", str(DEMO_SCENES), "--out", out], cwd=elsewhere, env=env).stdout
    assert f"gallery: {DEMO_SCENES} held-out scenes" in demo and "held-out recall" in demo
    assert "nan" not in demo  # a gallery too small for edit pairs says n/a, never a silent NaN
    figures = json.loads((out / "recall.json").read_text())
    assert {"with prompts", "without prompts"} <= set(figures)
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all((out / s).is_file() for s in srcs)
    assert f"page: {(out / 'index.html').resolve()}" in demo


@pytest.mark.parametrize("flag", ["", "--test"])
def test_setup_installs_the_runtime_or_the_test_set(tmp_path, flag):
    """scripts/setup.sh with stand-ins for the interpreter and dpkg that record the calls: torch pinned first, then
    e5v alone (the runtime) or with its test set; CI runs the test command as the README gives it."""
    import stat

    repo, calls = tmp_path / "repo", tmp_path / "calls.jsonl"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    fake = repo / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    dpkg = tmp_path / "bin" / "dpkg"  # every system package present: apt-get is never called
    dpkg.parent.mkdir()
    dpkg.write_text("#!/bin/sh\nexit 0\n")
    for f in (fake, dpkg):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{dpkg.parent}:{os.environ['PATH']}"}
    _run(["bash", repo / "scripts" / "setup.sh", *([flag] if flag else [])], cwd=tmp_path, env=env)
    installs = [c[c.index("install") + 1:] for c in map(json.loads, calls.read_text().splitlines())
                if c[:2] == ["-m", "pip"] and "install" in c]
    assert installs == [["-q", "--upgrade", "pip"], ["-q", "-r", "requirements.txt"],
                        ["-q", "-e", ".[dev]" if flag else "."]]
    wrong = subprocess.run(["bash", repo / "scripts" / "setup.sh", "--tests"], env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "usage" in wrong.stderr
    assert "\nbash scripts/setup.sh --test && .venv/bin/python -m pytest tests -p no:cacheprovider\n" in \
        (ROOT / ".ci" / "run").read_text()
