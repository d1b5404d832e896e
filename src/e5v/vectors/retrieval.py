"""Exact search over stored codes, in chunks (codes may be memory maps larger than memory), with optional exact
re-scoring: the top ``candidates`` by the codes' scores are scored again with the full-precision (float32 or
float16) copy of the same rows, and the best ``k`` of those are returned with their exact scores.

The collection is a list of parts (an index's partitions): row ``j`` of part ``i`` is global position
``offsets[i] + j``. Ties are broken by the lower position, so results never depend on chunk sizes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError
from .codecs import Codec
from .pca import PCA

#: rows scored per step (bounds one step's scores to SCAN_CHUNK x queries floats)
SCAN_CHUNK = 65536


def default_candidates(k: int) -> int:
    """Candidates re-scored for a top-``k`` search: ten times ``k``, at least 100 (cheap: a few hundred row reads
    against a scan of the whole collection)."""
    return max(10 * k, 100)


def merge_topk(s1, p1, s2, p2, k: int):
    """Best ``k`` per row of two candidate sets: higher score first, lower position on ties."""
    s, p = np.concatenate([s1, s2], axis=1), np.concatenate([p1, p2], axis=1)
    order = np.lexsort((p, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(p, order, 1)


def order_keys(scores: np.ndarray) -> np.ndarray:
    """int64 keys, one per score, whose ascending order is higher score first, then lower column: selecting the
    ``k`` smallest keys (``argpartition``) is then exact on ties too, where partitioning the scores themselves
    would pick any of the tied columns (Hamming scores tie often)."""
    bits = (scores + np.float32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0
    monotone = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the float order as signed integers
    return (~monotone << 32) | np.arange(scores.shape[1], dtype=np.int64)


class Parts(Sequence):
    """A collection's arrays, one per part, each opened on first use (``open_part(i)``): ``counts`` gives their
    row counts up front, so that reading a few rows (re-scoring) opens only the parts that hold them."""

    def __init__(self, counts: Sequence[int], open_part):
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open = open_part

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._open(i)


class Rows:
    """All rows of ``parts`` as one read-only float32 array-like (shape, len, a slice or an integer array of
    rows), for code that takes one array: :func:`~e5v.vectors.recall.recall_rows`, the exports."""

    def __init__(self, parts: Sequence):
        self.parts = parts
        self.offsets = offsets_of(parts)
        self.shape = (int(self.offsets[-1]), int(np.shape(parts[0])[1]) if len(parts) else 0)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            key = np.arange(*key.indices(self.shape[0]))
        return gather(self.parts, key)


def offsets_of(parts: Sequence) -> np.ndarray:
    if isinstance(parts, Parts):
        return parts.offsets
    return np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)


def scan(queries: np.ndarray, parts: Sequence, codec: Codec, k: int, *, start: int = 0):
    """Exact top ``k`` by ``codec``'s scores of (q, codec.dim) float32 ``queries`` over the rows of ``parts`` from
    global position ``start`` on: ((q, k) scores, (q, k) positions), fewer columns when fewer rows."""
    offsets = offsets_of(parts)
    best_s = np.zeros((len(queries), 0), dtype=np.float32)
    best_p = np.zeros((len(queries), 0), dtype=np.int64)
    for i in range(len(parts)):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if hi <= start or hi == lo:
            continue
        codes = parts[i]  # opened only when it holds rows to scan
        for a in range(max(start - lo, 0), hi - lo, SCAN_CHUNK):
            scores = codec.score(queries, codes[a:a + SCAN_CHUNK])
            kk = min(k, scores.shape[1])
            top = np.argpartition(order_keys(scores), kk - 1, axis=1)[:, :kk]
            best_s, best_p = merge_topk(best_s, best_p, np.take_along_axis(scores, top, 1), top + lo + a, k)
    return best_s, best_p


def gather(parts: Sequence, positions) -> np.ndarray:
    """float32 rows of ``parts`` at global ``positions`` (any shape; the result has one more axis). Only the parts
    holding those rows are opened."""
    offsets = offsets_of(parts)
    flat = np.asarray(positions, dtype=np.int64).ravel()
    if flat.size and not (0 <= flat.min() and flat.max() < offsets[-1]):
        raise IndexError(f"row positions outside 0..{offsets[-1] - 1}")
    part = np.searchsorted(offsets, flat, side="right") - 1
    out = None
    for i in np.unique(part):
        array = parts[int(i)]
        if out is None:
            out = np.zeros((flat.size, np.shape(array)[1]), dtype=np.float32)
        sel = np.flatnonzero(part == i)
        rows = flat[sel] - offsets[i]
        order = np.argsort(rows, kind="stable")  # ascending reads from a memory map
        out[sel[order]] = array[rows[order]]
    if out is None:
        out = np.zeros((0, np.shape(parts[0])[1] if len(parts) else 0), dtype=np.float32)
    return out.reshape(*np.shape(positions), out.shape[1])


def rescore(queries: np.ndarray, positions: np.ndarray, full: Sequence, k: int):
    """The best ``k`` of the candidate ``positions`` (q, c) by exact inner product with the rows of ``full``; a
    negative position (no candidate) scores ``-inf`` and comes last."""
    missing = positions < 0
    scores = np.einsum("qd,qcd->qc", queries, gather(full, np.where(missing, 0, positions)))
    scores[missing] = -np.inf
    order = np.lexsort((positions, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(positions, order, 1)


def check_queries(queries, width: int) -> np.ndarray:
    """(q, width) float32 queries, checked."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != width:
        raise ConfigError(f"query vectors have shape {tuple(np.shape(queries))}; expected (q, {width})")
    if not np.isfinite(q).all():
        raise ConfigError("query vectors hold NaN or infinite values")
    return np.ascontiguousarray(q)


def search(queries, parts: Sequence, codec: Codec, k: int, *, full: Sequence | None = None,
           candidates: int | None = None, pca: PCA | None = None):
    """Top ``k`` rows for each query, best first: ((q, k) float32 scores, (q, k) int64 positions).

    ``parts``: the codes, one array per part. ``pca``: the collection's PCA, applied to the queries (the stored
    rows went through it before they were encoded). ``full``: the rows as they were before any PCA, in float32
    or float16, one array per part, or None; with it the top ``candidates`` (default :func:`default_candidates`)
    are re-scored exactly with the queries themselves, which takes back what the PCA dropped as well as what the
    codes rounded. Scores are inner products: exact when re-scored or with float codes and no PCA, the codes'
    estimate in the reduced space otherwise."""
    original = check_queries(queries, pca.width if pca is not None else codec.dim)
    q = np.ascontiguousarray(pca.apply(original)) if pca is not None else original
    if int(k) < 1:
        raise ConfigError(f"k must be at least 1, not {k}")
    count = int(offsets_of(parts)[-1])
    k = min(int(k), count)
    if k == 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if full is None:
        return scan(q, parts, codec, k)
    if [np.shape(f) for f in full] != [(len(p), original.shape[1]) for p in parts]:
        raise ConfigError("the re-scoring vectors do not match the codes part for part, at the queries' width")
    kk = min(max(int(candidates or default_candidates(k)), k), count)
    _, cand = scan(q, parts, codec, kk)
    return rescore(original, cand, full, k)
