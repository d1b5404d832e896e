"""Safe decoding of images: every rejection is an ``InputError(item, reason)``, so that a batch can report exactly
which item failed and why, instead of crashing deep inside a backbone's preprocessor.

Only raster formats are opened, limits are checked from the header before any pixel is decoded, truncated data is
an error (never a half-grey image), and every image comes out as a detached 8-bit RGB image, upright.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import BmpImagePlugin, GifImagePlugin, Image, JpegImagePlugin, MpoImagePlugin, PngImagePlugin
from PIL import TiffImagePlugin, WebPImagePlugin

from .errors import ConfigError, InputError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard (width*height), checked from the header
DEFAULT_MIN_SIDE = 2  # a 1x1 image carries no content and breaks some resizers
DEFAULT_MAX_ASPECT = 200  # extreme strips break the backbones' resizers

#: The only formats Pillow may open: raster decoders only, so that no file can make Pillow run a program (EPS/PS
#: and PDF go through Ghostscript). Pillow's JPEG opener also gives multi-picture camera JPEGs (format "MPO").
IMAGE_FORMATS = tuple(p.format for p in (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile,
                                         WebPImagePlugin.WebPImageFile, GifImagePlugin.GifImageFile,
                                         BmpImagePlugin.BmpImageFile, TiffImagePlugin.TiffImageFile))
_JPEG = ("JPEG", MpoImagePlugin.MpoImageFile.format)
#: How transparent pixels become RGB: "white" composites onto white (what a viewer shows); "official" is the plain
#: ``convert("RGB")`` of the official pipeline, which keeps the colour stored under transparent pixels.
ALPHA_OPTIONS = ("white", "official")
_MODES_WITH_ALPHA = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_INT_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def describe(src, index: int | None = None) -> str:
    """A short human label for an item in error messages (the path when there is one)."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(src)
    if index is not None:
        return f"item {index}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(src, Image.Image):
        return "<PIL image>"
    return f"<{type(src).__name__}>"


@dataclass(frozen=True)
class _Decoding:
    """How :func:`load_image` decodes: the header limits, the reduction target and the alpha handling."""

    max_pixels: int | None
    min_side: int | None
    max_aspect: float | None
    reduce_to: int | None
    alpha: str


