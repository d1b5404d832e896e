"""What a request may hold (:class:`Limits`) and the decoded image pixels all requests together may hold
(:class:`PixelBudget`, one :class:`Claim` per request), counted from image headers before anything is decoded."""
from __future__ import annotations

import io
import os
import stat
import threading
from dataclasses import dataclass

from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, pillow_warnings
from .errors import RequestError


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Defaults suit one GPU serving many clients."""

    max_items: int = 64
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = 64_000_000
    max_text_chars: int = 20_000
    max_k: int = 100


class PixelBudget:
    """Decoded image pixels held by all requests together (being parsed, queued or on the model).

    Each image is counted from its header before it is decoded (decoded, a pixel costs 4 bytes and more: a
    4.5 kB 1-bit PNG of 6000x6000 takes 150-400 MB), so that neither one request nor many at once can make
    the server decode more than ``limit`` pixels; a request's share is given back when it is answered."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()

    def claim(self, per_request: int) -> "Claim":
        return Claim(self, per_request)


class Claim:
    """One request's share of a :class:`PixelBudget`; :meth:`release` (always, in a ``finally``) gives it back."""

    def __init__(self, budget: PixelBudget, per_request: int):
        self.budget = budget
        self.per_request = per_request
        self.pixels = 0

    def add_image(self, src, name: str, max_pixels: int | None) -> None:
        """Count an image (bytes or a path) from its header; one over ``max_pixels`` is left to the decoder,
        which rejects it with its own reason."""
        pixels = header_pixels(src)
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            self.add(pixels, name)

    def add(self, pixels: int, name: str) -> None:
        total = self.pixels + pixels
        if total > self.per_request:
            raise RequestError(413, f"{name}: the request's images hold {total} pixels, more than the limit of "
                                    f"{self.per_request} per request; send fewer or smaller images", param=name)
        b = self.budget
        with b._lock:
            if b.used + pixels > b.limit:
                raise RequestError(503, "server busy: too many image pixels are being processed; retry later",
                                   kind="server_error")
            b.used += pixels
        self.pixels = total

    def release(self) -> None:
        with self.budget._lock:
            self.budget.used -= self.pixels
        self.pixels = 0


def header_pixels(src) -> int | None:
    """Width x height from an image's header (nothing is decoded); ``None`` when it cannot be read (the
    decoder then names the problem)."""
    try:
        if isinstance(src, str) and not stat.S_ISREG(os.stat(src).st_mode):  # a FIFO would block
            return None
        with pillow_warnings():
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src, formats=IMAGE_FORMATS) as im:
                w, h = im.size
    except Exception:  # garbage is load_image's to report, with its reason
        return None
    return w * h
