"""Shared fixtures: tiny random checkpoints of every backbone family, built once per test session with
``save_pretrained`` and loaded back with ``from_pretrained`` (the same path as a real checkpoint)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# deepspeed (a test dependency) picks its accelerator on import; on a machine without a GPU it says so on
# stdout unless told, and the CLI tests read stdout
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import pytest
import torch
from PIL import Image

from e5v.tiny import FAMILIES, build_tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> checkpoint directory, for every family in :data:`e5v.tiny.FAMILIES`."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_checkpoint(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="session")
def mixed_images():
    """Random RGB images of different sizes and aspect ratios (different token counts per image)."""
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 90), (100, 30), (64, 64), (77, 51)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="session")
def model_dir(tiny_dirs):
    """The tiny llava-next-llama3 checkpoint (the family of royokong/e5-v) as a path string."""
    return str(tiny_dirs["llava-next-llama3"])


@pytest.fixture(scope="module")
def engine(model_dir):
    """An fp32 CPU engine on :func:`model_dir`."""
    from e5v import E5V

    return E5V.from_pretrained(model_dir, device="cpu", dtype="float32")


@pytest.fixture
def cli(capsys):
    """Run ``e5v ...`` in-process; returns (exit status, stdout, stderr). Never a traceback on stderr."""
    from e5v.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return run
