"""The approximate index: faiss HNSW over scalar-quantised vectors (int8 or fp16; float32 for reference), with its
recall@10 against exact search measured when it is built and written into the manifest.

No product quantisation: PQ codes lose the fine structure that separates a text query from the image vectors
(the modality gap), and cross-modal recall drops far more than same-modality recall.
Candidates from the graph are re-scored with the stored vectors, so scores are exact and only recall is approximate.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..parts import atomic_save
from .index import Index
from .layout import digest, import_faiss, read_index_manifest, write_manifest

log = logging.getLogger(__name__)

#: the HNSW's vector codes: a storage format, named ``dtype`` in the manifest's "ann" entry (``--ann-dtype``)
ANN_DTYPES = ("int8", "float16", "float32")
#: vectors used to train the scalar quantiser's per-dimension ranges
TRAIN_SAMPLE = 65536


def _new_hnsw(dim: int, dtype: str, m: int, ef_construction: int):
    faiss = import_faiss()
    if dtype == "float32":
        ann = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
    else:
        qtype = faiss.ScalarQuantizer.QT_8bit if dtype == "int8" else faiss.ScalarQuantizer.QT_fp16
        ann = faiss.IndexHNSWSQ(dim, qtype, m, faiss.METRIC_INNER_PRODUCT)
    ann.hnsw.efConstruction = ef_construction
    return ann


def _add_rows(index: Index, ann, start: int) -> None:
    """Add the index's vectors from row ``start`` on to ``ann``, one partition slice at a time."""
    for i in range(len(index.parts)):
        lo, hi = int(index.offsets[i]), int(index.offsets[i + 1])
        if hi > start and hi > lo:
            ann.add(np.ascontiguousarray(index.vectors(i)[max(start - lo, 0):], dtype=np.float32))


def recall_at_10(index: Index, queries: np.ndarray | None = None, *, sample: int = 1000, seed: int = 0):
    """Mean share of the exact top 10 that the approximate search returns, and the query count.

    Without ``queries`` (say, text vectors for an image index: the cross-modal case) a random sample of the
    stored vectors is used; that is the easier, same-modality case."""
    if queries is None:
        rng = np.random.default_rng(seed)
        pos = rng.choice(index.count, size=min(sample, index.count), replace=False)
        queries = index.gather(np.sort(pos))
    k = min(10, index.count)
    exact = index.search(queries, k, exact=True)
    approx = index.search(queries, k)
    hits = [len({h.id for h in a} & {h.id for h in e}) / k for a, e in zip(approx, exact)]
    return float(np.mean(hits)), len(hits)


def build_ann(folder, *, dtype: str = "int8", m: int = 32, ef_construction: int = 200, ef_search: int = 128,
              queries: np.ndarray | None = None, update: bool = False) -> dict:
    """Build (or with ``update``, extend with the rows added since) the HNSW index of ``folder``; measure its
    recall@10 and record both in the manifest. Returns the manifest's "ann" entry. A stale one (partitions were
    rewritten by ``index repair`` or ``add --update``) is built again with its options."""
    folder = Path(folder).resolve()
    index = Index(folder)
    old = index.manifest.get("ann")
    if index.manifest.get("job") is not None:
        raise ConfigError(f"{folder} has an unfinished build or add; rerun it before building the approximate index")
    if index.count == 0:
        raise ConfigError(f"{folder} holds no vectors")
    if index.manifest.get("codes"):
        raise ConfigError(f"{folder} is searched through its {index.manifest['codes']['precision']} search codes; an "
                          "approximate index is not built on top of them (build one over an index without codes)")
    if update and old:  # its own options; a stale one (partitions were rewritten since) is built again
        dtype, m, ef_construction, ef_search = old["dtype"], old["m"], old["ef_construction"], old["ef_search"]
        update = not old.get("stale")
    if update and old:
        if old["count"] == index.count:
            return old
        ann, start = index.ann(), old["count"]
    else:
        if dtype not in ANN_DTYPES:
            raise ConfigError(f"unknown ann dtype {dtype!r}; expected one of {', '.join(ANN_DTYPES)} "
                              "(product quantisation is not offered: it hurts cross-modal retrieval)")
        ann, start = _new_hnsw(index.dim, dtype, m, ef_construction), 0
        if not ann.is_trained:
            rng = np.random.default_rng(0)
            pos = np.sort(rng.choice(index.count, size=min(TRAIN_SAMPLE, index.count), replace=False))
            ann.train(index.gather(pos))
    log.info("adding %d vectors to the HNSW index (%s, M=%d)", index.count - start, dtype, m)
    _add_rows(index, ann, start)
    info = {"kind": "hnsw", "dtype": dtype, "m": m, "ef_construction": ef_construction, "ef_search": ef_search,
            "count": index.count, "file": f"ann-hnsw-{dtype}.faiss"}
    index.manifest = {**index.manifest, "ann": info}
    index._ann = ann
    recall, nq = recall_at_10(index, queries)
    info.update({"recall_at_10": round(recall, 4), "recall_queries": nq,
                 "recall_query_source": "given queries" if queries is not None else "sample of indexed vectors"})
    atomic_save(folder / info["file"], lambda tmp: import_faiss().write_index(ann, tmp))
    info["sha256"] = digest(folder / info["file"])
    manifest = read_index_manifest(folder)
    manifest["ann"] = info
    write_manifest(folder, manifest)
    if old and old["file"] != info["file"]:
        (folder / old["file"]).unlink(missing_ok=True)
    return info
