"""Fewer dimensions: a PCA fitted on a sample of a collection, applied alike to its stored vectors and to every
query, with the result re-normalised to unit length (so inner products stay cosines).

The principal axes are those of the centred sample; vectors are projected onto them without subtracting the mean
(as sentence-transformers' PCA-initialised ``Dense`` layer does). Keeping the mean's share in every vector keeps
the re-normalisation from stretching the small per-item differences, so the ranking of inner products stays
closest to the full-width one; with as many axes as dimensions the projection is a rotation and changes no score.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..parts import atomic_save, atomic_write_bytes

#: rows accumulated into the covariance per step
CHUNK = 8192


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with each row scaled to unit length (a zero row stays zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


@dataclass
class PCA:
    """``components`` (dims, width): orthonormal rows, the leading principal axes first; ``kept``: the share of
    the sample's variance around its mean that they hold."""

    components: np.ndarray
    kept: float

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    @property
    def width(self) -> int:
        """The width of the vectors it takes."""
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, sample, dims: int) -> PCA:
        """The leading ``dims`` principal axes of ``sample`` ((m, width) float rows; m may be a memory map)."""
        from scipy.linalg import eigh

        m, width = np.shape(sample)
        if not 1 <= dims <= width:
            raise ConfigError(f"PCA dimensions must be between 1 and the vectors' width {width}, not {dims}")
        if m < 2:
            raise ConfigError(f"a PCA needs at least 2 sample vectors, got {m}")
        # float32 products of rows shifted by the first rows' mean (no cancellation), summed in float64
        shift = np.asarray(sample[:CHUNK], dtype=np.float32).mean(axis=0)
        total = np.zeros(width)
        gram = np.zeros((width, width))
        for a in range(0, m, CHUNK):
            x = np.asarray(sample[a:a + CHUNK], dtype=np.float32) - shift
            if not np.isfinite(x).all():
                raise ConfigError("the PCA sample holds NaN or infinite values")
            total += x.sum(axis=0, dtype=np.float64)
            gram += x.T @ x
        mean = total / m
        cov = (gram - m * np.outer(mean, mean)) / (m - 1)
        values, vectors = eigh(cov, subset_by_index=[width - dims, width - 1])
        values, vectors = values[::-1], vectors[:, ::-1].T
        # one sign per axis, whatever the solver returned: the largest entry is positive
        signs = np.sign(vectors[np.arange(dims), np.abs(vectors).argmax(axis=1)])
        vectors *= signs[:, None]
        variance = float(np.trace(cov))
        kept = float(np.clip(values, 0, None).sum() / variance) if variance > 0 else 1.0
        return cls(np.ascontiguousarray(vectors, dtype=np.float32), min(kept, 1.0))

    def apply(self, x) -> np.ndarray:
        """(n, dims) unit float32 rows: ``x`` ((n, width) or (width,)) projected onto the axes, re-normalised."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.width:
            raise ConfigError(f"vectors of width {x.shape[-1]} given to a PCA of width {self.width}")
        one = x.ndim == 1
        out = unit_rows(np.atleast_2d(x) @ self.components.T)
        return out[0] if one else out

    # --- saving ------------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """``path`` (JSON: dims, width, kept variance) and the components in the ``.npy`` beside it."""
        path = Path(path)
        atomic_save(path.with_suffix(".npy"), lambda tmp: np.save(tmp, self.components))
        info = {"kind": "pca", "dims": self.dims, "width": self.width, "kept_variance": round(self.kept, 6)}
        atomic_write_bytes(path, (json.dumps(info, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path) -> PCA:
        path = Path(path)
        try:
            info = json.loads(path.read_text())
            components = np.load(path.with_suffix(".npy"), allow_pickle=False)
            shape = (int(info["dims"]), int(info["width"]))
            kept = float(info["kept_variance"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a readable PCA ({type(exc).__name__}: {exc})") from None
        if info.get("kind") != "pca" or components.shape != shape or components.dtype != np.float32:
            raise ConfigError(f"{path}: the PCA components ({components.shape}, {components.dtype}) do not match "
                              f"its description {shape}")
        return cls(components, kept)
