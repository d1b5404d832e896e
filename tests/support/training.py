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


def image_rows(folder: Path, n: int, *, corrupt=(), corrupt_negatives=(), name: str = "sides.jsonl") -> Path:
    """``n`` JSONL rows with image sides in ``folder`` (images beside it, relative paths), every kind in turn:
    text -> image (+ text hard negative), image -> text, image+text -> image (+ image hard negative), a plain
    text triplet, a text with its own prompt -> image. Rows in ``corrupt`` have a query, rows in
    ``corrupt_negatives`` a hard negative, that points at a file that is no image."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t, u = TOPICS[i % 12], TOPICS[(i + 5) % 12]
        for k, shape in ((i, (24 + 8 * (i % 3), 32)), (i + 1000, (32, 40))):  # sizes differ: tile counts differ
            Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(folder / "img" / f"{k}.png")
        img, other = f"img/{i}.png", f"img/{i + 1000}.png"
        kind = i % 5
        if kind == 0:
            row = {"query": {"text": f"a photo of a {t} {i}"}, "positive": {"image": img},
                   "negative": {"text": f"a photo of a {u} {i}"}}
        elif kind == 1:
            row = {"query": {"image": img}, "positive": {"text": f"there is a {t} {i}"}}
        elif kind == 2:
            row = {"query": {"image": img, "text": f"turn it into a {t}"}, "positive": {"image": other},
                   "negative": {"image": str(folder / img)}}  # an absolute path
        elif kind == 3:
            row = {"query": {"text": triplet(i)[0]}, "positive": {"text": triplet(i)[1]},
                   "negative": {"text": triplet(i)[2]}}
        else:
            row = {"query": {"text": f"{t} {i}", "prompt": "Find a picture of: <sent>\nIn one word:"},
                   "positive": {"image": img, "prompt": "<image>\nWhat is shown, in one word:"}}
        if i in corrupt:
            row["query"] = {"image": "img/broken.png", "text": f"broken {i}"}
        if i in corrupt_negatives:
            row["negative"] = {"image": "img/broken.png"}
        rows.append(json.dumps(row))
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name
