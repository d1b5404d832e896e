"""The vector index on disk: build it (resumable, partitioned, several processes), add to it, search it.

Public contract (used by ``e5v index``, ``e5v search``, the HTTP server and the demo)::

    from e5v.store import build_index, add_to_index, open_index, embed_query
    build_index("photos/", "photos.idx", model="royokong/e5-v")   # a Summary; add_to_index(index, source) alike
    index = open_index("photos.idx")     # an Index
    index.info                           # {"model", "prompt": {"image", "text"}, "dim", "precision", "count", ...}
    hits = index.search(queries, k=10)   # queries (q, dim) float32 -> one list of Hit per query, best first
    hits[0][0].id, hits[0][0].score, hits[0][0].meta   # meta: "kind", "image" (abs path) or "text", metadata
    index.path_of(id)                    # image file of an item (thumbnails), None for texts / tar members
    index.image_bytes(id)                # the image bytes of an item, also from tar shards
    embed_query(model, index.info, text=..., image=..., task="cirr")   # the query vector (dim,)
"""
from __future__ import annotations

from .index import Hit, Index, open_index
from .indexing import add_to_index, build_index
from .query import embed_query

__all__ = ["Hit", "Index", "add_to_index", "build_index", "embed_query", "open_index"]
