"""What an index is built from: a folder of images, a glob, a manifest (JSONL, CSV, parquet) of images and texts,
or WebDataset tar shards. Everything becomes a list of :class:`Entry` in a reproducible order.

Ids: a manifest's own ids, a shard sample's key, and for image files listed from a folder, a glob or a list, the
path relative to the folder (or as the glob matched it).  Files added to an existing index get ids relative to
the index's root (the folder it was built from) when they lie inside it, and their absolute path otherwise, so
that two folders' ``IMG_0001.jpg`` never share an id."""
from __future__ import annotations

import dataclasses
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
from ..readers import IMAGE_EXTENSIONS, MANIFEST_SUFFIXES, list_images, read_image_manifest
from .layout import read_tar_member

if TYPE_CHECKING:
    from ..items import Item

_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Entry:
    """One item to index. ``tar`` = (shard, data offset, size, member name) for an image inside a tar shard;
    ``problem`` is a reason to skip it without embedding (a duplicate id, an unusable shard sample); ``stat``
    is an image file's (size, mtime in ns) when it was listed, to notice a file changed since; ``source`` is the
    file a text came from (manifest or shard), to tell a changed text from another source's text of the same id."""

    id: str
    text: str | None = None
    image: str | None = None
    tar: tuple[str, int, int, str] | None = None
    meta: dict = field(default_factory=dict)
    problem: str | None = None
    stat: tuple[int, int] | None = None
    source: str | None = None

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
        from ..items import Item

        if self.tar:
            return Item(image=read_tar_member(self.tar), name=self.label)
        return Item(text=self.text, image=self.image, name=self.label)

    def row(self) -> dict:
        """The stored row of an indexed item (see :mod:`e5v.store.layout`)."""
        row = {"id": self.id, "kind": self.kind}
        if self.kind == "text":
            row["text"] = self.text
            if self.source is not None:
                row["source"] = self.source
        else:
            row["image"] = self.image
            if self.tar:
                row["tar"] = list(self.tar)
        if self.stat is not None:
            row["stat"] = list(self.stat)
        row["meta"] = self.meta
        return row

    def origin(self):
        """Where an image comes from (its file, or its shard and member), whatever its id; None for a text."""
        return _origin(self.tar, self.image)

    @classmethod
    def from_row(cls, row: dict) -> Entry:
        """The item of a stored row (to embed it again)."""
        return cls(id=row["id"], text=row.get("text"), image=row.get("image"),
                   tar=tuple(row["tar"]) if row.get("tar") else None, meta=row.get("meta") or {},
                   stat=tuple(row["stat"]) if row.get("stat") else None, source=row.get("source"))


def row_origin(row: dict):
    """:meth:`Entry.origin` of a stored row."""
    return _origin(row.get("tar"), row.get("image"))


def _origin(tar, image):
    if tar:
        return ("tar", tar[0], tar[3])
    return None if image is None else ("file", image)


def same_item(row: dict, e: Entry) -> bool:
    """Whether ``e``, whose id the index holds as ``row``, is that item (perhaps changed) rather than another one:
    an image from the same file or shard member; a text with the same words, or from the same source (rows written
    before sources were recorded have none, and count as the same)."""
    if e.kind == "image" or row["kind"] == "image":
        return row_origin(row) == e.origin()
    return row.get("text") == e.text or row.get("source") in (None, e.source)


def row_changed(row: dict, e: Entry) -> bool:
    """Whether the item ``e`` differs from what was embedded as ``row`` (an old row without a recorded stat
    counts as unchanged)."""
    if e.kind != row["kind"]:
        return True
    if e.kind == "text":
        return e.text != row.get("text")
    if e.tar:
        return list(e.tar) != list(row.get("tar") or [])
    return row.get("stat") is not None and e.stat is not None and list(e.stat) != list(row["stat"])


def file_stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def file_id(path: str, root: str | None) -> str:
    """The id of an image file added to an index: relative to the index's root when inside it, else absolute."""
    if root:
        rel = os.path.relpath(path, root)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep) and not os.path.isabs(rel):
            return Path(rel).as_posix()
    return path


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
        return Entry(id=key, text=text, meta=meta, source=shard)
    return Entry(id=key, problem=f"{where}: sample has no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                                 f"and no .txt (has {', '.join(sorted(parts))})")


def read_source(spec: str, *, rebase: bool = False, root: str | None = None) -> list[Entry]:
    """Entries of an index source (see the module docstring), in a reproducible order. Paths become absolute.
    With ``rebase`` (adding to an index), ids of listed image files come from :func:`file_id` with ``root``.

    A second item with an id already seen is kept as an entry with a problem, so that it is reported."""
    spec = os.fsdecode(spec)
    shards = _tar_shards(spec)
    if shards is not None:
        entries = [e for shard in shards for e in read_shard(shard)]
    else:
        listed = not (os.path.isfile(spec) and spec.lower().endswith(MANIFEST_SUFFIXES))
        records = list_images(spec) if listed else read_image_manifest(spec, texts=True)
        entries = []
        for r in records:
            image = None if r.image is None else os.path.abspath(r.image)
            rid = file_id(image, root) if listed and rebase else r.id
            entries.append(Entry(id=rid, text=r.text, image=image, meta=r.meta,
                                 stat=None if image is None else file_stat(image),
                                 source=os.path.abspath(spec) if image is None else None))
    seen: dict[str, int] = {}
    out = []
    for n, e in enumerate(entries):
        if e.problem is None and e.id in seen:
            e = dataclasses.replace(e, problem=f"duplicate id (first at item {seen[e.id]} of the source)")
        elif e.problem is None:
            seen[e.id] = n
        out.append(e)
    return out
