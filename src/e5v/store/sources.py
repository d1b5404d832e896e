"""What an index is built from: a folder of images, a glob, a manifest (JSONL, CSV, parquet) of images and texts,
or WebDataset tar shards. Everything becomes a list of :class:`Entry` in a reproducible order."""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..inputs import IMAGE_EXTENSIONS, MANIFEST_SUFFIXES, list_images, read_manifest
from .layout import read_tar_member

if TYPE_CHECKING:
    from ..encoder import Item

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Entry:
    """One item to index. ``tar`` = (shard, data offset, size, member name) for an image inside a tar shard;
    ``problem`` is a reason to skip it without embedding (a duplicate id, an unusable shard sample)."""

    id: str
    text: str | None = None
    image: str | None = None
    tar: tuple[str, int, int, str] | None = None
    meta: dict = field(default_factory=dict)
    problem: str | None = None

    @property
    def kind(self) -> str:
        return "text" if self.image is None and self.tar is None else "image"

    @property
    def label(self) -> str:
        """How the item is named in messages and in skipped.jsonl."""
        if self.tar:
            return f"{self.tar[0]}:{self.tar[3]}"
        return self.image if self.image is not None else f"text id={self.id}"

    def key(self) -> list:
        """What identifies the item's content, for the job fingerprint."""
        return [self.id, self.text, self.image, list(self.tar) if self.tar else None, self.problem]

    def item(self) -> Item:
        """The engine's input (an image inside a shard is read here, one partition at a time)."""
        from ..encoder import Item

        if self.tar:
            return Item(image=read_tar_member(self.tar), name=self.label)
        return Item(text=self.text, image=self.image, name=self.label)

    def row(self) -> dict:
        """The stored row of an indexed item (see :mod:`e5v.store.layout`)."""
        row = {"id": self.id, "kind": self.kind}
        if self.kind == "text":
            row["text"] = self.text
        else:
            row["image"] = self.image
            if self.tar:
                row["tar"] = list(self.tar)
        row["meta"] = self.meta
        return row


def expand_braces(spec: str) -> list[str]:
    """``shard-{000..009}.tar`` -> the ten names (zero padding kept), as WebDataset writes shard lists."""
    ranges = [(m.group(1), m.group(2)) for m in _BRACES.finditer(spec)]
    if not ranges:
        return [spec]
    pieces = _BRACES.split(spec)[::3]
    choices = [[str(v).zfill(len(a)) for v in range(int(a), int(b) + 1)] for a, b in ranges]
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(pieces, [*combo, ""])))
    return out


def _is_tar(path: str) -> bool:
    return path.lower().endswith(".tar")


def _tar_shards(spec: str) -> list[str] | None:
    """The shard files named by ``spec`` (a .tar file, a glob or brace list of them, a folder holding only shards),
    or None when ``spec`` does not name shards."""
    if os.path.isdir(spec):
        names = sorted(str(p) for p in Path(spec).rglob("*") if p.is_file())
        has_images = any(Path(n).suffix.lower() in IMAGE_EXTENSIONS for n in names)
        shards = [n for n in names if _is_tar(n)]
        return shards if shards and not has_images else None
    paths = []
    for piece in expand_braces(spec):
        if set("*?[") & set(piece):
            paths.extend(sorted(m for m in glob.glob(piece, recursive=True) if os.path.isfile(m)))
        else:
            paths.append(piece)
    if paths and all(_is_tar(p) for p in paths):
        return paths
    return None


def read_shard(shard: str) -> list[Entry]:
    """Samples of one WebDataset shard: members grouped by key (the name up to the first dot of its base name).

    A sample with an image is an image item (its .txt becomes the "text" metadata, its .json the other fields);
    a sample with only a .txt is a text item. A damaged shard keeps the samples read before the damage."""
    shard = os.path.abspath(shard)
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    contents: dict[str, dict] = {}
    damage = []
    try:
        with tarfile.open(shard, "r:") as tf:
            for info in tf:
                folder, base = os.path.split(info.name)
                if not info.isfile() or base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key, ext = os.path.join(folder, stem), "." + ext.lower()
                samples.setdefault(key, {})[ext] = info
                if ext in (".txt", ".json"):
                    contents.setdefault(key, {})[ext] = _read_small(tf, info, ext)
    except FileNotFoundError:
        raise InputError(shard, "file not found") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        if not samples:
            raise InputError(shard, f"not a readable (uncompressed) tar shard ({exc})") from None
        damage.append(Entry(id=f"{shard}#damaged", problem=f"tar shard damaged after {len(samples)} samples ({exc})"))
    return [_sample_entry(shard, key, parts, contents.get(key, {})) for key, parts in samples.items()] + damage


def _read_small(tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str):
    data = tf.extractfile(info).read()
    try:
        text = data.decode("utf-8")
        return json.loads(text) if ext == ".json" else text
    except (UnicodeDecodeError, ValueError) as exc:
        return exc


def _sample_entry(shard: str, key: str, parts: dict, content: dict) -> Entry:
    where = f"{shard}:{key}"
    for ext in (".txt", ".json"):
        if isinstance(content.get(ext), Exception):
            return Entry(id=key, problem=f"{where}{ext}: not valid {'JSON' if ext == '.json' else 'UTF-8'} "
                                         f"({content[ext]})")
    meta = content.get(".json", {})
    if not isinstance(meta, dict):
        meta = {"json": meta}
    image = next((ti for ext, ti in parts.items() if ext in IMAGE_EXTENSIONS), None)
    text = content.get(".txt")
    if image is not None:
        if text is not None:
            meta = {**meta, "text": text}
        return Entry(id=key, tar=(shard, image.offset_data, image.size, image.name), meta=meta)
    if text is not None:
        return Entry(id=key, text=text, meta=meta)
    return Entry(id=key, problem=f"{where}: sample has no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                                 f"and no .txt (has {', '.join(sorted(parts))})")


def read_source(spec: str) -> list[Entry]:
    """Entries of an index source (see the module docstring), in a reproducible order. Paths become absolute.

    A second item with an id already seen is kept as an entry with a problem, so that it is reported."""
    spec = os.fsdecode(spec)
    shards = _tar_shards(spec)
    if shards is not None:
        entries = [e for shard in shards for e in read_shard(shard)]
    else:
        if os.path.isfile(spec) and spec.lower().endswith(MANIFEST_SUFFIXES):
            records = read_manifest(spec, texts=True)
        else:
            records = list_images(spec)
        entries = [Entry(id=r.id, text=r.text, image=None if r.image is None else os.path.abspath(r.image),
                         meta=r.meta) for r in records]
    seen: dict[str, int] = {}
    out = []
    for n, e in enumerate(entries):
        if e.problem is None and e.id in seen:
            e = Entry(id=e.id, text=e.text, image=e.image, tar=e.tar, meta=e.meta,
                      problem=f"duplicate id (first at item {seen[e.id]} of the source)")
        elif e.problem is None:
            seen[e.id] = n
        out.append(e)
    return out
