"""Training test helpers: toy triplets, the NLI CSV writer, the subprocess environment and the worker script."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from . import SRC

WORKER = str(Path(__file__).with_name("train_worker.py"))  # run as a script (python or torchrun)
TOPICS = ["dog", "cat", "car", "house", "tree", "river", "guitar", "soccer", "bread", "train", "snow", "phone"]


def triplet(i: int) -> tuple[str, str, str]:
    """Anchor, paraphrase, hard negative (same frame, another topic): a random model prefers the negative."""
    t, u = TOPICS[i % 12], TOPICS[(i * 5 + 3) % 12]
    u = TOPICS[(i + 1) % 12] if u == t else u
    return f"a {t} is here number {i}", f"there is a {t} {i}", f"a {u} is here number {i}"


def write_csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sent0", "sent1", "hard_neg"])
        w.writerows(rows)
    return path


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(SRC)}
