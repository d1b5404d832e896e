"""Thumbnails of the index's images for ``GET /v1/thumbnail/{id}`` and the search page."""
from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict

from ..errors import InputError
from ..images import load_image
from .errors import RequestError
from .limits import Claim, Limits

log = logging.getLogger(__name__)


class Thumbnails:
    """Downscaled JPEGs of the index's own image items (files or tar-shard members), cached (LRU) by id and size."""

    def __init__(self, index, limits: Limits, capacity: int):
        self.index = index
        self.limits = limits
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item_id: str, size: int, claim: Claim | None = None) -> bytes:
        key = (item_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = self.index.image_bytes(item_id)
        except OSError as err:
            log.warning("thumbnail of %r: %s", item_id, err)
            raise RequestError(404, f"the image of {item_id!r} cannot be read ({err.strerror or type(err).__name__})",
                               kind="not_found") from None
        if data is None:
            raise RequestError(404, f"no image item with id {item_id!r} in the index", param="id", kind="not_found")
        if claim is not None:
            claim.add_image(data, item_id, self.limits.max_pixels)
        try:
            im = load_image(data, item=item_id, max_pixels=self.limits.max_pixels)
        except InputError as err:
            raise RequestError(404, f"the image of {item_id!r} cannot be read: {err.reason}",
                               kind="not_found") from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
