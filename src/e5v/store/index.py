"""Reading an index folder and searching it: exact inner product over memory-mapped partitions by default; the
index's search codes when it has some (int8 or binary, maybe PCA-reduced: see :mod:`e5v.store.codes`), or the
approximate (HNSW) index when one was built, their candidates re-scored exactly with the stored vectors.

Damage never gives a wrong answer: opening checks every partition's shape, dtype and sizes against the manifest,
and a partition's files are checked against their recorded checksums when they are first read (the approximate
index's file too), so a swapped, cut or edited file is an :class:`e5v.errors.IndexDamagedError` naming it."""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, IndexDamagedError
from ..vectors import default_candidates, gather, make_codec, merge_topk, scan
from ..vectors.retrieval import Parts, rescore
from .codes import CODES_HINT, codes_file, load_transform, valid_parts
from .layout import MANIFEST, check_vectors, digest, open_ann, part_file, partition_problems, read_index_manifest
from .layout import read_rows, read_tar_member, vectors_path

REPAIR_HINT = "`e5v index verify` lists all damage, `e5v index repair` re-embeds damaged partitions"

log = logging.getLogger(__name__)

@dataclass
class Hit:
    """One search result. ``meta`` holds "kind" ("image" or "text"), "image" (absolute path, None for an image
    inside a tar shard, which has "shard" and "member" instead) or "text", and the item's metadata fields."""

    id: str
    score: float
    meta: dict = field(default_factory=dict)


def row_meta(row: dict) -> dict:
    """The ``Hit.meta`` of a stored row: its metadata, then what the item is (which wins over a metadata field
    of the same name)."""
    meta = dict(row.get("meta") or {})
    meta["kind"] = row["kind"]
    if row["kind"] == "text":
        meta["text"] = row["text"]
    else:
        meta["image"] = row.get("image")
        if row.get("tar"):
            meta["shard"], meta["member"] = row["tar"][0], row["tar"][3]
    return meta


