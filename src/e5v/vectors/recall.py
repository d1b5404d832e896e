"""What a smaller vector costs: recall@1 and recall@10 of every storage setting (precision x dimensions x
re-scoring) against exact float32 search over the full-width vectors, per query set (text->image, image->text,
composed, ...), as rows and as a markdown table.

A returned item counts as a hit when its exact score reaches the exact k-th best score (less ``TIE``), as in
ann-benchmarks: a gallery with duplicate images has exact ties, and either copy is a right answer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .codecs import PRECISIONS, make_codec
from .pca import PCA
from .retrieval import SCAN_CHUNK, gather, search

#: float32 rounding allowance when comparing a returned item's exact score with the k-th best exact score
TIE = 1e-5
#: rows used to fit the PCA and calibrate int8 ranges
SAMPLE = 20000
RECALL_AT = (1, 10)


@dataclass(frozen=True)
class Setting:
    """One way to store the collection: ``dims`` None is the full width; ``rescore``: the top candidates are
    re-scored from a float16 copy of the full-width vectors."""

    precision: str
    dims: int | None = None
    rescore: bool = False

    def label(self) -> str:
        parts = [self.precision, f"{self.dims} d" if self.dims else "full width"]
        return ", ".join(parts + (["re-scored"] if self.rescore else []))


def settings(precisions: Sequence[str] = PRECISIONS, dims: Sequence[int | None] = (None,)) -> list[Setting]:
    """Every combination; re-scoring only where the codes are lossier than the float16 copy (int8, binary)."""
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unknown precision {p!r}; expected one of {', '.join(PRECISIONS)}")
    return [Setting(p, d, r) for d in dims for p in precisions
            for r in ((False, True) if p in ("int8", "binary") else (False,))]


def _encode(codec, pca: PCA | None, x) -> np.ndarray:
    """The codes of all rows of ``x`` through ``pca`` (or as they are), read and encoded a chunk at a time."""
    out = np.empty((len(x), codec.code_width), dtype=codec.code_dtype)
    for a in range(0, len(x), SCAN_CHUNK):
        rows = np.asarray(x[a:a + SCAN_CHUNK], dtype=np.float32)
        out[a:a + SCAN_CHUNK] = codec.encode(pca.apply(rows) if pca is not None else rows)
    return out


def hits_at(exact_scores: np.ndarray, truth_scores: np.ndarray, k: int) -> np.ndarray:
    """Per query, the share of the first ``k`` returned items whose exact score reaches the exact k-th best."""
    threshold = truth_scores[:, k - 1:k] - TIE
    return (exact_scores[:, :k] >= threshold).sum(axis=1) / k


def recall_rows(database, query_sets: Mapping[str, np.ndarray], *, precisions: Sequence[str] = PRECISIONS,
                dims: Sequence[int | None] = (None,), sample: int = SAMPLE, candidates: int | None = None,
                seed: int = 0, full=None) -> list[dict]:
    """One row per (setting, query set): "queries", "count", "precision", "dims", "rescore", "bytes_per_vector"
    (the codes that a search scans), "rescore_bytes" (the full-width float16 copy it re-scores candidates from),
    "recall@1",
    "recall@10". ``database`` (n, width) float rows (a memory map is fine); each query set (q, width). ``full``:
    the float16 rows that re-score candidates (``database``'s shape; an index's stored float16 partitions, as
    :class:`~e5v.vectors.retrieval.Rows`), default: a float16 copy of ``database`` made here. The codes of one
    setting at a time are held, encoded from ``database`` a chunk at a time; full-width float32 search scans
    ``database`` itself."""
    n, width = np.shape(database)
    if n == 0:
        raise ConfigError("the collection holds no vectors")
    for name, q in query_sets.items():
        if np.ndim(q) != 2 or np.shape(q)[1] != width or len(q) == 0:
            raise ConfigError(f"query set {name!r} has shape {np.shape(q)}; expected (q, {width}) with q > 0")
    for d in dims:
        if d is not None and not 1 <= d <= width:
            raise ConfigError(f"dimensions must be between 1 and {width}, not {d}")
    k = min(max(RECALL_AT), n)
    parts = [database]
    exact = make_codec("float32", width)
    queries = {name: np.asarray(q, dtype=np.float32) for name, q in query_sets.items()}
    truth = {name: search(q, parts, exact, k)[0] for name, q in queries.items()}
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    fit_rows = np.asarray(database[picked], dtype=np.float32)
    if full is None:  # the re-scoring copy: the full-width rows in float16, as an index keeps them
        full = np.empty((n, width), dtype=np.float16)
        for a in range(0, n, SCAN_CHUNK):
            full[a:a + SCAN_CHUNK] = database[a:a + SCAN_CHUNK]
    elif tuple(np.shape(full)) != (n, width):
        raise ConfigError(f"the re-scoring rows have shape {tuple(np.shape(full))}, the collection {(n, width)}")
    rows = []
    for d in dict.fromkeys(dims):
        pca = PCA.fit(fit_rows, d) if d is not None and d < width else None
        calibration = pca.apply(fit_rows) if pca is not None else fit_rows
        for setting in settings(precisions, [d]):
            codec = make_codec(setting.precision, calibration.shape[1]).fit(calibration)
            codes = database if setting.precision == "float32" and pca is None else _encode(codec, pca, database)
            for name, q in queries.items():
                _, pos = search(q, [codes], codec, k, full=[full] if setting.rescore else None,
                                candidates=candidates, pca=pca)
                got = np.einsum("qd,qkd->qk", q, gather(parts, pos))
                row = {"queries": name, "count": len(q), "precision": setting.precision, "dims": codec.dim,
                       "full_width": pca is None, "rescore": setting.rescore,
                       "bytes_per_vector": codec.bytes_per_vector,
                       "rescore_bytes": 2 * width if setting.rescore else 0}
                for at in RECALL_AT:
                    row[f"recall@{at}"] = round(float(hits_at(got, truth[name], min(at, k)).mean()), 4)
                rows.append(row)
    return rows


def render_markdown(rows: list[dict]) -> str:
    """The rows as one markdown table: a line per setting, recall@1 / recall@10 columns per query set."""
    names = list(dict.fromkeys(r["queries"] for r in rows))
    by_setting: dict[tuple, dict] = {}
    for r in rows:
        key = (r["precision"], r["dims"], r["rescore"])
        by_setting.setdefault(key, {"row": r})[r["queries"]] = r
    head = ["precision", "dims", "re-scoring", "bytes/vector scanned", "float16 copy"]
    for name in names:
        count = next(r["count"] for r in rows if r["queries"] == name)
        head += [f"{name} R@1 (n={count})", f"{name} R@10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (precision, dims, rescore), cells in by_setting.items():
        first = cells["row"]
        line = [precision, f"{dims}" + ("" if first["full_width"] else " (PCA)"), "yes" if rescore else "no",
                str(first["bytes_per_vector"]), str(first["rescore_bytes"] or "-")]
        for name in names:
            r = cells.get(name)
            line += [f"{r['recall@1']:.3f}", f"{r['recall@10']:.3f}"] if r else ["", ""]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"
