"""Request-building helpers shared by the server tests: images as PNG bytes, data URIs and content parts."""
from __future__ import annotations

import base64
import io

from PIL import Image


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class Panic(BaseException):
    """As tokenizers' PanicException: not an Exception, so only a catch-all handler sees it."""


def poison_preparation(monkeypatch, detail: str) -> None:
    """The engine's preparation raises on items whose text holds POISON (a RuntimeError) or PANIC (a
    :class:`Panic`), with ``detail`` as the message; every other item is prepared as usual."""
    from e5v.prepare import Preparer

    original = Preparer.prepare

    def poisoned(self, item, prompt):
        if item.text is not None and "POISON" in item.text:
            raise RuntimeError(detail)
        if item.text is not None and "PANIC" in item.text:
            raise Panic(detail)
        return original(self, item, prompt)

    monkeypatch.setattr(Preparer, "prepare", poisoned)
