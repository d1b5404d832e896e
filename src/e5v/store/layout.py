"""The index folder on disk: file names, the manifest, and the checks that a folder still matches it.

::

    DIR/manifest.json            the settings that made the vectors (model, adapter, weights, compute dtype, chat
                                 format, max length, tiles, alpha, prompts), their storage precision, dim, root,
                                 committed partitions (count, byte sizes, sha256 of both files), counts, ann,
                                 pending job
    DIR/part-000000.npy          the partition's vectors, (n, dim), float32 or float16, memory-mappable
    DIR/part-000000.rows.jsonl   one row per vector: {"id", "kind", "image" (+ "stat": size, mtime) | "text"
                                 (+ "source": the file it came from) | "tar", "meta"}
    DIR/part-000000.done.json    written last: the job it belongs to, its counts, its items' ids (to embed them
                                 again from the source), its files' sizes and checksums, its skipped items
    DIR/skipped.jsonl            every skipped item with its reason
    DIR/ann-hnsw-int8.faiss      optional approximate index over the first ``ann.count`` vectors
    DIR/codes/                   optional search codes (int8 or binary, maybe PCA-reduced): see
                                 :mod:`e5v.store.codes`

A partition is finished when its ``done.json`` exists and names the running job; it is part of the index once the
manifest lists it.  The manifest is the commit point and is replaced atomically, so a reader never sees half a
partition and a killed build resumes from the finished ones.  A partition rewritten later (``index repair``,
``index add --update``) gets new file names (``part-000000.r1.npy``), listed as its ``file``, so the switch to the
new files is again one manifest write.

Every open checks the cheap facts (types, the ``.npy`` header's shape and dtype, file sizes); a partition's
checksums are checked when its files are first read, and all of them by ``e5v index verify``.  Indexes written
before checksums were recorded have none until ``e5v index verify --write``: their shapes, sizes and row counts
are still checked.

Format version 1 called the storage precision ``dtype`` and recorded no compute settings beyond the model's
options; :func:`read_index_manifest` reads it as version 2 (``precision``), and the compute settings it lacks are
not compared when an index is extended.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError, IndexDamagedError
from ..parts import atomic_write_bytes
from ..vectors import PRECISIONS as CODE_PRECISIONS

MANIFEST = "manifest.json"
FORMAT = "e5v-index"
VERSION = 2
#: storage precisions of the vectors
PRECISIONS = {"float32": np.float32, "float16": np.float16}
ANN_HINT = "search with --exact, or rebuild it with `e5v index repair`"


def part_name(k: int) -> str:
    return f"part-{k:06d}"


def part_file(p: dict) -> str:
    """The file name stem of a partition record (its name unless it was rewritten)."""
    return p.get("file") or p["name"]


def revision(p: dict) -> int | None:
    """How often a partition was rewritten (0: never); None when its ``file`` is not one of its own names."""
    if "file" not in p:
        return 0
    m = re.fullmatch(re.escape(p["name"]) + r"\.r(\d+)", p["file"]) if isinstance(p["file"], str) else None
    return int(m.group(1)) if m else None


def vectors_path(folder: Path, stem: str) -> Path:
    return Path(folder) / f"{stem}.npy"


def rows_path(folder: Path, stem: str) -> Path:
    return Path(folder) / f"{stem}.rows.jsonl"


def done_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.done.json"


def digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_facts(folder: Path, stem: str) -> dict:
    """The byte sizes and sha256 of a partition's two files, as recorded in its manifest entry."""
    paths = {"vectors": vectors_path(folder, stem), "rows": rows_path(folder, stem)}
    return {"bytes": {k: p.stat().st_size for k, p in paths.items()},
            "sha256": {k: digest(p) for k, p in paths.items()}}


