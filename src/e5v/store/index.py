"""Reading an index folder and searching it: exact inner product over memory-mapped partitions by default, the
approximate (HNSW) index when one was built, with its candidates re-scored exactly.

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
from .layout import MANIFEST, check_vectors, part_file, partition_problems, read_manifest, read_rows
from .layout import read_tar_member, vectors_path

REPAIR_HINT = "`e5v index verify` lists all damage, `e5v index repair` re-embeds damaged partitions"

log = logging.getLogger(__name__)

#: rows scored per matrix product in exact search (bounds the memory of one step to CHUNK x queries floats)
CHUNK = 65536


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


def _merge(s1, p1, s2, p2, k):
    """Best ``k`` per row of two candidate sets: higher score first, lower position on ties."""
    s, p = np.concatenate([s1, s2], axis=1), np.concatenate([p1, p2], axis=1)
    order = np.lexsort((p, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)


class Index:
    """A built index folder (see :mod:`e5v.store.layout`). Safe to search from several threads."""

    def __init__(self, path):
        self.path = Path(path).resolve()
        manifest = read_manifest(self.path)
        if manifest is None:
            raise ConfigError(f"{path}: not an e5v index (no {MANIFEST}); build one with `e5v index build`")
        self.manifest = manifest
        self.parts = [p["name"] for p in manifest["partitions"]]
        for i, name in enumerate(self.parts):
            problems = partition_problems(self.path, manifest, i)
            if problems:
                raise IndexDamagedError(f"{self.path}: {name} is damaged: {problems[0]}; {REPAIR_HINT}")
        self.offsets = np.concatenate([[0], np.cumsum([p["count"] for p in manifest["partitions"]])]).astype(np.int64)
        self._lock = threading.Lock()
        self._vectors: dict[int, np.ndarray] = {}
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
        m = self.manifest
        return {"path": str(self.path), "model": m["model"], "adapter": m.get("adapter"),
                "chat_format": m.get("chat_format"), "max_length": m.get("max_length"), "prompt": dict(m["prompt"]),
                "dim": m.get("dim"), "dtype": m["dtype"], "count": self.count, "counts": dict(m["counts"]),
                "skipped": m.get("skipped", 0), "partitions": len(self.parts), "ann": m.get("ann"),
                "pending": m.get("job") is not None}

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
        flat = np.asarray(positions, dtype=np.int64).ravel()
        out = np.zeros((flat.size, self.dim or 0), dtype=np.float32)
        part = np.searchsorted(self.offsets, flat, side="right") - 1
        for i in np.unique(part):
            sel = np.flatnonzero(part == i)
            out[sel] = self.vectors(int(i))[flat[sel] - self.offsets[i]]
        return out.reshape(*np.shape(positions), -1)

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
        cosine similarity), best first. Uses the approximate index when one exists, unless ``exact``."""
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
        ann = None if exact else self.ann()
        scores, pos = self._exact(q, k, 0) if ann is None else self._approx(q, k, ann)
        return [[Hit(id=(r := self.row(int(p)))["id"], score=float(s), meta=row_meta(r)) for p, s in zip(prow, srow)]
                for prow, srow in zip(pos, scores)]

    def _exact(self, q: np.ndarray, k: int, start: int):
        """Exact top-k over the rows from ``start`` on."""
        best_s = np.zeros((len(q), 0), dtype=np.float32)
        best_p = np.zeros((len(q), 0), dtype=np.int64)
        for i in range(len(self.parts)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi <= start or hi == lo:
                continue
            vecs = self.vectors(i)
            for a in range(max(start - lo, 0), hi - lo, CHUNK):
                scores = q @ np.asarray(vecs[a:a + CHUNK], dtype=np.float32).T
                kk = min(k, scores.shape[1])
                top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
                best_s, best_p = _merge(best_s, best_p, np.take_along_axis(scores, top, 1), top + lo + a, k)
        return best_s, best_p

    def _approx(self, q: np.ndarray, k: int, ann):
        """HNSW candidates over the rows it covers, re-scored exactly; the rows added since, searched exactly."""
        import faiss

        info = self.manifest["ann"]
        covered = min(int(info["count"]), self.count)
        kk = min(covered, max(2 * k, k + 16))
        params = faiss.SearchParametersHNSW(efSearch=max(int(info["ef_search"]), kk))
        _, cand = ann.search(q, kk, params=params)
        scores = np.einsum("qd,qkd->qk", q, self.gather(np.maximum(cand, 0)))
        scores[cand < 0] = -np.inf
        order = np.lexsort((cand, -scores), axis=1)[:, :k]
        best_s, best_p = np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)
        if covered < self.count:
            best_s, best_p = _merge(best_s, best_p, *self._exact(q, k, covered), k)
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
                from .ann import open_ann

                self._ann = open_ann(self.path, info, self.dim)
            return self._ann


def open_index(path: str | os.PathLike) -> Index:
    """Open a built index folder for searching."""
    return Index(path)