def load_image(
    src,
    *,
    item: str | None = None,
    max_pixels=DEFAULT_MAX_PIXELS,
    min_side=DEFAULT_MIN_SIDE,
    max_aspect=DEFAULT_MAX_ASPECT,
    allow_paths: bool = True,
    max_bytes: int | None = None,
    reduce_to: int | None = None,
    alpha: str = "white",
) -> Image.Image:
    """Validate and decode one image into a fully loaded, detached 8-bit RGB image, turned upright as its EXIF
    Orientation tag says (as a photo viewer shows it, and as the official pipeline loads it).

    Only :data:`IMAGE_FORMATS` are opened, and truncated or corrupt data is an error, never a half-grey image.
    Limits are checked from the header before any pixel is decoded, so a hostile file costs nothing.
    ``None`` disables a limit. A PIL image is converted on a copy; its current frame is used. It is turned upright
    only if it is a file as Pillow opened it (``format`` set); an image the caller made or changed is taken as is.

    ``reduce_to``: the longest side, in pixels, that the consumer (the model's image processor) can use. An image
    at least twice that is reduced by an integer factor while it is decoded (JPEG: DCT scaling; others: before
    the RGB conversion), to a longest side of ``reduce_to`` to twice that; this bounds the memory of decoding.
    Smaller images are returned at full size. ``alpha``: see :data:`ALPHA_OPTIONS`.
    """
    item = item if item is not None else describe(src)
    if alpha not in ALPHA_OPTIONS:
        raise ConfigError(f"alpha must be one of {', '.join(ALPHA_OPTIONS)}, not {alpha!r}")
    if reduce_to is not None and (not isinstance(reduce_to, int) or reduce_to < 1):
        raise ConfigError(f"reduce_to must be a positive number of pixels or None, not {reduce_to!r}")
    how = _Decoding(max_pixels, min_side, max_aspect, reduce_to, alpha)
    if isinstance(src, Image.Image):
        _check_header(src, item, how)
        return _decode(src, item, how, first_frame=False, upright=src.format is not None)
    if isinstance(src, (bytes, bytearray, memoryview)):
        size = memoryview(src).nbytes
        if size == 0:
            raise InputError(item, "empty image data (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise InputError(item, f"image data too large ({size} bytes > max_bytes {max_bytes})")
        return _open_and_decode(io.BytesIO(src), item, how)
    if isinstance(src, (str, os.PathLike)):
        if not allow_paths:
            raise InputError(item, "local paths are not allowed; send the image bytes instead")
        return _load_path(os.fsdecode(src), item, how, max_bytes)
    raise InputError(item, f"unsupported input type {type(src).__name__}; expected a path, bytes or a PIL image")


def _load_path(path: str, item: str, how: _Decoding, max_bytes) -> Image.Image:
    if not path:
        raise InputError(item, "empty path")
    if "://" in path and not os.path.exists(path):
        raise InputError(item, "URLs are not supported; download the image first")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(item, "file not found") from None
    except OSError as e:
        raise InputError(item, f"cannot read file ({e.strerror or e})") from None
    except ValueError as e:  # a NUL byte, or a lone surrogate that no file name can hold
        raise InputError(item, f"not a valid file name ({e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(item, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise InputError(item, "not a regular file")
    if st.st_size == 0:
        raise InputError(item, "empty file (0 bytes)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise InputError(item, f"file too large ({st.st_size} bytes > max_bytes {max_bytes})")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise InputError(item, f"cannot read file ({e.strerror or e})") from None
    with f:
        return _open_and_decode(f, item, how)


#: ``warnings.catch_warnings`` changes process-wide state and is not thread-safe: two threads that capture at once
#: can lose each other's warnings (a truncation let through) or leave the filters changed for good. Every capture of
#: Pillow's warnings holds this lock (so image decoding in threads of one process is serialised; the engine's worker
#: processes each have their own).
_WARNINGS_LOCK = threading.RLock()


@contextmanager
def pillow_warnings():
    """Capture the warnings Pillow gives while it opens or decodes an image (a list, for :func:`_truncation`). Its
    decompression-bomb warning is dropped: our own pixel limit is the one that decides."""
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("always", UserWarning)
        yield caught


def _open_and_decode(fp, item: str, how: _Decoding) -> Image.Image:
    with pillow_warnings() as caught:
        try:
            im = Image.open(fp, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise InputError(item, f"image too large ({e})") from None
        except Exception as e:  # PIL raises many kinds of errors on garbage headers
            raise InputError(item, f"not a recognised image file ({type(e).__name__}; accepted formats: "
                                   f"{', '.join(IMAGE_FORMATS)})") from None
        cut = _truncation(caught)
        if cut:
            im.close()
            raise InputError(item, f"truncated or corrupt image data ({cut})")
        with im:
            _check_header(im, item, how)
            if im.format in _JPEG:
                _check_jpeg_data(fp, item)
            return _decode(im, item, how, first_frame=True, upright=True)


def _check_header(im: Image.Image, item: str, how: _Decoding) -> None:
    w, h = im.size
    if how.max_pixels is not None and w * h > how.max_pixels:
        raise InputError(item, f"image too large ({w}x{h} = {w * h} pixels > max_pixels {how.max_pixels})")
    min_side = max(how.min_side or 0, 1)
    if min(w, h) < min_side:
        raise InputError(item, f"image too small ({w}x{h}; smallest side must be >= {min_side})")
    if how.max_aspect is not None and max(w, h) / min(w, h) > how.max_aspect:
        raise InputError(item, f"extreme aspect ratio ({w}x{h} > {how.max_aspect}:1)")


#: libjpeg warnings about metadata, padding or header quirks: the picture itself is complete. The others (premature
#: end, bad Huffman or arithmetic code, lost restart markers, inconsistent progression) mean missing picture data.
_HARMLESS_JPEG_WARNINGS = ("extraneous bytes", "icc", "jfif revision", "adobe color transform",
                           "invalid sos parameters")


def _check_jpeg_data(fp, item: str) -> None:
    """Reject JPEG data that libjpeg would mend silently: cut short and given an end marker, or a header that
    claims more blocks than the data holds, decodes with grey blocks and only a warning that Pillow never reports.
    The stream is decoded once more with warnings as errors, at 1/8 scale (the entropy data is read in full)."""
    import simplejpeg

    pos = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(pos)
    try:
        colour = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colour in ("CMYK", "YCCK") else "GRAY", min_factor=8,
                               strict=True)
    except ValueError as e:
        if not any(w in str(e).lower() for w in _HARMLESS_JPEG_WARNINGS):
            raise InputError(item, f"truncated or corrupt image data ({e})") from None


def _decode(im: Image.Image, item: str, how: _Decoding, *, first_frame: bool, upright: bool) -> Image.Image:
    """Load the pixels (reduced at decode time where asked), turn them upright (``upright``) and convert to RGB."""
    try:
        with pillow_warnings() as caught:
            if first_frame and getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            factor = _reduction(im.size, how.reduce_to)
            if factor > 1 and im.format in _JPEG:  # decode at 1/2, 1/4 or 1/8 scale
                im.draft(None, (im.size[0] // factor, im.size[1] // factor))
            im.load()
        cut = _truncation(caught)
        if cut:  # a decoder that mended a short file with a warning: the image is not all there
            raise OSError(cut)
    except Image.DecompressionBombError as e:
        raise InputError(item, f"image too large ({e})") from None
    except Exception as e:  # never LOAD_TRUNCATED_IMAGES: a half image would embed silently
        raise InputError(item, f"truncated or corrupt image data ({e})") from None
    try:
        turn = _ORIENTATION.get(_orientation(im)) if upright else None
        out = _reduce(im, how.reduce_to)
        return _to_rgb(out if turn is None else out.transpose(turn), how.alpha)
    except Exception as e:
        raise InputError(item, f"unsupported image mode {im.mode} ({e})") from None


def _truncation(caught: list) -> str | None:
    """The first warning that says the data ended early, if any."""
    return next((str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("truncat", "premature"))),
                None)


def _reduction(size: tuple[int, int], reduce_to: int | None) -> int:
    """The integer factor that keeps the longest side at ``reduce_to`` or more; 1 below twice ``reduce_to``."""
    return 1 if reduce_to is None else max(1, max(size) // reduce_to)


#: Modes whose values Image.reduce cannot average (bits, palette indices, 16-bit) and what to reduce instead.
_REDUCE_AS = {"1": "L", "P": "RGBA", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I", "I;16N": "I"}


def _reduce(im: Image.Image, reduce_to: int | None) -> Image.Image:
    factor = _reduction(im.size, reduce_to)
    if factor < 2:
        return im
    if im.mode in _REDUCE_AS:
        opaque_palette = im.mode == "P" and "transparency" not in im.info
        im = im.convert("RGB" if opaque_palette else _REDUCE_AS[im.mode])
    return im.reduce(factor)


#: EXIF Orientation values 2-8 and the transposition that turns the stored pixels upright (EXIF 2.3, tag 0x0112).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int:
    """The EXIF Orientation tag (1: upright), which photo viewers and the official pipeline (``datasets``) apply."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # unreadable EXIF: the pixels are still good
        return 1


def _to_rgb(im: Image.Image, alpha: str = "white") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB on a new image, keeping the caller's image untouched."""
    mode = im.mode
    if mode in _INT_GREY_MODES or mode == "F":
        grey = _scale_to_uint8(np.asarray(im), mode)
        return Image.fromarray(grey, "L").convert("RGB")
    transparent = mode in _MODES_WITH_ALPHA or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if transparent and alpha == "white":
        # Transparent pixels often hold black RGB; a white backdrop is what a viewer would show.
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # PIL has no La->RGBA path
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    out = im.convert("RGB")  # RGB copies; CMYK, YCbCr, L, 1, P, LAB, HSV convert; "official" drops alpha as is
    if mode != "RGB":
        logger.debug("converted image from mode %s to RGB", mode)
    return out


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map high bit-depth greyscale onto 0..255 by range, not by clipping raw values."""
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 16-bit data (I;16*, or 16-bit stored in 32-bit "I"): 65535 -> 255
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0  # float images conventionally hold 0..1
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))  # arbitrary range: stretch what is there
    else:
        a = np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
