"""Readers of the benchmark datasets in their standard on-disk layouts (shared/reference/E5V.md §6).

Each dataset lives in its own folder under the data root (``--data DIR``) and may come in one of two layouts:
the original release files, or a Hugging Face ``datasets`` folder written with ``save_to_disk`` from the
mirrors the official code loads (``royokong/flickr30k_test`` etc.).  Nothing is downloaded.  A missing or
malformed dataset raises :class:`DatasetError`, whose message says which files belong where.

Images are never decoded here: readers return paths (or the stored bytes of a ``datasets`` folder) behind a
:class:`Lazy` sequence, and the engine loads and validates each one when it is embedded.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import E5VError

log = logging.getLogger(__name__)

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
STS_YEARS = {  # SentEval's subsets per year (STS13 without SMT, as distributed)
    "sts12": ("STS12-en-test", ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"]),
    "sts13": ("STS13-en-test", ["FNWN", "headlines", "OnWN"]),
    "sts14": ("STS14-en-test", ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"]),
    "sts15": ("STS15-en-test", ["answers-forums", "answers-students", "belief", "headlines", "images"]),
    "sts16": ("STS16-en-test", ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"]),
}

#: Where each dataset's files go, quoted in every error about that dataset.
LAYOUTS = {
    "flickr30k": """DATA/flickr30k/ holds either
  (a) Karpathy split: DATA/flickr30k/dataset_flickr30k.json (from caption_datasets.zip) and the images in
      DATA/flickr30k/flickr30k-images/<filename>.jpg
  (b) a `datasets` folder: load_dataset('royokong/flickr30k_test').save_to_disk('DATA/flickr30k')
      (split 'test', columns 'image' and 'text' = list of captions)""",
    "coco": """DATA/coco/ holds either
  (a) Karpathy split: DATA/coco/dataset_coco.json (from caption_datasets.zip) and the images under
      DATA/coco/<filepath>/<filename> (DATA/coco/val2014/COCO_val2014_....jpg)
  (b) a `datasets` folder: load_dataset('royokong/coco_test').save_to_disk('DATA/coco')
      (split 'test', columns 'image' and 'text' = list of captions)""",
    "cirr": """DATA/cirr/ holds either
  (a) the CIRR release: DATA/cirr/captions/cap.rc2.{val,test1}.json, DATA/cirr/image_splits/split.rc2.{val,test1}.json
      (captions/ and image_splits/ may also sit in DATA/cirr/cirr/), and the NLVR2 images at the paths the split
      files give, relative to DATA/cirr/ (DATA/cirr/dev/..., DATA/cirr/test1/...)
  (b) `datasets` folders: load_dataset('royokong/cirr_val').save_to_disk('DATA/cirr/cirr_val'),
      load_dataset('royokong/cirr_test').save_to_disk('DATA/cirr/cirr_test'),
      load_dataset('royokong/cirr_imgs').save_to_disk('DATA/cirr/cirr_imgs')""",
    "fashioniq": """DATA/fashioniq/ holds either
  (a) the FashionIQ release: DATA/fashioniq/captions/cap.{dress,shirt,toptee}.val.json,
      DATA/fashioniq/image_splits/split.{dress,shirt,toptee}.val.json and DATA/fashioniq/images/<ASIN>.png
  (b) `datasets` folders: load_dataset('royokong/fashioniq_val').save_to_disk('DATA/fashioniq/fashioniq_val'),
      load_dataset('royokong/fashioniq_val_imgs').save_to_disk('DATA/fashioniq/fashioniq_val_imgs')""",
    "senteval": """DATA/senteval/ is SentEval's data/downstream folder (SentEval/data/downstream/download_dataset.sh, or
  SimCSE's senteval.tar): DATA/senteval/STS/STS1{2..6}-en-test/STS.input.<subset>.txt and STS.gs.<subset>.txt,
  DATA/senteval/STS/STSBenchmark/sts-test.csv, DATA/senteval/SICK/SICK_test_annotated.txt""",
}


class DatasetError(E5VError):
    """A benchmark dataset is missing or malformed; the message names the file and the expected layout."""

    def __init__(self, dataset: str, problem: str):
        self.dataset = dataset
        layout = LAYOUTS.get(dataset, "")
        super().__init__(f"{dataset}: {problem}" + (f"\nexpected layout:\n{layout}" if layout else ""))


# --------------------------------------------------------------------------------------------- containers
@dataclass
class Lazy(Sequence):
    """Items fetched on demand (images stay on disk until embedded); ``keys`` identify them for the cache."""

    keys: list[str]
    fetch: Callable[[int], Any]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.fetch(k) for k in range(*i.indices(len(self)))]
        return self.fetch(int(i))

    def take(self, indices: Sequence[int]) -> "Lazy":
        idx = [int(i) for i in indices]
        return Lazy([self.keys[i] for i in idx], lambda k: self.fetch(idx[k]))


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


@dataclass
class STSData:
    """Sentence pairs with gold scores, per subset (one subset for STS-B and SICK-R)."""

    name: str
    subsets: dict[str, tuple[list[str], list[str], np.ndarray]] = field(default_factory=dict)

    def limit(self, n: int | None) -> "STSData":
        if not n:
            return self
        return STSData(self.name, {k: (a[:n], b[:n], g[:n]) for k, (a, b, g) in self.subsets.items()})


# ----------------------------------------------------------------------------------------------- helpers
def _load_json(dataset: str, path: Path):
    if not path.is_file():
        raise DatasetError(dataset, f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(dataset, f"{path} is not valid JSON ({exc})") from None


def _field(dataset: str, where: str, obj, key: str, kind):
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(dataset, f"{where}: missing field {key!r}")
    val = obj[key]
    if not isinstance(val, kind):
        raise DatasetError(dataset, f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}, "
                                    f"not {type(val).__name__}")
    return val


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_saved(dataset: str, path: Path, split: str, columns: Sequence[str], images: Sequence[str] = ()):
    """A ``save_to_disk`` folder (a DatasetDict with ``split``, or a single Dataset), image columns left as
    stored bytes, after checking that ``columns`` exist."""
    if not is_saved_dataset(path):
        raise DatasetError(dataset, f"{path} is not a `datasets` folder written by save_to_disk "
                                    "(no dataset_dict.json or state.json)")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, ValueError, ArrowInvalid ...)
        raise DatasetError(dataset, f"cannot load the `datasets` folder {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(dataset, f"{path} has splits {sorted(ds)}, but the benchmark needs split {split!r}")
        ds = ds[split]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DatasetError(dataset, f"{path} lacks column(s) {missing}; it has {ds.column_names}")
    for col in images:
        ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds


def _hf_images(ds, column: str, rows: Sequence[int] | None = None) -> Lazy:
    """Stored image bytes (or path) of a column, fetched one row at a time."""
    rows = list(range(len(ds))) if rows is None else list(rows)

    def fetch(k):
        cell = ds[rows[k]][column]
        if isinstance(cell, dict):
            return cell.get("bytes") or cell.get("path")
        return cell

    return Lazy([f"{ds._fingerprint}/{column}/{r}" for r in rows], fetch)


def _paths(paths: list[str]) -> Lazy:
    return Lazy(list(paths), lambda k: paths[k])


def _column(ds, name: str) -> list:
    return list(ds[name])


# ------------------------------------------------------------------------------------ Flickr30K and COCO
def read_retrieval(root: Path, dataset: str, max_captions: int | None = None) -> RetrievalData:
    """Flickr30K or COCO test split.  ``max_captions``: keep the first k captions per image (COCO: 5)."""
    root = Path(root)
    karpathy = root / f"dataset_{dataset}.json"
    if karpathy.is_file():
        return _read_karpathy(root, karpathy, dataset, max_captions)
    if is_saved_dataset(root):
        ds = load_saved(dataset, root, "test", ["image", "text"], images=["image"])
        texts = _column(ds, "text")
        caps, owner = [], []
        for i, t in enumerate(texts):
            t = [t] if isinstance(t, str) else t
            if not isinstance(t, list) or not t or not all(isinstance(c, str) for c in t):
                raise DatasetError(dataset, f"{root} row {i}: 'text' should be a non-empty list of captions")
            t = t[:max_captions] if max_captions else t
            caps += t
            owner += [i] * len(t)
        return RetrievalData(dataset, [str(i) for i in range(len(ds))], _hf_images(ds, "image"), caps,
                             np.asarray(owner, np.int64))
    if not root.is_dir():
        raise DatasetError(dataset, f"folder {root} not found")
    raise DatasetError(dataset, f"{root} holds neither {karpathy.name} nor a `datasets` folder")


def _read_karpathy(root: Path, path: Path, dataset: str, max_captions: int | None) -> RetrievalData:
    data = _load_json(dataset, path)
    entries = _field(dataset, str(path), data, "images", list)
    image_dir = root / "flickr30k-images" if dataset == "flickr30k" else root
    if dataset == "flickr30k" and not image_dir.is_dir():
        raise DatasetError(dataset, f"image folder {image_dir} not found")
    ids, paths, caps, owner = [], [], [], []
    for n, e in enumerate(entries):
        where = f"{path} images[{n}]"
        if _field(dataset, where, e, "split", str) != "test":
            continue
        name = _field(dataset, where, e, "filename", str)
        rel = Path(_field(dataset, where, e, "filepath", str)) / name if dataset == "coco" else Path(name)
        sents = _field(dataset, where, e, "sentences", list)
        raws = [_field(dataset, f"{where} sentences[{j}]", s, "raw", str) for j, s in enumerate(sents)]
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
    return RetrievalData(dataset, ids, _paths(paths), caps, np.asarray(owner, np.int64))


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


def _captions_and_split(dataset: str, cap_path: Path, split_path: Path, kind: type):
    """The query records (a JSON list) and the split file: CIRR maps image names to relative paths (a dict of
    str), FashionIQ lists image names (a list of str)."""
    records, split = _load_json(dataset, cap_path), _load_json(dataset, split_path)
    if not isinstance(records, list):
        raise DatasetError(dataset, f"{cap_path} should hold a JSON list of query records")
    values = split.values() if isinstance(split, dict) else split
    if not isinstance(split, kind) or not all(isinstance(v, str) for v in values):
        what = "map image names to relative paths" if kind is dict else "hold a JSON list of image names (ASINs)"
        raise DatasetError(dataset, f"{split_path} should {what}")
    return records, split


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
        ref = _field("cirr", where, r, "reference", str)
        target = _field("cirr", where, r, "target_hard", str) if split != "test1" else None
        img_set = r.get("img_set")
        members = _field("cirr", f"{where} img_set", img_set, "members", list) if img_set is not None else None
        for name in [ref] + ([target] if target else []) + list(members or []):
            if name not in index:
                raise DatasetError("cirr", f"{where}: image {name!r} is not listed in {split_path}")
        queries.append(CIRQuery(str(_field("cirr", where, r, "pairid", (int, str))), ref,
                                _field("cirr", where, r, "caption", str), target, members))
    return CIRData(f"cirr-{split}", queries, _paths([paths[index[q.reference]] for q in queries]), gallery_ids,
                   _paths(paths))


def _read_cirr_saved(qpath: Path, gpath: Path, split: str) -> CIRData:
    hf_split = "val" if split == "val" else "test"
    cols = ["candidate", "caption", "candidate_id", "pairid"] + (["target_id"] if split == "val" else [])
    qds = load_saved("cirr", qpath, hf_split, cols, images=["candidate"])
    gds = load_saved("cirr", gpath, hf_split, ["id", "img"], images=["img"])
    gallery_ids = [str(g) for g in _column(gds, "id")]
    known = set(gallery_ids)
    refs, caps, pids = _column(qds, "candidate_id"), _column(qds, "caption"), _column(qds, "pairid")
    targets = _column(qds, "target_id") if split == "val" else [None] * len(refs)
    members = _column(qds, "img_set") if "img_set" in qds.column_names else [None] * len(refs)
    queries = []
    for n, (ref, cap, pid, tgt, mem) in enumerate(zip(refs, caps, pids, targets, members)):
        mem = mem.get("members") if isinstance(mem, dict) else mem
        for name in [ref] + ([tgt] if tgt is not None else []):
            if str(name) not in known:
                raise DatasetError("cirr", f"{qpath} row {n}: image {name!r} is not in {gpath}")
        queries.append(CIRQuery(str(pid), str(ref), cap, None if tgt is None else str(tgt),
                                [str(m) for m in mem] if mem else None))
    return CIRData(f"cirr-{split}", queries, _hf_images(qds, "candidate"), gallery_ids, _hf_images(gds, "img"))


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
        ref = _field("fashioniq", where, r, "candidate", str)
        tgt = _field("fashioniq", where, r, "target", str)
        caps = _field("fashioniq", where, r, "captions", list)
        if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
            raise DatasetError("fashioniq", f"{where}: 'captions' should be a list of 2 strings")
        if tgt not in known:
            raise DatasetError("fashioniq", f"{where}: target {tgt!r} is not listed in {split_path}")
        queries.append(CIRQuery(str(n), ref, caps, tgt))

    def image(name):
        return str(root / "images" / f"{name}.png")

    return CIRData(f"fashioniq-{category}", queries, _paths([image(q.reference) for q in queries]), gallery_ids,
                   _paths([image(g) for g in gallery_ids]))


def _read_fashioniq_saved(root: Path, category: str) -> CIRData:
    qpath, gpath = root / "fashioniq_val", root / "fashioniq_val_imgs"
    qds = load_saved("fashioniq", qpath, "val", ["category", "candidate", "caption", "target_id"], images=["candidate"])
    gds = load_saved("fashioniq", gpath, "val", ["category", "id", "img"], images=["img"])
    qrows = [i for i, c in enumerate(_column(qds, "category")) if c == category]
    grows = [i for i, c in enumerate(_column(gds, "category")) if c == category]
    if not qrows:
        raise DatasetError("fashioniq", f"{qpath} has no query of category {category!r}")
    gids_all = _column(gds, "id")
    gallery_ids = [str(gids_all[i]) for i in grows]
    known = set(gallery_ids)
    caps_all, tgts_all = _column(qds, "caption"), _column(qds, "target_id")
    refs_all = _column(qds, "candidate_id") if "candidate_id" in qds.column_names else [None] * len(qds)
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
    return CIRData(f"fashioniq-{category}", queries, _hf_images(qds, "candidate", qrows), gallery_ids,
                   _hf_images(gds, "img", grows))


# -------------------------------------------------------------------------------------------------- STS
def _lines(dataset: str, path: Path, *, rows: bool = False) -> list[str]:
    r"""The lines of a SentEval file as SentEval reads it (text mode, so "\r\n" and "\r" arrive as "\n"):
    STS12-16 with ``read().splitlines()``; STS-B and SICK (``rows``) line by line, on "\n" only, where U+0085,
    U+2028, "\x0b" and "\x0c" are ordinary characters inside a row."""
    if not path.is_file():
        raise DatasetError(dataset, f"missing file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(dataset, f"{path} is not valid UTF-8 ({exc})") from None
    if not rows:
        return text.splitlines()
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines  # a final newline ends the last row, it starts none


def _words(s: str) -> str:
    """SentEval tokenises by whitespace and the batcher joins the words with single spaces."""
    return " ".join(s.split())


def _score(dataset: str, where: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise DatasetError(dataset, f"{where}: gold score {text!r} is not a number") from None
    if not np.isfinite(v):
        raise DatasetError(dataset, f"{where}: gold score {text!r} is not finite")
    return v


def _columns(path: Path, lines: list[str], first: int, cols: tuple[int, int, int], names: str):
    """Sentence pairs and gold scores from tab-separated ``lines`` (line numbers start at ``first``), columns
    ``cols`` = (sentence A, sentence B, score), as SentEval reads STS-B and SICK."""
    a, b, g = [], [], []
    for n, line in enumerate(lines, start=first):
        fields = line.strip().split("\t")
        if len(fields) <= max(cols):
            raise DatasetError("senteval", f"{path}:line {n}: expected at least {max(cols) + 1} tab-separated "
                                           f"columns ({names}), found {len(fields)}")
        a.append(_words(fields[cols[0]]))
        b.append(_words(fields[cols[1]]))
        g.append(_score("senteval", f"{path}:line {n}", fields[cols[2]]))
    return a, b, np.asarray(g)


def read_sts(root: Path, task: str) -> STSData:
    """``sts12``..``sts16`` (every subset of the year), ``sts-b`` (test) or ``sick-r`` (test), SentEval files."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("senteval", f"folder {root} not found")
    out = STSData(task)
    if task in STS_YEARS:
        folder, subsets = STS_YEARS[task]
        for sub in subsets:
            inp, gs = root / "STS" / folder / f"STS.input.{sub}.txt", root / "STS" / folder / f"STS.gs.{sub}.txt"
            pairs, gold = _lines("senteval", inp), _lines("senteval", gs)
            if len(pairs) != len(gold):
                raise DatasetError("senteval", f"{inp} has {len(pairs)} lines but {gs} has {len(gold)}")
            a, b, g = [], [], []
            for n, (line, score) in enumerate(zip(pairs, gold)):
                if score == "":
                    continue  # SentEval skips pairs without a gold score
                cols = line.split("\t")
                if len(cols) != 2:
                    raise DatasetError("senteval", f"{inp}:line {n + 1}: expected 2 tab-separated sentences, "
                                                   f"found {len(cols)} field(s)")
                a.append(_words(cols[0]))
                b.append(_words(cols[1]))
                g.append(_score("senteval", f"{gs}:line {n + 1}", score))
            out.subsets[sub] = (a, b, np.asarray(g))
    elif task == "sts-b":  # genre, file, year, id, score, sentence1, sentence2 (sometimes more columns)
        path = root / "STS" / "STSBenchmark" / "sts-test.csv"
        out.subsets["test"] = _columns(path, _lines("senteval", path, rows=True), 1, (5, 6, 4),
                                       "genre, file, year, id, score, sentence1, sentence2")
    elif task == "sick-r":  # a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ...
        path = root / "SICK" / "SICK_test_annotated.txt"
        out.subsets["test"] = _columns(path, _lines("senteval", path, rows=True)[1:], 2, (1, 2, 3),
                                       "pair_ID, sentence_A, sentence_B, relatedness_score")
    else:
        raise DatasetError("senteval", f"unknown STS task {task!r}")
    if not any(len(s[0]) for s in out.subsets.values()):
        raise DatasetError("senteval", f"{task}: no sentence pairs found")
    return out
