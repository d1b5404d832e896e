"""Vectors at scale: storage precisions (float32, float16, int8, binary) with exact re-scoring, fewer dimensions by
PCA, the recall each setting costs, and export to vector databases (Parquet, Lance)::

    from e5v.vectors import PCA, make_codec, search, recall_rows, render_markdown, export_parquet
    pca = PCA.fit(sample, 1024)                        # fitted on a sample of the collection
    stored = pca.apply(vectors)                        # (n, 1024) unit rows
    codec = make_codec("binary", 1024).fit(stored)     # int8 calibrates its ranges here
    codes = codec.encode(stored)                       # (n, 128) uint8
    scores, positions = search(queries, [codes], codec, k=10, full=[vectors.astype("float16")], pca=pca)
    rows = recall_rows(vectors, {"text->image": text_vectors}, dims=[None, 1024])
    print(render_markdown(rows))
    export_parquet("photos.parquet", vectors, ids, metadata)

Codecs and PCAs save as a small JSON file and one ``.npy`` beside it (:func:`save_codec`, :meth:`PCA.save`).
"""
from __future__ import annotations

from .codecs import PRECISIONS, Codec, load_codec, make_codec, save_codec
from .export import export_lance, export_parquet, export_vectors
from .pca import PCA, unit_rows
from .recall import Setting, recall_rows, render_markdown, settings
from .retrieval import default_candidates, gather, merge_topk, scan, search

__all__ = ["PCA", "PRECISIONS", "Codec", "Setting", "default_candidates", "export_lance", "export_parquet",
           "export_vectors", "gather", "load_codec", "make_codec", "merge_topk", "recall_rows", "render_markdown",
           "save_codec", "scan", "search", "settings", "unit_rows"]
