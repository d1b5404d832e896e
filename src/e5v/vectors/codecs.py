"""Storage precisions of vectors: a codec turns float32 rows into codes, scores float32 queries against codes, and
is saved as a small JSON file beside one ``.npy`` of its fitted arrays, so that an index or a vector file can keep
the codec it was written with.

=========  ==================  =====================================================================================
precision  bytes per vector    score of a query ``q`` against a stored row
=========  ==================  =====================================================================================
float32    4 d                 ``q . x``, exact
float16    2 d                 ``q . x16``, exact over the stored (rounded) values
int8       d                   ``q . decode(c)``: the float query against the dequantised row (asymmetric)
binary     ceil(d / 8)         ``1 - 2 hamming(sign(q), sign(x)) / d``: the cosine of the two sign vectors' angle
=========  ==================  =====================================================================================

int8 keeps, per dimension (or one for all), the range ``[lo, hi]`` seen on a calibration sample and 256 evenly
spaced levels across it: a value inside the range comes back within half a level (``(hi - lo) / 510``); values
outside it are clipped to the range. The same idea as sentence-transformers' ``quantize_embeddings``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..parts import atomic_save, atomic_write_bytes

PRECISIONS = ("float32", "float16", "int8", "binary")
#: int8 calibration ranges: one per dimension, or one for all dimensions
INT8_RANGES = ("per-dimension", "global")
#: rows encoded per step, and float32 rows multiplied per step
CHUNK = 16384
#: bytes of the float32 copy of float16 or int8 codes made per step of a product: small enough to stay in the
#: processor's cache until the product reads it
CONVERT_BYTES = 8 << 20


def _rows(x, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ConfigError(f"expected vectors of shape (n, {dim}), got {tuple(np.shape(x))}")
    return x


def _product(left: np.ndarray, codes) -> np.ndarray:
    """``left @ codes.T`` in float32 for codes of any numeric dtype.

    Other codes than float32 are converted a few rows at a time (:data:`CONVERT_BYTES`) into one reused float32
    buffer that stays in cache until the product has read it, so that a scan reads each code from memory once, at
    its own size: float16 and int8 scans read half and a quarter of float32's bytes. (A buffer of 16,384 rows left
    the cache: every code was written and read again as float32, and the smaller codes scanned slower than float32.)
    torch converts and multiplies: numpy casts float16 one value at a time, seven times slower, and numpy's
    products between torch's conversions wait on torch's idle threads. The codes reach torch without a copy by
    ``torch.from_numpy``, read-only memory maps too (only read: torch's warning that it cannot mark them read-only
    is silenced); DLPack would refuse them under numpy before 2.1."""
    if codes.dtype == np.float32:
        out = np.empty((len(left), len(codes)), dtype=np.float32)
        for a in range(0, len(codes), CHUNK):
            out[:, a:a + CHUNK] = left @ np.asarray(codes[a:a + CHUNK]).T
        return out
    import torch

    rows = max(1, CONVERT_BYTES // (4 * codes.shape[1]))
    buf = torch.empty((min(rows, len(codes)), codes.shape[1]), dtype=torch.float32)
    right = torch.from_numpy(np.ascontiguousarray(left, dtype=np.float32)).T
    out = torch.empty((len(codes), len(left)), dtype=torch.float32)  # transposed: each step fills whole rows
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        for a in range(0, len(codes), rows):
            chunk = buf[:min(rows, len(codes) - a)]
            chunk.copy_(torch.from_numpy(np.ascontiguousarray(codes[a:a + rows])))
            torch.matmul(chunk, right, out=out[a:a + len(chunk)])
    return np.ascontiguousarray(out.numpy().T)


class Codec:
    """How vectors of width ``dim`` are stored. Subclasses set ``precision`` and ``code_dtype`` and implement
    :meth:`encode` and :meth:`score`; those that need calibration implement :meth:`fit`."""

    precision = ""
    code_dtype = np.dtype(np.float32)

    def __init__(self, dim: int):
        if not isinstance(dim, int | np.integer) or dim < 1:
            raise ConfigError(f"a codec needs a positive vector width, not {dim!r}")
        self.dim = int(dim)

    @property
    def code_width(self) -> int:
        """Values of ``code_dtype`` per stored vector."""
        return self.dim

    @property
    def bytes_per_vector(self) -> int:
        return self.code_width * self.code_dtype.itemsize

    @property
    def fitted(self) -> bool:
        return True

    def fit(self, sample) -> Codec:
        """Calibrate on ``sample`` ((m, dim) float rows); nothing to do for most precisions."""
        _rows(sample, self.dim)
        return self

    def encode(self, x) -> np.ndarray:
        """(n, code_width) codes of the (n, dim) rows ``x``."""
        raise NotImplementedError

    def score(self, queries: np.ndarray, codes) -> np.ndarray:
        """(q, n) float32 scores of float32 ``queries`` (q, dim) against ``codes`` (n, code_width); higher is
        closer. ``codes`` may be a memory map: callers pass it in chunks."""
        raise NotImplementedError

    # --- saving -----------------------------------------------------------------------------------------------
    def config(self) -> dict:
        return {"precision": self.precision, "dim": self.dim}

    def arrays(self) -> np.ndarray | None:
        """The fitted values saved in the ``.npy`` beside the JSON, or None when there are none."""
        return None

    def check_codes(self, codes, what: str = "codes") -> None:
        """Raise :class:`ConfigError` unless ``codes`` has this codec's dtype and width."""
        shape, dtype = np.shape(codes), getattr(codes, "dtype", None)
        if len(shape) != 2 or shape[1] != self.code_width or dtype != self.code_dtype:
            raise ConfigError(f"{what} of shape {tuple(shape)} and dtype {dtype} do not fit a {self.precision} codec "
                              f"of width {self.dim} (expected (n, {self.code_width}) {self.code_dtype})")


