"""Composed retrieval (a reference image and a text against a gallery): CIRR and FashionIQ, from their release
files or ``datasets`` folders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import DatasetError, Lazy, column, lazy_paths, load_json, load_saved, require_field, saved_images

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


@dataclass
class CIRQuery:
    pairid: str
    reference: str                 # gallery id of the reference image
    text: Any                      # CIRR: the caption; FashionIQ: the two relative captions
    target: str | None = None      # None on a test split
    members: list[str] | None = None  # CIRR img_set (for Recall_subset), when the layout has it


@dataclass
class CIRData:
    """Composed-retrieval queries (reference image + text) against a gallery of images."""

    name: str
    queries: list[CIRQuery]
    query_images: Lazy             # the reference image of each query
    gallery_ids: list[str]
    gallery: Lazy

    def limit(self, n: int | None) -> "CIRData":
        """The first ``n`` queries, against the first ``n`` gallery images plus every image they need."""
        if not n or n >= len(self.queries):
            return self
        qs = self.queries[:n]
        need = {q.reference for q in qs} | {q.target for q in qs if q.target} | {m for q in qs for m in q.members or []}
        keep = [i for i, g in enumerate(self.gallery_ids) if i < n or g in need]
        return CIRData(self.name, qs, self.query_images.take(range(n)), [self.gallery_ids[i] for i in keep],
                       self.gallery.take(keep))


def _captions_and_split(dataset: str, cap_path: Path, split_path: Path, kind: type):
    """The query records (a JSON list) and the split file: CIRR maps image names to relative paths (a dict of
    str), FashionIQ lists image names (a list of str)."""
    records, split = load_json(dataset, cap_path), load_json(dataset, split_path)
    if not isinstance(records, list):
        raise DatasetError(dataset, f"{cap_path} should hold a JSON list of query records")
    values = split.values() if isinstance(split, dict) else split
    if not isinstance(split, kind) or not all(isinstance(v, str) for v in values):
        what = "map image names to relative paths" if kind is dict else "hold a JSON list of image names (ASINs)"
        raise DatasetError(dataset, f"{split_path} should {what}")
    return records, split


# ------------------------------------------------------------------------------------------------- CIRR
def read_cirr(root: Path, split: str = "val") -> CIRData:
    """CIRR ``val`` (with targets) or ``test1`` (``test``: no targets, for the evaluation server)."""
    root = Path(root)
    split = "test1" if split in ("test", "test1") else split
    for base in (root, root / "cirr"):
        if (base / "captions").is_dir():
            return _read_cirr_release(root, base, split)
    hf_q, hf_g = root / ("cirr_val" if split == "val" else "cirr_test"), root / "cirr_imgs"
    if hf_q.exists() or hf_g.exists():
        return _read_cirr_saved(hf_q, hf_g, split)
    if not root.is_dir():
        raise DatasetError("cirr", f"folder {root} not found")
    raise DatasetError("cirr", f"{root} holds neither captions/ (the release) nor cirr_val/, cirr_imgs/ (`datasets`)")


def _read_cirr_release(root: Path, base: Path, split: str) -> CIRData:
    cap_path = base / "captions" / f"cap.rc2.{split}.json"
    split_path = base / "image_splits" / f"split.rc2.{split}.json"
    records, names = _captions_and_split("cirr", cap_path, split_path, dict)
    gallery_ids = list(names)
    index = {g: i for i, g in enumerate(gallery_ids)}
    paths = [str(root / names[g]) for g in gallery_ids]
    queries = []
    for n, r in enumerate(records):
        where = f"{cap_path} [{n}]"
        ref = require_field("cirr", where, r, "reference", str)
        target = require_field("cirr", where, r, "target_hard", str) if split != "test1" else None
        img_set = r.get("img_set")
        members = require_field("cirr", f"{where} img_set", img_set, "members", list) if img_set is not None else None
        for name in [ref] + ([target] if target else []) + list(members or []):
            if name not in index:
                raise DatasetError("cirr", f"{where}: image {name!r} is not listed in {split_path}")
        queries.append(CIRQuery(str(require_field("cirr", where, r, "pairid", (int, str))), ref,
                                require_field("cirr", where, r, "caption", str), target, members))
    return CIRData(f"cirr-{split}", queries, lazy_paths([paths[index[q.reference]] for q in queries]), gallery_ids,
                   lazy_paths(paths))


def _read_cirr_saved(qpath: Path, gpath: Path, split: str) -> CIRData:
    hf_split = "val" if split == "val" else "test"
    cols = ["candidate", "caption", "candidate_id", "pairid"] + (["target_id"] if split == "val" else [])
    qds = load_saved("cirr", qpath, hf_split, cols, images=["candidate"])
    gds = load_saved("cirr", gpath, hf_split, ["id", "img"], images=["img"])
    gallery_ids = [str(g) for g in column(gds, "id")]
    known = set(gallery_ids)
    refs, caps, pids = column(qds, "candidate_id"), column(qds, "caption"), column(qds, "pairid")
    targets = column(qds, "target_id") if split == "val" else [None] * len(refs)
    members = column(qds, "img_set") if "img_set" in qds.column_names else [None] * len(refs)
    queries = []
    for n, (ref, cap, pid, tgt, mem) in enumerate(zip(refs, caps, pids, targets, members)):
        mem = mem.get("members") if isinstance(mem, dict) else mem
        for name in [ref] + ([tgt] if tgt is not None else []):
            if str(name) not in known:
                raise DatasetError("cirr", f"{qpath} row {n}: image {name!r} is not in {gpath}")
        queries.append(CIRQuery(str(pid), str(ref), cap, None if tgt is None else str(tgt),
                                [str(m) for m in mem] if mem else None))
    return CIRData(f"cirr-{split}", queries, saved_images(qds, "candidate"), gallery_ids, saved_images(gds, "img"))


# -------------------------------------------------------------------------------------------- FashionIQ
def read_fashioniq(root: Path, category: str) -> CIRData:
    """FashionIQ val of one category; the gallery is every val image of that category."""
    root = Path(root)
    if category not in FASHIONIQ_CATEGORIES:
        raise DatasetError("fashioniq", f"unknown category {category!r}; expected one of {FASHIONIQ_CATEGORIES}")
    if (root / "captions").is_dir():
        return _read_fashioniq_release(root, category)
    if (root / "fashioniq_val").exists() or (root / "fashioniq_val_imgs").exists():
        return _read_fashioniq_saved(root, category)
    if not root.is_dir():
        raise DatasetError("fashioniq", f"folder {root} not found")
    raise DatasetError("fashioniq", f"{root} holds neither captions/ (the release) nor fashioniq_val/ (`datasets`)")


def _read_fashioniq_release(root: Path, category: str) -> CIRData:
    cap_path = root / "captions" / f"cap.{category}.val.json"
    split_path = root / "image_splits" / f"split.{category}.val.json"
    records, gallery_ids = _captions_and_split("fashioniq", cap_path, split_path, list)
    if not (root / "images").is_dir():
        raise DatasetError("fashioniq", f"image folder {root / 'images'} not found")
    known = set(gallery_ids)
    queries = []
    for n, r in enumerate(records):
        where = f"{cap_path} [{n}]"
        ref = require_field("fashioniq", where, r, "candidate", str)
        tgt = require_field("fashioniq", where, r, "target", str)
        caps = require_field("fashioniq", where, r, "captions", list)
        if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
            raise DatasetError("fashioniq", f"{where}: 'captions' should be a list of 2 strings")
        if tgt not in known:
            raise DatasetError("fashioniq", f"{where}: target {tgt!r} is not listed in {split_path}")
        queries.append(CIRQuery(str(n), ref, caps, tgt))

    def image(name):
        return str(root / "images" / f"{name}.png")

    return CIRData(f"fashioniq-{category}", queries, lazy_paths([image(q.reference) for q in queries]), gallery_ids,
                   lazy_paths([image(g) for g in gallery_ids]))


def _read_fashioniq_saved(root: Path, category: str) -> CIRData:
    qpath, gpath = root / "fashioniq_val", root / "fashioniq_val_imgs"
    qds = load_saved("fashioniq", qpath, "val", ["category", "candidate", "caption", "target_id"], images=["candidate"])
    gds = load_saved("fashioniq", gpath, "val", ["category", "id", "img"], images=["img"])
    qrows = [i for i, c in enumerate(column(qds, "category")) if c == category]
    grows = [i for i, c in enumerate(column(gds, "category")) if c == category]
    if not qrows:
        raise DatasetError("fashioniq", f"{qpath} has no query of category {category!r}")
    gids_all = column(gds, "id")
    gallery_ids = [str(gids_all[i]) for i in grows]
    known = set(gallery_ids)
    caps_all, tgts_all = column(qds, "caption"), column(qds, "target_id")
    refs_all = column(qds, "candidate_id") if "candidate_id" in qds.column_names else [None] * len(qds)
    queries = []
    for i in qrows:
        caps = caps_all[i]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise DatasetError("fashioniq", f"{qpath} row {i}: 'caption' should be a list of strings")
        if str(tgts_all[i]) not in known:
            raise DatasetError("fashioniq", f"{qpath} row {i}: target {tgts_all[i]!r} is not a {category} image "
                                            f"in {gpath}")
        queries.append(CIRQuery(str(i), str(refs_all[i]) if refs_all[i] is not None else f"row{i}", caps,
                                str(tgts_all[i])))
    return CIRData(f"fashioniq-{category}", queries, saved_images(qds, "candidate", qrows), gallery_ids,
                   saved_images(gds, "img", grows))
