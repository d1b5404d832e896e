"""What the engine embeds and what it returns: :class:`Item` (a text, an image, or both), :func:`as_item` (what a
caller passes, made an Item), :func:`windows` (items cut into the engine's windows), :class:`EmbedResult`, and
:func:`clean_text`, the check every item's text gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from . import prompts
from .errors import InputError
from .images import describe


@dataclass
class Item:
    """One input: a text, an image (path, bytes or PIL image), or both (composed)."""

    text: str | None = None
    image: Any = None
    name: str | None = None


@dataclass
class EmbedResult:
    """Vectors of the accepted items (``indices`` into the input, ascending) and the rejected ones.

    ``tokens``: the input length of each accepted row in tokens (prompt, text and image tokens; usage reports)."""

    vectors: np.ndarray
    indices: np.ndarray
    skipped: list[tuple[int, InputError]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)


def as_item(obj, index: int, prompt: str) -> Item:
    """Accept an Item, an ``(image, text)`` pair, a dict with image/text, a str, or an image.

    A str is a text when the prompt has ``<sent>``, else an image path (image-only prompts).
    """
    if isinstance(obj, Item):
        return obj if obj.name else Item(obj.text, obj.image, f"item {index}")
    if isinstance(obj, str) and (prompts.SENT in prompt or prompts.IMAGE not in prompt):
        return Item(text=obj, name=f"text {index}")
    if isinstance(obj, tuple) and len(obj) == 2:
        return Item(image=obj[0], text=obj[1], name=f"pair {index} ({describe(obj[0], index)})")
    if isinstance(obj, dict):
        return Item(text=obj.get("text"), image=obj.get("image"), name=str(obj.get("id", f"item {index}")))
    return Item(image=obj, name=describe(obj, index))


def windows(items: Iterable, prompt: str, size: int) -> Iterator[list[tuple[int, Item]]]:
    """``(input index, Item)`` pairs, ``size`` at a time (the last window may be shorter)."""
    window: list[tuple[int, Item]] = []
    for i, obj in enumerate(items):
        window.append((i, as_item(obj, i, prompt)))
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def clean_text(text, *, item: str | None = None) -> str:
    """Reject non-strings and blank texts; return the text unchanged, since prompts must be byte-exact."""
    item = item if item is not None else "<text>"
    if not isinstance(text, str):
        raise InputError(item, f"expected text (str), got {type(text).__name__}")
    if not text.strip():
        raise InputError(item, "empty text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer, file or JSON can take it
        raise InputError(item, f"the text cannot be encoded as UTF-8 ({e.reason}: {text[e.start]!r} at position "
                               f"{e.start})") from None
    return text
