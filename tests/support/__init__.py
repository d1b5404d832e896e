"""Helpers shared by the tests (fixtures live in tests/conftest.py): ``from support import ROOT, TEXTS``,
``from support.training import write_csv``, ``from support import eval_data``.

pytest puts tests/ on ``sys.path`` (tests/conftest.py's folder), so ``support`` imports from every subfolder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: the repository's root and the package's sources
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"

#: texts of different lengths (different token counts), for batching and ordering tests
TEXTS = ["A dog.", "Two children are playing soccer on the grass in the sun today.", "hello",
         "A man is playing a guitar.", "The stock market fell today, and nobody expected it."]


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random RGB images of 24-69 px sides (different token counts)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (int(rng.integers(24, 70)), int(rng.integers(24, 70)), 3),
                                         dtype=np.uint8)) for _ in range(n)]
