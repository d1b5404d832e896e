"""What every reader shares: :class:`DatasetError` with the expected layout of each dataset, the :class:`Lazy`
sequence that keeps images on disk until they are embedded, and the checks and loaders of JSON files and
``datasets`` folders."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ...errors import E5VError

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


def lazy_paths(paths: list[str]) -> Lazy:
    """Image files, each one its own key."""
    return Lazy(list(paths), lambda k: paths[k])


# --------------------------------------------------------------------------------------------- JSON files
def load_json(dataset: str, path: Path):
    if not path.is_file():
        raise DatasetError(dataset, f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(dataset, f"{path} is not valid JSON ({exc})") from None


def require_field(dataset: str, where: str, obj, key: str, kind):
    """``obj[key]``, which must exist and be a ``kind``; ``where`` names the record in the error."""
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(dataset, f"{where}: missing field {key!r}")
    val = obj[key]
    if not isinstance(val, kind):
        raise DatasetError(dataset, f"{where}: field {key!r} should be {getattr(kind, '__name__', kind)}, "
                                    f"not {type(val).__name__}")
    return val


# ----------------------------------------------------------------------------------- `datasets` folders
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


def saved_images(ds, column: str, rows: Sequence[int] | None = None) -> Lazy:
    """Stored image bytes (or path) of a column of a ``datasets`` folder, fetched one row at a time."""
    rows = list(range(len(ds))) if rows is None else list(rows)

    def fetch(k):
        cell = ds[rows[k]][column]
        if isinstance(cell, dict):
            return cell.get("bytes") or cell.get("path")
        return cell

    return Lazy([f"{ds._fingerprint}/{column}/{r}" for r in rows], fetch)


def column(ds, name: str) -> list:
    """A whole column of a ``datasets`` folder as a list."""
    return list(ds[name])