class FloatCodec(Codec):
    """float32 or float16 rows, scored exactly."""

    def __init__(self, dim: int, precision: str = "float32"):
        super().__init__(dim)
        self.precision = precision
        self.code_dtype = np.dtype(precision)

    def encode(self, x) -> np.ndarray:
        return _rows(x, self.dim).astype(self.code_dtype)

    def decode(self, codes) -> np.ndarray:
        return np.asarray(codes, dtype=np.float32)

    def score(self, queries: np.ndarray, codes) -> np.ndarray:
        return _product(queries, codes)


class Int8Codec(Codec):
    """256 levels across the calibrated range ``[lo, hi]`` of each dimension (or of all of them): code ``c`` in
    [-128, 127] stands for ``lo + (c + 128) * step``, ``step = (hi - lo) / 255``."""

    precision = "int8"
    code_dtype = np.dtype(np.int8)

    def __init__(self, dim: int, ranges: str = "per-dimension", lo=None, hi=None):
        super().__init__(dim)
        if ranges not in INT8_RANGES:
            raise ConfigError(f"unknown int8 ranges {ranges!r}; expected one of {', '.join(INT8_RANGES)}")
        self.ranges = ranges
        self.lo = None if lo is None else np.broadcast_to(np.asarray(lo, dtype=np.float32), (dim,)).copy()
        self.hi = None if hi is None else np.broadcast_to(np.asarray(hi, dtype=np.float32), (dim,)).copy()

    @property
    def fitted(self) -> bool:
        return self.lo is not None

    @property
    def step(self) -> np.ndarray:
        self._need_fit()
        width = self.hi - self.lo
        return np.where(width > 0, width / 255, 1).astype(np.float32)  # a constant dimension: any step decodes lo

    def _need_fit(self) -> None:
        if self.lo is None:
            raise ConfigError("the int8 codec has no calibrated ranges: fit it on a sample of the vectors first")

    def fit(self, sample) -> Int8Codec:
        x = _rows(sample, self.dim)
        if len(x) == 0:
            raise ConfigError("cannot calibrate int8 ranges on an empty sample")
        if not np.isfinite(x).all():
            raise ConfigError("the int8 calibration sample holds NaN or infinite values")
        lo, hi = x.min(axis=0), x.max(axis=0)
        if self.ranges == "global":
            lo, hi = np.full(self.dim, lo.min(), np.float32), np.full(self.dim, hi.max(), np.float32)
        self.lo, self.hi = lo.astype(np.float32), hi.astype(np.float32)
        return self

    def encode(self, x) -> np.ndarray:
        x = _rows(x, self.dim)
        inverse = 1 / self.step
        out = np.empty(x.shape, dtype=np.int8)
        for a in range(0, len(x), CHUNK):
            levels = x[a:a + CHUNK] - self.lo  # in place from here on: this runs over whole collections
            levels *= inverse
            np.rint(levels, out=levels)
            np.clip(levels, 0, 255, out=levels)
            levels -= 128
            out[a:a + CHUNK] = levels
        return out

    def decode(self, codes) -> np.ndarray:
        return self.lo + (np.asarray(codes, dtype=np.float32) + 128) * self.step

    def score(self, queries: np.ndarray, codes) -> np.ndarray:
        # q . (lo + (c + 128) step) = q . (lo + 128 step) + (q * step) . c: one product with the raw codes
        step = self.step
        scaled = (queries * step).astype(np.float32)
        out = _product(scaled, codes)
        out += (queries @ (self.lo + 128 * step))[:, None]
        return out

    def config(self) -> dict:
        return {**super().config(), "ranges": self.ranges}

    def arrays(self) -> np.ndarray:
        self._need_fit()
        return np.stack([self.lo, self.hi])


