"""Embeddings of the evaluation sets, cached on disk in resumable parts.

One folder per (dataset, side, fingerprint); the fingerprint holds the settings that change the vectors (for
``e5v eval``: :meth:`e5v.config.EngineConfig.vector_settings`, the model and adapter with a fingerprint of their
files, dtype, chat format, ...), the prompt, whether vectors are normalised, the part size and a hash of the
inputs.  A second run with the same
settings reads the parts back without loading the model; an interrupted run (Ctrl-C, kill -9) recomputes only
the parts it had not finished (each part is written atomically by :class:`e5v.parts.PartStore`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import E5VError
from ..parts import PartStore

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """Vectors of a whole side in input order; rows of items that failed are zero and ``valid`` is False."""

    vectors: np.ndarray
    valid: np.ndarray
    skipped: list[tuple[int, str]]
    computed: int = 0  # items embedded in this run (0: everything came from the cache)


def digest(values: Sequence[str]) -> str:
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


class EmbeddingCache:
    """Embed a side of a benchmark through the model, part by part, keeping every finished part."""

    def __init__(self, root: Path, settings: dict, model: Callable[[], object], *, part_size: int = 256,
                 progress: bool = True):
        """``settings``: what the vectors depend on besides the inputs (model, adapter, dtype, ...).
        ``model``: returns the loaded :class:`~e5v.encoder.E5V`; called only when some part is missing."""
        self.root = Path(root)
        self.settings = dict(settings)
        self.model = model
        self.part_size = int(part_size)
        self.progress = progress
        if self.part_size < 1:
            raise E5VError(f"part size must be at least 1, not {part_size}")

    def folder(self, dataset: str, side: str, fingerprint: dict) -> Path:
        tag = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        return self.root / dataset / f"{side}-{tag}"

    def embed(self, dataset: str, side: str, prompt: str, items: Sequence, keys: Sequence[str], *,
              normalize: bool = True) -> Embedded:
        """Vectors of ``items`` (engine inputs, fetched one part at a time) with ``prompt``; ``keys`` identify
        the items (a path, a text ...) and decide, with the settings, whether cached parts can be reused."""
        if len(items) != len(keys):
            raise E5VError(f"{dataset} {side}: {len(items)} items but {len(keys)} keys")
        fingerprint = {**self.settings, "dataset": dataset, "side": side, "prompt": prompt, "normalize": normalize,
                       "part_size": self.part_size, "count": len(keys), "inputs": digest(keys)}
        store = PartStore(self.folder(dataset, side, fingerprint), fingerprint)
        n = len(items)
        nparts = (n + self.part_size - 1) // self.part_size
        todo = [k for k in range(nparts) if not store.done(k)]
        computed = 0
        if todo:
            model = self.model()
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="item", desc=f"{dataset} {side}", disable=not self.progress,
                       dynamic_ncols=True, file=sys.stderr)
            bar.update(n - sum(min(self.part_size, n - k * self.part_size) for k in todo))
            for k in todo:
                lo = k * self.part_size
                chunk = items[lo:lo + self.part_size]
                res = model.embed(chunk, prompt=prompt, normalize=normalize)
                store.write(k, vectors=res.vectors, indices=res.indices + lo,
                            skipped=np.asarray([i + lo for i, _ in res.skipped], dtype=np.int64),
                            reasons=np.asarray([str(e) for _, e in res.skipped], dtype=str))
                computed += len(chunk)
                bar.update(len(chunk))
            bar.close()
        return self._assemble(store, nparts, n, dataset, side, computed)

    def _assemble(self, store: PartStore, nparts: int, n: int, dataset: str, side: str, computed: int) -> Embedded:
        parts = [store.read(k) for k in range(nparts)]
        dim = next((p["vectors"].shape[1] for p in parts if p["vectors"].size), 0)
        skipped = [(int(i), str(r)) for p in parts for i, r in zip(p["skipped"], p["reasons"])]
        if n and not dim:
            first = skipped[0][1] if skipped else "no vectors"
            raise E5VError(f"{dataset} {side}: every one of the {n} items failed to embed (first: {first})")
        vectors = np.zeros((n, dim), np.float32)
        valid = np.zeros(n, bool)
        for p in parts:
            vectors[p["indices"]] = p["vectors"]
            valid[p["indices"]] = True
        for i, reason in skipped:
            log.warning("%s %s: item %d skipped: %s", dataset, side, i, reason)
        return Embedded(vectors, valid, skipped, computed)
