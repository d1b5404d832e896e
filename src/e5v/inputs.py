"""Safe loading of images and texts, and the file readers behind ``e5v embed``.

Every rejection is an ``InputError(item, reason)`` so that a batch can report exactly which item failed
and why, instead of crashing deep inside a backbone's preprocessor.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (width*height), checked from the header
DEFAULT_MIN_SIDE = 2  # a 1x1 image carries no content and breaks some resizers
DEFAULT_MAX_ASPECT = 200  # extreme strips break the backbones' resizers

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_GLOB_CHARS = frozenset("*?[")


def describe(src, index: int | None = None) -> str:
    """A short human label for an item in error messages (the path when there is one)."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(src)
    if index is not None:
        return f"item {index}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return f"<{type(src).__name__}>"


# ----------------------------------------------------------------------------------------------- images


def load_image(
    src,
    *,
    item: str | None = None,
    max_pixels=DEFAULT_MAX_PIXELS,
    min_side=DEFAULT_MIN_SIDE,
    max_aspect=DEFAULT_MAX_ASPECT,
    allow_paths: bool = True,
    max_bytes: int | None = None,
) -> Image.Image:
    """Validate and decode one image into a fully loaded, detached 8-bit RGB image.

    Limits are checked from the header before any pixel is decoded, so a hostile file costs nothing.
    ``None`` disables a limit. A PIL image is converted on a copy; its current frame is used.
    """
    item = item if item is not None else describe(src)
    limits = (max_pixels, min_side, max_aspect)
    if isinstance(src, Image.Image):
        return _decode(src, item, limits, first_frame=False)
    if isinstance(src, (bytes, bytearray, memoryview)):
        size = memoryview(src).nbytes
        if size == 0:
            raise InputError(item, "empty image data (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise InputError(item, f"image data too large ({size} bytes > max_bytes {max_bytes})")
        return _open_and_decode(io.BytesIO(src), item, limits)
    if isinstance(src, (str, os.PathLike)):
        if not allow_paths:
            raise InputError(item, "local paths are not allowed; send the image bytes instead")
        return _load_path(os.fsdecode(src), item, limits, max_bytes)
    raise InputError(item, f"unsupported input type {type(src).__name__}; expected a path, bytes or a PIL image")


def _load_path(path: str, item: str, limits, max_bytes) -> Image.Image:
    if not path:
        raise InputError(item, "empty path")
    if "://" in path and not os.path.exists(path):
        raise InputError(item, "URLs are not supported; download the image first")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(item, "file not found") from None
    except OSError as e:
        raise InputError(item, f"cannot read file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(item, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise InputError(item, "not a regular file")
    if st.st_size == 0:
        raise InputError(item, "empty file (0 bytes)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputError(item, f"file too large ({st.st_size} bytes > max_bytes {max_bytes})")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(item, f"cannot read file ({e.strerror or e})") from None
    with f:
        return _open_and_decode(f, item, limits)


def _open_and_decode(fp, item: str, limits) -> Image.Image:
    # PIL warns (or raises, under -W error) on big images; our own limit is the one that decides.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise InputError(item, f"image too large ({e})") from None
        except Exception as e:  # PIL raises many kinds of errors on garbage headers
            raise InputError(item, f"not a recognised image file ({type(e).__name__})") from None
        with im:
            return _decode(im, item, limits, first_frame=True)


def _decode(im: Image.Image, item: str, limits, *, first_frame: bool) -> Image.Image:
    max_pixels, min_side, max_aspect = limits
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(item, f"image too large ({w}x{h} = {w * h} pixels > max_pixels {max_pixels})")
    if min(w, h) < max(min_side or 0, 1):
        raise InputError(item, f"image too small ({w}x{h}; smallest side must be >= {max(min_side or 0, 1)})")
    if max_aspect is not None and max(w, h) / min(w, h) > max_aspect:
        raise InputError(item, f"extreme aspect ratio ({w}x{h} > {max_aspect}:1)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if first_frame and getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
    except Image.DecompressionBombError as e:
        raise InputError(item, f"image too large ({e})") from None
    except Exception as e:  # never LOAD_TRUNCATED_IMAGES: a half image would embed silently
        raise InputError(item, f"truncated or corrupt image data ({e})") from None
    try:
        return _to_rgb(im)
    except Exception as e:
        raise InputError(item, f"unsupported image mode {im.mode} ({e})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB on a new image, keeping the caller's image untouched."""
    mode = im.mode
    if mode in _INT_GREY_MODES or mode == "F":
        grey = _scale_to_uint8(np.asarray(im), mode)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info):
        # Transparent pixels often hold black RGB; a white backdrop is what a viewer would show.
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # PIL has no La->RGBA path
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    out = im.convert("RGB")  # RGB copies; CMYK, YCbCr, L, 1, P, LAB, HSV convert
    if mode != "RGB":
        logger.debug("converted image from mode %s to RGB", mode)
    return out


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high bit-depth greyscale onto 0..255 by range, not by clipping raw values."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 16-bit data (I;16*, or 16-bit stored in 32-bit "I"): 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0  # float images conventionally hold 0..1
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))  # arbitrary range: stretch what is there
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ texts


def clean_text(text, *, item: str | None = None) -> str:
    """Reject non-strings and blank texts; return the text unchanged, since prompts must be byte-exact."""
    item = item if item is not None else "<text>"
    if not isinstance(text, str):
        raise InputError(item, f"expected text (str), got {type(text).__name__}")
    if not text.strip():
        raise InputError(item, "empty text")
    return text


# ---------------------------------------------------------------------------------------------- readers


@dataclass(frozen=True)
class Record:
    """One input of a batch file: an id plus a text, an image path, or both."""

    id: str
    text: str | None = None
    image: str | None = None
    meta: dict = field(default_factory=dict)


def _read_lines(path) -> list[str]:
    """Lines of a UTF-8 file without their terminators; a final newline adds no extra line."""
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
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{p}:line {line}", f"not valid UTF-8 (byte {e.start})") from None
    if not text:
        return []
    lines = text.split("\n")  # not splitlines(): \x0c, \u2028 ... may legitimately occur inside a text
    if lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _read_jsonl(path):
    """Yield (0-based line index, object, "path:line N") for the non-blank lines of a JSON-lines file."""
    p = os.fsdecode(path)
    for i, line in enumerate(_read_lines(p)):
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

    Blank lines of a plain file are kept as empty records so that the engine reports them by line id.
    """
    p = os.fsdecode(path)
    if p.lower().endswith(".jsonl"):
        out = []
        for i, obj, where in _read_jsonl(p):
            text = _require(obj, "text", where)
            meta = {k: v for k, v in obj.items() if k not in ("text", "id")}
            out.append(Record(id=_record_id(obj, i), text=text, meta=meta))
        return out
    return [Record(id=str(i), text=line) for i, line in enumerate(_read_lines(p))]


def _manifest_rows(p: str, texts: bool):
    """Yield (default id, row, "path:line N") for each data row of a .jsonl, .csv or .parquet manifest."""
    low = p.lower()
    if low.endswith(".jsonl"):
        yield from _read_jsonl(p)
    elif low.endswith(".csv"):
        rows = csv.DictReader(io.StringIO("\n".join(_read_lines(p)) + "\n", newline=""))
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


def read_manifest(path, *, texts: bool = False) -> list[Record]:
    """Records of a manifest: one row per item with an optional "id", an "image" (or "path", relative to the
    manifest) and any other fields as metadata; a ``.jsonl``, ``.csv`` or ``.parquet`` file, or a ``.txt`` list of
    image paths. With ``texts``, a row without an image and with a "text" is a text item."""
    p = os.fsdecode(path)
    base = Path(p).parent
    if p.lower().endswith(MANIFEST_SUFFIXES):
        return [_manifest_record(n, row, where, base, texts) for n, row, where in _manifest_rows(p, texts)]
    return [Record(id=img, image=_resolve(base, img)) for img in (ln.strip() for ln in _read_lines(p)) if img]


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
            return read_manifest(spec)
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
    for i, obj, where in _read_jsonl(p):
        img = _require(obj, "image", where)
        text = _require(obj, "text", where)
        meta = {k: v for k, v in obj.items() if k not in ("image", "text", "id")}
        out.append(Record(id=_record_id(obj, i), text=text, image=_resolve(base, img), meta=meta))
    return out