class Index:
    """A built index folder (see :mod:`e5v.store.layout`). Safe to search from several threads."""

    def __init__(self, path):
        self.path = Path(path).resolve()
        manifest = read_index_manifest(self.path)
        if manifest is None:
            raise ConfigError(f"{path}: not an e5v index (no {MANIFEST}); build one with `e5v index build`")
        self.manifest = manifest
        self.parts = [p["name"] for p in manifest["partitions"]]
        for i, name in enumerate(self.parts):
            problems = partition_problems(self.path, manifest, i)
            if problems:
                raise IndexDamagedError(f"{self.path}: {name} is damaged: {problems[0]}; {REPAIR_HINT}")
        self._lock = threading.Lock()
        self._vectors: dict[int, np.ndarray] = {}
        self._codes: dict[int, np.ndarray] = {}
        self._transform = None
        #: the stored vectors of every partition, each opened (and checked) when first read
        self.stored = Parts([p["count"] for p in manifest["partitions"]], self.vectors)
        #: global row number of each partition's first row, and the count at the end
        self.offsets = self.stored.offsets
        self._rows: dict[int, list[dict]] = {}
        self._positions: dict[str, int] | None = None
        self._ann = None

    # --- description ---------------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int | None:
        return self.manifest.get("dim")

    @property
    def info(self) -> dict:
        """What the index holds and how it was made: ``precision`` is the storage precision of its vectors,
        ``dtype`` the compute dtype of the model that made them (None for an index written before it was
        recorded)."""
        m = self.manifest
        return {"path": str(self.path), "model": m["model"], "adapter": m.get("adapter"), "dtype": m.get("dtype"),
                "chat_format": m.get("chat_format"), "max_length": m.get("max_length"), "prompt": dict(m["prompt"]),
                "dim": m.get("dim"), "precision": m["precision"], "count": self.count, "counts": dict(m["counts"]),
                "skipped": m.get("skipped", 0), "partitions": len(self.parts), "ann": m.get("ann"),
                "codes": self.codes_info(), "search": self.search_mode(), "pending": m.get("job") is not None}

    def codes_info(self) -> dict | None:
        """The search codes: precision, dims (None: full width), width of the codes, bytes per vector scanned,
        rows coded (the others are scanned in their stored form until encoded), kept variance of the PCA."""
        c = self.manifest.get("codes")
        if not c:
            return None
        coded = sum(r["count"] for r, ok in zip(c["parts"], valid_parts(self.manifest)) if ok)
        return {"precision": c["precision"], "dims": c.get("dims"), "width": c.get("width"),
                "bytes_per_vector": make_codec(c["precision"], c.get("width") or self.dim or 1).bytes_per_vector,
                "coded": coded, "kept_variance": c.get("kept_variance")}

    def search_mode(self, exact: bool = False) -> str:
        """How :meth:`search` finds the top items: "exact", "codes" (search codes, then exact re-scoring) or
        "hnsw"."""
        if exact:
            return "exact"
        if self.manifest.get("codes"):
            return "codes"
        ann = self.manifest.get("ann")
        return "hnsw" if ann and not ann.get("stale") else "exact"

    def __len__(self) -> int:
        return self.count

    # --- lazy, cached access to the partitions --------------------------------------------------------------
    def vectors(self, i: int) -> np.ndarray:
        """Partition ``i``'s vectors, memory-mapped; read once on first use to check its recorded checksum."""
        with self._lock:
            if i not in self._vectors:
                path = vectors_path(self.path, part_file(self.manifest["partitions"][i]))
                try:
                    check_vectors(self.path, self.manifest, i)
                    self._vectors[i] = np.load(path, mmap_mode="r")
                except OSError as exc:  # say, repaired by another process since this one opened the index
                    raise IndexDamagedError(f"{path}: cannot read it ({exc.strerror or exc}); if the index was "
                                            "repaired or updated since it was opened, open it again") from None
            return self._vectors[i]

    def codes(self, i: int) -> np.ndarray:
        """Partition ``i``'s search codes, memory-mapped; read once on first use to check their checksum."""
        with self._lock:
            if i not in self._codes:
                record = self.manifest["codes"]["parts"][i]
                path = codes_file(self.path, record)
                try:
                    if digest(path) != record["sha256"]:
                        raise IndexDamagedError(f"{path}: the search codes do not match their checksum; {CODES_HINT}")
                    self._codes[i] = np.load(path, mmap_mode="r")
                except (OSError, ValueError) as exc:
                    raise IndexDamagedError(f"{path}: cannot read the search codes ({exc}); {CODES_HINT}") from None
                try:
                    self.transform()[0].check_codes(self._codes[i], str(path))
                except ConfigError as exc:
                    del self._codes[i]
                    raise IndexDamagedError(f"{exc}; {CODES_HINT}") from None
            return self._codes[i]

    def transform(self):
        """The search codes' (codec, PCA or None)."""
        if self._transform is None:
            self._transform = load_transform(self.path, self.manifest["codes"])
        return self._transform

    def rows(self, i: int) -> list[dict]:
        with self._lock:
            if i not in self._rows:
                self._rows[i] = read_rows(self.path, self.manifest, i)
            return self._rows[i]

    def row(self, pos: int) -> dict:
        i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
        return self.rows(i)[pos - int(self.offsets[i])]

    def position(self, id: str) -> int | None:
        """Row number of item ``id`` in the whole index, or None."""
        if self._positions is None:
            positions = {}
            for i in range(len(self.parts)):
                for j, row in enumerate(self.rows(i)):
                    positions[row["id"]] = int(self.offsets[i]) + j
            self._positions = positions
        return self._positions.get(str(id))

    def ids(self) -> list[str]:
        return [row["id"] for i in range(len(self.parts)) for row in self.rows(i)]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """float32 vectors at global row numbers ``positions`` (any shape; result has one more axis, dim)."""
        return gather(self.stored, positions)

    def path_of(self, id: str) -> str | None:
        """The image file of item ``id`` (for thumbnails); None for texts, tar members and unknown ids."""
        pos = self.position(id)
        return None if pos is None else self.row(pos).get("image")

    def image_bytes(self, id: str) -> bytes | None:
        """The stored image of item ``id`` as bytes (an image file or a tar shard member); None for texts and
        unknown ids. Raises OSError when the file has gone."""
        pos = self.position(id)
        if pos is None:
            return None
        row = self.row(pos)
        if row.get("tar"):
            return read_tar_member(row["tar"])
        return Path(row["image"]).read_bytes() if row.get("image") else None

    # --- search ------------------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, exact: bool = False) -> list[list[Hit]]:
        """Top ``k`` items by inner product for each row of ``queries`` ((q, dim) float32; unit vectors give
        cosine similarity), best first. Uses the search codes or the approximate index when the index has them,
        unless ``exact`` (see :meth:`search_mode`); scores are always exact."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or (self.dim is not None and q.shape[1] != self.dim):
            raise ConfigError(f"query vectors have shape {tuple(np.shape(queries))}; this index holds "
                              f"{self.dim}-d vectors of {self.manifest['model']}")
        if not np.isfinite(q).all():
            raise ConfigError("query vectors hold NaN or infinite values")
        if int(k) < 1:
            raise ConfigError(f"k must be at least 1, not {k}")
        k = min(int(k), self.count)
        if k == 0:
            return [[] for _ in range(len(q))]
        mode = self.search_mode(exact)
        if mode == "codes":
            scores, pos = self._coded(q, k)
        elif mode == "hnsw":
            scores, pos = self._approx(q, k, self.ann())
        else:
            scores, pos = self._exact(q, k, 0)
        return [[Hit(id=(r := self.row(int(p)))["id"], score=float(s), meta=row_meta(r)) for p, s in zip(prow, srow)]
                for prow, srow in zip(pos, scores)]

    def _exact(self, q: np.ndarray, k: int, start: int):
        """Exact top-k over the rows from ``start`` on."""
        return scan(q, self.stored, make_codec(self.manifest["precision"], self.dim), k, start=start)

    def _coded(self, q: np.ndarray, k: int):
        """The top candidates by the search codes (partitions without current codes: by their stored vectors),
        re-scored exactly with the stored vectors."""
        codec, pca = self.transform()
        valid = valid_parts(self.manifest)
        kk = min(default_candidates(k), self.count)
        coded = [i for i, ok in enumerate(valid) if ok]
        plain = [i for i, ok in enumerate(valid) if not ok]
        found = [self._candidates(pca.apply(q) if pca is not None else q, coded, codec, self.codes, kk),
                 self._candidates(q, plain, make_codec(self.manifest["precision"], self.dim), self.vectors, kk)]
        return rescore(q, np.concatenate(found, axis=1), self.stored, k)

    def _candidates(self, queries: np.ndarray, which: list[int], codec, open_part, kk: int) -> np.ndarray:
        """Global row numbers of the top ``kk`` by ``codec`` over partitions ``which`` (``open_part(i)``: their
        arrays); (q, 0) when there are none."""
        if not which:
            return np.zeros((len(queries), 0), np.int64)
        parts = Parts([self.manifest["partitions"][i]["count"] for i in which], lambda j: open_part(which[j]))
        _, local = scan(queries, parts, codec, kk)
        part = np.searchsorted(parts.offsets, local, side="right") - 1
        return self.offsets[np.asarray(which)[part]] + local - parts.offsets[part]

    def _approx(self, q: np.ndarray, k: int, ann):
        """HNSW candidates over the rows it covers, re-scored exactly; the rows added since, searched exactly."""
        import faiss

        info = self.manifest["ann"]
        covered = min(int(info["count"]), self.count)
        kk = min(covered, max(2 * k, k + 16))
        params = faiss.SearchParametersHNSW(efSearch=max(int(info["ef_search"]), kk))
        _, cand = ann.search(q, kk, params=params)
        best_s, best_p = rescore(q, cand, self.stored, k)
        if covered < self.count:
            best_s, best_p = merge_topk(best_s, best_p, *self._exact(q, k, covered), k)
        keep = best_p >= 0
        if not keep.all():  # HNSW found fewer than k: should not happen on a connected graph
            log.warning("approximate search returned fewer than %d candidates", k)
            return [s[m] for s, m in zip(best_s, keep)], [p[m] for p, m in zip(best_p, keep)]
        return best_s, best_p

    def ann(self):
        """The approximate index (faiss), or None when none was built."""
        info = self.manifest.get("ann")
        if not info or info.get("stale"):
            return None
        with self._lock:
            if self._ann is None:
                self._ann = open_ann(self.path, info, self.dim)
            return self._ann


def open_index(path: str | os.PathLike) -> Index:
    """Open a built index folder for searching."""
    return Index(path)
