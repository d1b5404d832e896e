"""Retrieval and similarity metrics of the paper's benchmarks, on score matrices (queries x candidates).

Recall@k is the CLIP-style "hit" recall of the official code: a query counts when at least one of its positives
is among the top k candidates.  Ties are broken by candidate index (lower index ranks first), the order a stable
sort gives, so results never depend on the platform's top-k kernel.  Excluded candidates (CIRR's reference
image, items that failed to embed) take no place in the ranking at all.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: Pairs (query, candidate) compared per block: bounds memory to about this many bytes x 2.
_BLOCK = 1 << 24


def _as_lists(rows, n: int, what: str) -> list[np.ndarray]:
    if rows is None:
        return [np.zeros(0, np.int64)] * n
    if len(rows) != n:
        raise ValueError(f"{what}: {len(rows)} rows for {n} queries")
    out = []
    for r in rows:
        a = np.atleast_1d(np.asarray(r if r is not None else [], dtype=np.int64))
        out.append(a[a >= 0])
    return out


def masked_scores(scores: np.ndarray, exclude=None, invalid: np.ndarray | None = None) -> np.ndarray:
    """A copy of ``scores`` (float32 or wider) with excluded candidates (per query) and invalid candidates
    (all queries) set to -inf; -inf never ranks above a real score."""
    s = np.array(scores, dtype=np.result_type(scores, np.float32), copy=True)
    if invalid is not None and np.any(invalid):
        s[:, np.asarray(invalid, bool)] = -np.inf
    for q, ex in enumerate(_as_lists(exclude, len(s), "exclude")):
        s[q, ex] = -np.inf
    return s


def best_rank(scores: np.ndarray, positives: Sequence, exclude=None, invalid: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each query's best-ranked positive (``inf`` when it has no usable positive).

    ``positives``: per query, candidate indices (an int or a list).  ``exclude``: per query, candidates removed
    from the ranking.  ``invalid``: boolean mask of candidates removed for every query (failed to embed).
    A positive that is excluded or invalid cannot be hit.
    """
    s = masked_scores(scores, exclude, invalid)
    nq, ng = s.shape
    pos = _as_lists(positives, nq, "positives")
    qi = np.repeat(np.arange(nq), [len(p) for p in pos])
    pj = np.concatenate(pos) if len(qi) else np.zeros(0, np.int64)
    rank = np.full(nq, np.inf)
    if not len(qi):
        return rank
    if pj.max() >= ng:
        raise ValueError(f"positive index {int(pj.max())} out of range for {ng} candidates")
    cols = np.arange(ng)
    step = max(1, _BLOCK // max(ng, 1))
    for lo in range(0, len(qi), step):
        q, j = qi[lo:lo + step], pj[lo:lo + step]
        rows = s[q]
        sp = rows[np.arange(len(q)), j]
        above = (rows > sp[:, None]) | ((rows == sp[:, None]) & (cols[None, :] < j[:, None]))
        r = above.sum(axis=1).astype(np.float64)
        r[~np.isfinite(sp)] = np.inf  # an excluded or invalid positive is never retrieved
        np.minimum.at(rank, q, r)
    return rank


def recall_at_k(scores: np.ndarray, positives: Sequence, ks: Sequence[int], exclude=None,
                invalid: np.ndarray | None = None) -> dict[int, float]:
    """Recall@k in percent for each k (hit if any positive is in the top k)."""
    rank = best_rank(scores, positives, exclude, invalid)
    if not len(rank):
        return {int(k): float("nan") for k in ks}
    return {int(k): float((rank < k).mean() * 100.0) for k in ks}


def subset_recall(scores: np.ndarray, targets: Sequence[int], members: Sequence, ks: Sequence[int] = (1, 2, 3),
                  exclude=None, invalid: np.ndarray | None = None) -> dict[int, float]:
    """CIRR's Recall_subset@k in percent: the target ranked only among the query's image set (``members``,
    gallery indices), with the reference (``exclude``) and invalid candidates taken out.

    The ranking within the subset uses the same scores and tie order as :func:`best_rank`.
    """
    s = masked_scores(scores, exclude, invalid)
    mem = _as_lists(members, len(s), "members")
    hits = {int(k): 0 for k in ks}
    for q, (t, m) in enumerate(zip(targets, mem)):
        m = np.unique(m)
        st = s[q, t]
        if t not in m or not np.isfinite(st):
            continue  # the target cannot be retrieved within this subset: a miss
        sm = s[q, m]
        r = int(((sm > st) | ((sm == st) & (m < t))).sum())
        for k in hits:
            hits[k] += r < k
    n = len(s)
    return {k: (v / n * 100.0 if n else float("nan")) for k, v in hits.items()}


def top_k(scores: np.ndarray, k: int, exclude=None, invalid: np.ndarray | None = None,
          within: Sequence | None = None) -> list[np.ndarray]:
    """Per query, the indices of the ``k`` best candidates (stable tie order), never an excluded or invalid
    one; ``within`` (per query) restricts the candidates to a subset."""
    s = masked_scores(scores, exclude, invalid)
    sub = _as_lists(within, len(s), "within") if within is not None else None
    out = []
    for q in range(len(s)):
        cand = np.unique(sub[q]) if sub is not None else np.arange(s.shape[1])
        row = s[q, cand]
        order = cand[np.argsort(-row, kind="stable")]
        order = order[np.isfinite(s[q, order])]
        out.append(order[:k])
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties), as SentEval computes it with scipy."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} scores against {len(y)} gold scores")
    if len(x) < 2:
        return float("nan")
    return float(spearmanr(x, y).correlation)
