"""Search codes of an index: its vectors in int8 or binary (optionally after a PCA to fewer dimensions), scanned
in place of the stored vectors, whose rows then re-score the top candidates exactly. The stored (float16 or
float32) vectors stay the index's own copy: add, update, repair and export read them, and the codes follow.

::

    DIR/codes/codec.json, codec.npy      the codec (int8: the ranges calibrated on a sample of the index)
    DIR/codes/pca.json, pca.npy          the PCA fitted on that sample, when the codes have fewer dimensions
    DIR/codes/part-000000.npy            the codes of one partition, named after the partition file they encode

The manifest's ``codes`` entry names the precision, the dimensions, and per partition the file the codes were
made from, their count and checksum. Codes whose partition was rewritten since (``add --update``, ``repair``)
no longer match it: search scans that partition's stored vectors instead, and :func:`update_codes` (run by add,
update and repair) encodes it again. The codec and PCA stay as fitted, so that every query goes through the same
transform as every stored vector.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError, IndexDamagedError
from ..parts import atomic_save
from ..vectors import PCA, PRECISIONS, Codec, load_codec, make_codec, save_codec
from ..vectors.codecs import CHUNK
from ..vectors.recall import SAMPLE
from .layout import PRECISIONS as STORED
from .layout import digest, npy_header, part_file, read_index_manifest, write_manifest

log = logging.getLogger(__name__)

FOLDER = "codes"
CODES_HINT = "`e5v index repair` encodes them again"


def codes_folder(folder) -> Path:
    return Path(folder) / FOLDER


def codes_file(folder, record: dict) -> Path:
    return codes_folder(folder) / f"{record['source']}.npy"


def load_transform(folder, entry: dict) -> tuple[Codec, PCA | None]:
    """The codec and the PCA (None without one) of a ``codes`` entry, checked against it: a transform that
    disagrees with the entry's precision, ``dims`` or ``width`` (say, a re-fit killed between writing the transform
    and the manifest) is an :class:`~e5v.errors.IndexDamagedError`."""
    try:
        codec = load_codec(codes_folder(folder) / "codec.json")
        pca = PCA.load(codes_folder(folder) / "pca.json") if entry.get("dims") else None
    except ConfigError as exc:
        raise IndexDamagedError(f"{folder}: the search codes' transform is damaged ({exc}); {CODES_HINT}") from None
    width = entry.get("width")
    if codec.precision != entry["precision"] or (width is not None and codec.dim != width) or \
            (pca is not None and not pca.dims == codec.dim == entry["dims"]):
        raise IndexDamagedError(f"{folder}: the search codes' codec does not match the manifest; {CODES_HINT}")
    return codec, pca


def valid_parts(manifest: dict) -> list[bool]:
    """Per partition: whether the codes entry holds codes made from its current file."""
    records = (manifest.get("codes") or {}).get("parts", [])
    return [i < len(records) and records[i]["source"] == part_file(p) and records[i]["count"] == p["count"]
            for i, p in enumerate(manifest["partitions"])]


def code_problems(folder, manifest: dict, *, checksums: bool = False) -> list[str]:
    """What is wrong with the code files that the manifest lists as current (missing, shape, size, checksum)."""
    entry = manifest.get("codes")
    if not entry:
        return []
    problems = []
    try:
        codec, _ = load_transform(folder, entry)
    except IndexDamagedError as exc:
        return [str(exc)]
    for record, valid in zip(entry["parts"], valid_parts(manifest)):
        if not valid:
            continue
        path = codes_file(folder, record)
        try:
            shape, dtype, offset = npy_header(path)
        except FileNotFoundError:
            problems.append(f"{path.name}: the codes of {record['source']} are missing")
            continue
        except (OSError, ValueError, EOFError) as exc:
            problems.append(f"{path.name}: not a readable .npy file ({exc})")
            continue
        want = (record["count"], codec.code_width)
        if shape != want or dtype != codec.code_dtype or path.stat().st_size != offset + codec.bytes_per_vector * \
                record["count"]:
            problems.append(f"{path.name}: holds {dtype} codes of shape {shape}, expected {codec.code_dtype} {want}")
        elif checksums and digest(path) != record["sha256"]:
            problems.append(f"{path.name}: does not match its checksum (changed since it was written)")
    return problems


def fit_transform(index, precision: str, dims: int | None, sample: int = SAMPLE, seed: int = 0):
    """A codec of ``precision`` (and a PCA to ``dims``, when fewer than the index's) fitted on a random sample of
    the index's vectors."""
    if precision not in PRECISIONS:
        raise ConfigError(f"search codes are {', '.join(PRECISIONS)}, not {precision!r}")
    if dims is not None and not 1 <= dims <= index.dim:
        raise ConfigError(f"--dims must be between 1 and the index's {index.dim} dimensions, not {dims}")
    rng = np.random.default_rng(seed)
    rows = index.gather(np.sort(rng.choice(index.count, size=min(sample, index.count), replace=False)))
    pca = PCA.fit(rows, dims) if dims is not None and dims < index.dim else None
    codec = make_codec(precision, pca.dims if pca else index.dim).fit(pca.apply(rows) if pca else rows)
    return codec, pca


def update_codes(folder, *, precision: str | None = None, dims: int | None = None,
                 checksums: bool = False) -> dict | None:
    """Encode every partition of the index at ``folder`` that has no current codes, or damaged ones (``checksums``:
    also those that no longer match their checksum); with ``precision`` first fit a new codec (and with ``dims`` a
    PCA) on a sample of the index, replacing any codes it had; a damaged codec or PCA (or one that disagrees with the
    manifest) is fitted again to the manifest's settings. Returns the manifest's ``codes`` entry (None for an index
    without codes).

    New codes are refused, before anything is written, on an index with an approximate index (it is searched
    through one or the other), and in a float precision at the full width: they would be a second copy of the
    stored vectors."""
    from .index import Index

    index = Index(folder)
    folder = index.path
    manifest = index.manifest
    if manifest.get("job") is not None:
        raise ConfigError(f"{folder} has an unfinished build or add; rerun it before encoding its search codes")
    if precision is not None and manifest.get("ann"):
        raise ConfigError(f"{folder} is searched through its approximate index; search codes are not made beside it "
                          "(build them into an index without --ann)")
    if precision in STORED and (dims is None or dims >= (index.dim or 0)):
        raise ConfigError(f"{precision} search codes of the full width would copy the stored vectors; give --dims "
                          "fewer than the vectors' dimensions, or int8 or binary")
    entry = manifest.get("codes")
    if precision is None and entry:
        try:
            load_transform(folder, entry)
        except IndexDamagedError as exc:  # fitted again: every partition is encoded again with the new transform
            log.warning("%s; fitting it again", exc)
            precision, dims = entry["precision"], entry.get("dims")
    if precision is not None:
        if index.count == 0:
            raise ConfigError(f"{folder} holds no vectors to fit search codes on")
        codec, pca = fit_transform(index, precision, dims)
        codes_folder(folder).mkdir(exist_ok=True)
        save_codec(codec, codes_folder(folder) / "codec.json")
        if pca is not None:
            pca.save(codes_folder(folder) / "pca.json")
        entry = {"precision": precision, "dims": pca.dims if pca else None, "width": codec.dim,
                 "kept_variance": round(pca.kept, 6) if pca else None, "parts": []}
    if entry is None:
        return None
    codec, pca = load_transform(folder, entry)
    damaged = {p.split(":")[0] for p in code_problems(folder, manifest, checksums=checksums)} \
        if precision is None else set()
    records = []
    for i, valid in enumerate(valid_parts({**manifest, "codes": entry})):
        record = entry["parts"][i] if valid else None
        if record is None or codes_file(folder, record).name in damaged:
            record = _encode_part(folder, index, i, codec, pca)
        records.append(record)
    entry = {**entry, "parts": records, "count": sum(r["count"] for r in records)}
    manifest = read_index_manifest(folder)
    manifest["codes"] = entry
    write_manifest(folder, manifest)
    keep = {codes_file(folder, r).name for r in records}
    for path in codes_folder(folder).glob("part-*.npy"):  # codes of files the partitions no longer use
        if path.name not in keep:
            path.unlink(missing_ok=True)
    return entry


def _encode_part(folder: Path, index, i: int, codec: Codec, pca: PCA | None) -> dict:
    vectors = index.vectors(i)
    codes = np.empty((len(vectors), codec.code_width), dtype=codec.code_dtype)
    for a in range(0, len(vectors), CHUNK):
        rows = np.asarray(vectors[a:a + CHUNK], dtype=np.float32)
        codes[a:a + CHUNK] = codec.encode(pca.apply(rows) if pca is not None else rows)
    record = {"source": part_file(index.manifest["partitions"][i]), "count": len(codes)}
    path = codes_file(folder, record)
    atomic_save(path, lambda tmp: np.save(tmp, codes))
    log.info("encoded the %s search codes of %s", codec.precision, record["source"])
    return {**record, "sha256": digest(path)}
