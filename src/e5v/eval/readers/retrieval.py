"""Flickr30K and COCO test: images with their captions, from the Karpathy split files or a ``datasets``
folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import DatasetError, Lazy, column, is_saved_dataset, lazy_paths, load_json, load_saved, require_field, \
    saved_images


@dataclass
class RetrievalData:
    """Images with their captions (Flickr30K, COCO test): caption ``c`` describes image ``caption_image[c]``."""

    name: str
    image_ids: list[str]
    images: Lazy
    captions: list[str]
    caption_image: np.ndarray

    def limit(self, n: int | None) -> "RetrievalData":
        if not n or n >= len(self.image_ids):
            return self
        keep = self.caption_image < n
        return RetrievalData(self.name, self.image_ids[:n], self.images.take(range(n)),
                             [c for c, k in zip(self.captions, keep) if k], self.caption_image[keep])


def read_retrieval(root: Path, dataset: str, max_captions: int | None = None) -> RetrievalData:
    """Flickr30K or COCO test split.  ``max_captions``: keep the first k captions per image (COCO: 5)."""
    root = Path(root)
    karpathy = root / f"dataset_{dataset}.json"
    if karpathy.is_file():
        return _read_karpathy(root, karpathy, dataset, max_captions)
    if is_saved_dataset(root):
        return _read_saved(root, dataset, max_captions)
    if not root.is_dir():
        raise DatasetError(dataset, f"folder {root} not found")
    raise DatasetError(dataset, f"{root} holds neither {karpathy.name} nor a `datasets` folder")


def _read_karpathy(root: Path, path: Path, dataset: str, max_captions: int | None) -> RetrievalData:
    data = load_json(dataset, path)
    entries = require_field(dataset, str(path), data, "images", list)
    image_dir = root / "flickr30k-images" if dataset == "flickr30k" else root
    if dataset == "flickr30k" and not image_dir.is_dir():
        raise DatasetError(dataset, f"image folder {image_dir} not found")
    ids, paths, caps, owner = [], [], [], []
    for n, e in enumerate(entries):
        where = f"{path} images[{n}]"
        if require_field(dataset, where, e, "split", str) != "test":
            continue
        name = require_field(dataset, where, e, "filename", str)
        rel = Path(require_field(dataset, where, e, "filepath", str)) / name if dataset == "coco" else Path(name)
        sents = require_field(dataset, where, e, "sentences", list)
        raws = [require_field(dataset, f"{where} sentences[{j}]", s, "raw", str) for j, s in enumerate(sents)]
        if not raws:
            raise DatasetError(dataset, f"{where}: no sentences")
        raws = raws[:max_captions] if max_captions else raws
        caps += raws
        owner += [len(ids)] * len(raws)
        ids.append(str(e.get("imgid", name)))
        paths.append(str(image_dir / rel))
    if not ids:
        raise DatasetError(dataset, f"{path} has no image with split 'test'")
    if dataset == "coco":
        folders = {Path(p).parent for p in paths}
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise DatasetError(dataset, f"image folder(s) {', '.join(sorted(missing))} not found")
    return RetrievalData(dataset, ids, lazy_paths(paths), caps, np.asarray(owner, np.int64))


def _read_saved(root: Path, dataset: str, max_captions: int | None) -> RetrievalData:
    ds = load_saved(dataset, root, "test", ["image", "text"], images=["image"])
    caps, owner = [], []
    for i, t in enumerate(column(ds, "text")):
        t = [t] if isinstance(t, str) else t
        if not isinstance(t, list) or not t or not all(isinstance(c, str) for c in t):
            raise DatasetError(dataset, f"{root} row {i}: 'text' should be a non-empty list of captions")
        t = t[:max_captions] if max_captions else t
        caps += t
        owner += [i] * len(t)
    return RetrievalData(dataset, [str(i) for i in range(len(ds))], saved_images(ds, "image"), caps,
                         np.asarray(owner, np.int64))
