"""The batch-file readers behind ``e5v embed``, ``e5v index`` and training: texts, image-text pairs, image
folders, globs and manifests become :class:`Record` lists.

A bad file or row is an ``InputError`` that names it (``path:line N``); the images themselves are checked when
they are loaded (:func:`e5v.images.load_image`).
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Record:
    """One input of a batch file: an id plus a text, an image path, or both."""

    id: str
    text: str | None = None
    image: str | None = None
    meta: dict = field(default_factory=dict)


def read_lines(path, errors: str = "strict") -> list[str]:
    """Lines of a UTF-8 file without their terminators; a final newline adds no extra line.
    ``errors="surrogateescape"`` keeps bytes that are not UTF-8 as lone surrogates instead of refusing the file."""
    p = os.fsdecode(path)
    if os.path.isdir(p):
        raise InputError(p, "is a directory, not a file")
    try:
        data = Path(p).read_bytes()
    except FileNotFoundError:
        raise InputError(p, "file not found") from None
    except OSError as e:
        raise InputError(p, f"cannot read file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig", errors)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{p}:line {line}", f"not valid UTF-8 (byte {e.start})") from None
    if not text:
        return []
    lines = text.split("\n")  # not splitlines(): \x0c, \u2028 ... may legitimately occur inside a text
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_jsonl(path):
    """Yield (0-based line index, object, "path:line N") for the non-blank lines of a JSON-lines file."""
    p = os.fsdecode(path)
    for i, line in enumerate(read_lines(p)):
        if not line.strip():
            continue
        where = f"{p}:line {i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(where, f"malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(where, f"expected a JSON object, got {type(obj).__name__}")
        yield i, obj, where


def _require(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise InputError(where, f'missing required field "{key}"')
    if not isinstance(obj[key], str):
        raise InputError(where, f'field "{key}" must be a string, got {type(obj[key]).__name__}')
    return obj[key]


def _record_id(obj: dict, default) -> str:
    v = obj.get("id")
    return str(default) if v is None or v == "" else str(v)


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else str(base / p)


def read_texts(path) -> list[Record]:
    """Texts from ``.jsonl`` (field "text", optional "id") or a plain file (one text per line).

    Blank lines of a plain file are not items; ids are line indices. A line that is not UTF-8 keeps its bytes
    as lone surrogates, so that the engine rejects that one item, not the whole file.
    """
    p = os.fsdecode(path)
    if p.lower().endswith(".jsonl"):
        out = []
        for i, obj, where in read_jsonl(p):
            text = _require(obj, "text", where)
            meta = {k: v for k, v in obj.items() if k not in ("text", "id")}
            out.append(Record(id=_record_id(obj, i), text=text, meta=meta))
        return out
    return [Record(id=str(i), text=line) for i, line in enumerate(read_lines(p, "surrogateescape")) if line.strip()]


def _manifest_rows(p: str, texts: bool):
    """Yield (default id, row, "path:line N") for each data row of a .jsonl, .csv or .parquet manifest."""
    low = p.lower()
    if low.endswith(".jsonl"):
        yield from read_jsonl(p)
    elif low.endswith(".csv"):
        rows = csv.DictReader(io.StringIO("\n".join(read_lines(p)) + "\n", newline=""))
        if not {"image", "path", *(["text"] if texts else [])} & set(rows.fieldnames or []):
            raise InputError(p, 'CSV header needs an "image" or "path" column' + (' or a "text" one' if texts else ""))
        for n, row in enumerate(rows):
            yield n, {k: v for k, v in row.items() if k is not None}, f"{p}:line {rows.line_num}"
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except FileNotFoundError:
            raise InputError(p, "file not found") from None
        except (OSError, pa.ArrowException) as e:
            raise InputError(p, f"not a readable parquet file ({e})") from None
        for n, row in enumerate(table.to_pylist()):
            yield n, row, f"{p}:row {n}"


def _manifest_record(n: int, row: dict, where: str, base: Path, texts: bool) -> Record:
    key = next((k for k in ("image", "path") if row.get(k) not in (None, "")), None)
    if key is None and texts and row.get("text") not in (None, ""):
        text = _require(row, "text", where)
        meta = {k: v for k, v in row.items() if k not in ("text", "image", "path", "id")}
        return Record(id=_record_id(row, n), text=text, meta=meta)
    if key is None:
        field_ = next((k for k in ("image", "path") if k in row), None)
        if field_ is not None:
            raise InputError(where, f'empty "{field_}" value')
        raise InputError(where, 'missing required field "image" (or "path")' + (' or "text"' if texts else ""))
    img = _require(row, key, where).strip()
    meta = {k: v for k, v in row.items() if k not in (key, "id")}
    return Record(id=_record_id(row, img), image=_resolve(base, img), meta=meta)


MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")


def read_image_manifest(path, *, texts: bool = False) -> list[Record]:
    """Records of a manifest: one row per item with an optional "id", an "image" (or "path", relative to the
    manifest) and any other fields as metadata; a ``.jsonl``, ``.csv`` or ``.parquet`` file, or a ``.txt`` list of
    image paths. With ``texts``, a row without an image and with a "text" is a text item."""
    p = os.fsdecode(path)
    base = Path(p).parent
    if p.lower().endswith(MANIFEST_SUFFIXES):
        return [_manifest_record(n, row, where, base, texts) for n, row, where in _manifest_rows(p, texts)]
    return [Record(id=img, image=_resolve(base, img)) for img in (ln.strip() for ln in read_lines(p)) if img]


def list_images(spec: str) -> list[Record]:
    """Image records from an image file, a folder (recursive), a glob, or a .jsonl/.csv/.parquet/.txt manifest.

    Order is sorted so that runs are reproducible; existence of manifest entries is checked at load time.
    """
    spec = os.fsdecode(spec)
    if os.path.isdir(spec):
        root = Path(spec)
        rels = []
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    rels.append((Path(dirpath) / name).relative_to(root).as_posix())
        if not rels:
            raise InputError(spec, "no image files found")
        return [Record(id=r, image=str(root / r)) for r in sorted(rels)]
    if os.path.isfile(spec):
        if spec.lower().endswith((*MANIFEST_SUFFIXES, ".txt")):
            return read_image_manifest(spec)
        return [Record(id=spec, image=spec)]
    if _GLOB_CHARS & set(spec):
        # An explicit pattern is taken at its word: a non-image match is reported at load time, not dropped.
        paths = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
        if not paths:
            raise InputError(spec, "no image files found")
        return [Record(id=m, image=m) for m in paths]
    raise InputError(spec, "no such file or folder")


def read_pairs(path) -> list[Record]:
    """Image-text pairs from a ``.jsonl`` file with "image" (relative to the file) and "text"."""
    p = os.fsdecode(path)
    base = Path(p).parent
    out = []
    for i, obj, where in read_jsonl(p):
        img = _require(obj, "image", where)
        text = _require(obj, "text", where)
        meta = {k: v for k, v in obj.items() if k not in ("image", "text", "id")}
        out.append(Record(id=_record_id(obj, i), text=text, image=_resolve(base, img), meta=meta))
    return out