class BinaryCodec(Codec):
    """One bit per dimension (1 where the value is positive), packed 8 to a byte; scored by Hamming distance
    (faiss's popcount kernel) between the packed signs of query and row."""

    precision = "binary"
    code_dtype = np.dtype(np.uint8)

    @property
    def code_width(self) -> int:
        return (self.dim + 7) // 8

    def encode(self, x) -> np.ndarray:
        return np.packbits(_rows(x, self.dim) > 0, axis=1)

    def hamming(self, qcodes: np.ndarray, codes) -> np.ndarray:
        """(q, n) int32 Hamming distances between packed codes."""
        import faiss

        a = np.ascontiguousarray(qcodes, dtype=np.uint8)
        b = np.ascontiguousarray(codes, dtype=np.uint8)
        out = np.empty((len(a), len(b)), dtype=np.int32)
        if out.size:
            faiss.hammings(faiss.swig_ptr(a), faiss.swig_ptr(b), len(a), len(b), self.code_width,
                           faiss.swig_ptr(out))
        return out

    def score(self, queries: np.ndarray, codes) -> np.ndarray:
        return 1 - self.hamming(self.encode(queries), codes).astype(np.float32) * np.float32(2 / self.dim)


def make_codec(precision: str, dim: int, **options) -> Codec:
    """A new codec of ``precision`` for vectors of width ``dim`` (int8 takes ``ranges``; fit it before use)."""
    if precision in ("float32", "float16"):
        return FloatCodec(dim, precision, **options)
    if precision == "int8":
        return Int8Codec(dim, **options)
    if precision == "binary":
        return BinaryCodec(dim, **options)
    raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def codec_files(path) -> tuple[Path, Path]:
    """The JSON file and the ``.npy`` file of a codec saved at ``path`` (``codec.json`` -> ``codec.npy``)."""
    path = Path(path)
    return path, path.with_suffix(".npy")


def save_codec(codec: Codec, path) -> None:
    """Write ``codec`` to ``path`` (JSON) and, when it has fitted arrays, the ``.npy`` beside it."""
    js, npy = codec_files(path)
    arrays = codec.arrays()
    if arrays is not None:
        atomic_save(npy, lambda tmp: np.save(tmp, arrays))
    atomic_write_bytes(js, (json.dumps(codec.config(), indent=1) + "\n").encode())


def load_codec(path) -> Codec:
    """The codec saved at ``path`` by :func:`save_codec`."""
    js, npy = codec_files(path)
    try:
        config = json.loads(js.read_text())
        options = {k: v for k, v in config.items() if k not in ("precision", "dim")}
        codec = make_codec(config["precision"], config["dim"], **options)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{js}: not a readable codec ({type(exc).__name__}: {exc})") from None
    if isinstance(codec, Int8Codec):
        try:
            ranges = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{npy}: cannot read the int8 ranges of {js.name} ({exc})") from None
        if ranges.shape != (2, codec.dim) or not np.isfinite(ranges).all() or (ranges[0] > ranges[1]).any():
            raise ConfigError(f"{npy}: int8 ranges of shape {ranges.shape}, expected valid (2, {codec.dim})")
        codec.lo, codec.hi = ranges.astype(np.float32)
    return codec