def read_index_manifest(folder: Path) -> dict | None:
    """The manifest of ``folder`` (its fields checked; version 1 read as version 2), or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexDamagedError(f"{path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an e5v index manifest")
    if manifest.get("version") == 1:  # its ``dtype`` was the storage precision
        manifest["precision"] = manifest.pop("dtype", None)
        manifest["version"] = VERSION
    if manifest.get("version") != VERSION:
        raise ConfigError(f"{path}: index format version {manifest.get('version')} is not supported "
                          f"(this e5v reads versions 1 and {VERSION})")
    problem = manifest_problem(manifest)
    if problem:
        raise IndexDamagedError(f"{path}: damaged manifest: {problem}")
    return manifest


def _int(v, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _hexes(v) -> bool:
    return isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("vectors", "rows"))


def _counts(v) -> bool:
    return isinstance(v, dict) and all(_int(v.get(k)) for k in ("image", "text"))


def manifest_problem(m: dict) -> str | None:
    """What is wrong with the fields of a manifest, or None (types and sums; files are not looked at)."""
    if not isinstance(m.get("model"), str) or not isinstance(m.get("prompt"), dict):
        return "model or prompt missing"
    if m.get("precision") not in PRECISIONS:
        return f"precision {m.get('precision')!r} is not one of {', '.join(PRECISIONS)}"
    parts = m.get("partitions")
    if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
        return "partitions is not a list of records"
    if not (m.get("dim") is None and not parts) and not _int(m.get("dim"), 1):
        return f"dim {m.get('dim')!r} is not a positive integer"
    for i, p in enumerate(parts):
        if p.get("name") != part_name(i):
            return f"partition {i} is named {p.get('name')!r}, expected {part_name(i)!r}"
        if not _int(p.get("count")) or not _int(p.get("items", 0)) or not _int(p.get("skipped", 0)):
            return f"{p['name']}: count, items or skipped is not a non-negative integer"
        if "file" in p and revision(p) is None:
            return f"{p['name']}: file {p['file']!r} is not a revision of this partition"
        if "sha256" in p and not (_hexes(p["sha256"]) and isinstance(p.get("bytes"), dict)
                                  and all(_int(p["bytes"].get(k)) for k in ("vectors", "rows"))):
            return f"{p['name']}: sha256 or bytes malformed"
        if "counts" in p and not (_counts(p["counts"]) and p["counts"]["image"] + p["counts"]["text"] == p["count"]):
            return f"{p['name']}: counts {p['counts']!r} do not match its count {p['count']}"
    counts = m.get("counts")
    if not _counts(counts):
        return "counts is not {image: n, text: n}"
    if not _int(m.get("count")) or m["count"] != sum(p["count"] for p in parts) or \
            m["count"] != counts["image"] + counts["text"]:
        return (f"count {m.get('count')!r} does not match the partitions ({sum(p['count'] for p in parts)}) "
                f"or the counts {counts}")
    ann = m.get("ann")
    if ann is not None and not (isinstance(ann, dict) and isinstance(ann.get("file"), str)
                                and re.fullmatch(r"ann-[\w.-]+\.faiss", ann["file"])
                                and _int(ann.get("count")) and ann["count"] <= m["count"]):
        return "ann entry malformed"
    codes = m.get("codes")
    if codes is not None and not (isinstance(codes, dict) and codes.get("precision") in CODE_PRECISIONS
                                  and (codes.get("dims") is None or _int(codes["dims"], 1))
                                  and isinstance(codes.get("parts"), list)
                                  and all(isinstance(r, dict) and isinstance(r.get("source"), str)
                                          and re.fullmatch(r"part-\d{6}(\.r\d+)?", r["source"])
                                          and _int(r.get("count")) and isinstance(r.get("sha256"), str)
                                          for r in codes["parts"])):
        return "codes entry malformed"
    if m.get("job") is not None and not isinstance(m["job"], dict):
        return "job is not a record"
    if not isinstance(m.get("sources", []), list):
        return "sources is not a list"
    return None


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def json_line(row) -> str:
    """One JSON line; names that UTF-8 cannot hold (undecodable file-name bytes, kept by Python as lone
    surrogates) are written as \\u escapes, which read back to the very same string."""
    line = json.dumps(row, ensure_ascii=False, default=str)
    try:
        line.encode()
    except UnicodeEncodeError:
        line = json.dumps(row, default=str)
    return line


def write_jsonl(path: Path, rows) -> None:
    """Rows as JSON lines, atomically (values JSON cannot hold, such as dates, are written as strings)."""
    lines = [json_line(r) for r in rows]
    atomic_write_bytes(path, ("\n".join(lines) + "\n" if lines else "").encode())


def read_tar_member(tar) -> bytes:
    """The bytes of an image inside a tar shard, from a row's ``tar`` (shard, data offset, size, member name)."""
    shard, offset, size, _ = tar
    with open(shard, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def parse_jsonl(path: Path, data: bytes) -> list[dict]:
    """JSON lines split on "\\n" only (a text may hold U+2028 and the like); a bad line names its place."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IndexDamagedError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError as exc:
            raise IndexDamagedError(f"{path}:line {n}: not a JSON row ({exc})") from None
    return out


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    return parse_jsonl(path, path.read_bytes())


def npy_header(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, byte offset of the data) from a .npy header, without reading the data."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f".npy format version {version}")
        shape, fortran, dtype = readers[version](fh)
        if fortran:
            raise ValueError("Fortran order")
        return shape, dtype, fh.tell()


def partition_problems(folder: Path, manifest: dict, i: int, *, checksums: bool = False) -> list[str]:
    """What is wrong with partition ``i`` of ``folder``: the cheap checks (shape, dtype, sizes), and with
    ``checksums`` the recorded sha256 of both files. Messages start with the file they are about."""
    p = manifest["partitions"][i]
    stem, count, dim = part_file(p), p["count"], manifest["dim"]
    vpath, rpath = vectors_path(folder, stem), rows_path(folder, stem)
    problems = []
    try:
        shape, dtype, offset = npy_header(vpath)
    except FileNotFoundError:
        problems.append(f"{vpath.name} is missing")
    except (OSError, ValueError, EOFError) as exc:
        problems.append(f"{vpath.name} is not a readable .npy file ({exc})")
    else:
        stored = np.dtype(PRECISIONS[manifest["precision"]])
        size, want = vpath.stat().st_size, offset + count * dim * stored.itemsize
        if shape != (count, dim):
            problems.append(f"{vpath.name} holds vectors of shape {shape}, the manifest says {(count, dim)}")
        elif dtype != stored:
            problems.append(f"{vpath.name} holds {dtype} vectors, the manifest says {manifest['precision']}")
        elif size != want:
            problems.append(f"{vpath.name} is {size} bytes, its header needs {want} (cut short or padded)")
    if not rpath.exists():
        problems.append(f"{rpath.name} is missing")
    elif "bytes" in p and rpath.stat().st_size != p["bytes"]["rows"]:
        problems.append(f"{rpath.name} is {rpath.stat().st_size} bytes, the manifest says {p['bytes']['rows']}")
    if checksums and "sha256" in p:
        for kind, path in (("vectors", vpath), ("rows", rpath)):
            if path.exists() and not any(m.startswith(path.name) for m in problems) \
                    and digest(path) != p["sha256"][kind]:
                problems.append(f"{path.name} does not match its checksum (changed since it was written)")
    return problems


def read_rows(folder: Path, manifest: dict, i: int) -> list[dict]:
    """The rows of partition ``i``, checked against the manifest (checksum when recorded, count, fields)."""
    p = manifest["partitions"][i]
    path = rows_path(folder, part_file(p))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IndexDamagedError(f"{path}: cannot read the rows of {p['name']} ({exc.strerror or exc})") from None
    if "sha256" in p and hashlib.sha256(data).hexdigest() != p["sha256"]["rows"]:
        raise IndexDamagedError(f"{path}: does not match its checksum (changed since it was written); "
                                "`e5v index repair` re-embeds the partition")
    rows = parse_jsonl(path, data)
    if len(rows) != p["count"]:
        raise IndexDamagedError(f"{path}: {len(rows)} rows, the manifest says {p['count']} vectors")
    for n, r in enumerate(rows, 1):
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and r.get("kind") in ("image", "text")):
            raise IndexDamagedError(f"{path}:line {n}: not an index row (id, kind)")
    return rows


def check_vectors(folder: Path, manifest: dict, i: int) -> None:
    """Raise when partition ``i``'s vectors file does not match its recorded checksum (reads it once)."""
    p = manifest["partitions"][i]
    path = vectors_path(folder, part_file(p))
    if "sha256" in p and digest(path) != p["sha256"]["vectors"]:
        raise IndexDamagedError(f"{path}: does not match its checksum (changed since it was written); "
                                "`e5v index repair` re-embeds the partition")


def import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("the approximate index needs faiss: pip install faiss-cpu (or faiss-gpu)") from exc
    return faiss


def read_ann(path: Path):
    """The faiss index in ``path``; a file faiss cannot read is an :class:`e5v.errors.IndexDamagedError`."""
    try:
        return import_faiss().read_index(str(path))
    except RuntimeError as exc:  # faiss reports a damaged file this way
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise IndexDamagedError(f"{path}: not a readable approximate index ({reason}); {ANN_HINT}") from None


def open_ann(folder: Path, info: dict, dim: int):
    """The approximate index that the manifest's ``info`` describes, checked against it (present, checksum when
    recorded, readable, vector count and dim); an :class:`e5v.errors.IndexDamagedError` names what is wrong."""
    path = Path(folder) / info["file"]
    if not path.exists():
        raise IndexDamagedError(f"{path}: the approximate index is missing; {ANN_HINT}")
    if "sha256" in info and digest(path) != info["sha256"]:
        raise IndexDamagedError(f"{path}: the approximate index does not match its checksum; {ANN_HINT}")
    ann = read_ann(path)
    if ann.ntotal != info["count"] or ann.d != dim:
        raise IndexDamagedError(f"{path}: the approximate index holds {ann.ntotal} vectors of dim {ann.d}, the "
                                f"manifest says {info['count']} of dim {dim}; {ANN_HINT}")
    return ann
