"""What the routes share: :class:`Settings` (what the operator chose) and :class:`Service`, which holds the model
behind one request batcher, the settings, the index (or ``None``) with its thumbnails, the pixel budget and the
image sources, and embeds a parsed request."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError
from .batcher import RequestBatcher
from .limits import Limits, PixelBudget
from .metrics import Metrics
from .payload import Parsed
from .sources import ImageSources
from .thumbnails import Thumbnails


@dataclass
class Settings:
    """What the operator chose: the served model name, the API key, the allow-lists and the limits."""

    model_name: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    allow_paths: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    max_batch_items: int = 256
    max_queue_items: int = 4096
    max_queue_pixels: int = 128_000_000
    batch_wait_ms: float = 2.0
    thumbnail_cache: int = 512
    url_timeout: float = 10.0
    body_timeout: float = 60.0


class Service:
    """One per app (``app.state.service``): ``model`` (an :class:`e5v.E5V`), ``settings`` and ``index``
    (``e5v.store.open_index``, or ``None``), and what serving them takes."""

    def __init__(self, model, settings: Settings, index=None):
        if index is not None and int(index.info.get("dim", model.dim)) != model.dim:
            raise ConfigError(f"the index holds {index.info.get('dim')}-d vectors but the model gives {model.dim}-d; "
                              "serve the model the index was built with")
        if settings.max_queue_pixels < settings.limits.max_request_pixels:
            raise ConfigError(f"the server's pixel budget ({settings.max_queue_pixels}) must hold at least one "
                              f"request's ({settings.limits.max_request_pixels})")
        self.model, self.settings, self.index = model, settings, index
        self.metrics = Metrics()
        self.batcher = RequestBatcher(model, metrics=self.metrics, max_batch_items=settings.max_batch_items,
                                      max_queue_items=settings.max_queue_items, wait_ms=settings.batch_wait_ms)
        self.pixels = PixelBudget(settings.max_queue_pixels)
        self.sources = ImageSources(settings.limits, settings.allow_paths, settings.allow_urls, settings.url_timeout)
        self.thumbnails = Thumbnails(index, settings.limits, settings.thumbnail_cache)
        #: the prompt the index gave its images: an image query embedded with it finds itself first
        self.image_prompt = ((index.info.get("prompt") or {}).get("image") if index is not None else None) or None

    async def embed(self, parse: Callable[..., Parsed], body: dict, *options) -> tuple[Parsed, np.ndarray, int]:
        """``parse(body, limits, sources, *options, claim)`` (the images counted on a claim on the pixel budget,
        then decoded), then the vectors and the total tokens; the claim is held until the vectors are back."""
        claim = self.pixels.claim(self.settings.limits.max_request_pixels)
        try:
            parsed = await run_in_threadpool(parse, body, self.settings.limits, self.sources, *options, claim)
            vectors, tokens = await self._run(parsed)
        finally:
            claim.release()
        return parsed, vectors, tokens

    async def _run(self, parsed: Parsed) -> tuple[np.ndarray, int]:
        """Vectors of every item in request order, and the total tokens; one batcher request per prompt."""
        groups = list(parsed.groups().items())
        results = await asyncio.gather(*(self.batcher.embed([parsed.items[i] for i in pos], p, parsed.kinds[pos[0]])
                                         for p, pos in groups))
        vectors = np.zeros((len(parsed.items), self.model.dim), dtype=np.float32)
        tokens = 0
        for (_, pos), (vec, tok) in zip(groups, results):
            vectors[pos] = vec
            tokens += int(tok.sum())
        return vectors, tokens
