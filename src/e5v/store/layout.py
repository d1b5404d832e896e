"""The index folder on disk: file names and the manifest.

::

    DIR/manifest.json            model, adapter, prompts, dim, dtype, committed partitions, counts, ann, pending job
    DIR/part-000000.npy          the partition's vectors, (n, dim), float32 or float16, memory-mappable
    DIR/part-000000.rows.jsonl   one row per vector: {"id", "kind", "image" | "text" | "tar", "meta"}
    DIR/part-000000.done.json    written last: the job it belongs to, its counts and its skipped items
    DIR/skipped.jsonl            every skipped item with its reason
    DIR/ann-hnsw-int8.faiss      optional approximate index over the first ``ann.count`` vectors

A partition is finished when its ``done.json`` exists and names the running job; it is part of the index once the
manifest lists it.  The manifest is the commit point and is replaced atomically, so a reader never sees half a
partition and a killed build resumes from the finished ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..parts import atomic_write_bytes

MANIFEST = "manifest.json"
FORMAT = "e5v-index"
VERSION = 1


def part_name(k: int) -> str:
    return f"part-{k:06d}"


def vectors_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.npy"


def rows_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.rows.jsonl"


def done_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.done.json"


def read_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder``, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an e5v index manifest")
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{path}: index format version {manifest.get('version')} is not supported "
                          f"(this e5v reads version {VERSION})")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def write_jsonl(path: Path, rows) -> None:
    """Rows as JSON lines, atomically (values JSON cannot hold, such as dates, are written as strings)."""
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode())


def read_tar_member(tar) -> bytes:
    """The bytes of an image inside a tar shard, from a row's ``tar`` (shard, data offset, size, member name)."""
    shard, offset, size, _ = tar
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
