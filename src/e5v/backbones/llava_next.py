"""LLaVA-NeXT / LLaVA-1.6 (``model_type: llava_next``): E5-V's own backbone (Llama-3 chat format), and the
Mistral ``[INST]`` and Vicuna variants. AnyRes images give a different number of tiles per image: the
tiles are padded to the batch's largest count; the model drops the padding using ``image_sizes``. The grid can be
capped (``anyres_max_tiles``, or ``image_max_pixels`` in whole tiles), for LLaVA-OneVision too."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .base import lowers, register, whole_tiles
from .llava import LlavaBackbone


log = logging.getLogger(__name__)


@register
class LlavaNextBackbone(LlavaBackbone):
    model_types = ("llava_next",)
    chat_formats = ("llama3", "mistral", "vicuna")

    def limit_anyres(self, max_tiles: int) -> None:
        """Keep only the AnyRes grids of at most ``max_tiles`` tiles, in the processor and in the model (the base
        tile comes on top); at or above the checkpoint's largest grid, nothing changes.

        A speed option that deviates from the official recipe: a 640x480 image on royokong/e5-v takes 2,340
        image tokens at full AnyRes (base tile + a 2x2 grid) and 1,026 with ``max_tiles=1`` (base tile + one
        tile of the whole image). Fewer tokens, less detail: measure the cost on your data (``e5v bench``).
        """
        if max_tiles < 1:
            raise ConfigError(f"anyres max_tiles must be >= 1, not {max_tiles}")
        cfg = self.model.config
        tile = cfg.vision_config.image_size
        tiles = [(p[0] // tile) * (p[1] // tile) for p in cfg.image_grid_pinpoints]
        if not lowers("tile cap", max_tiles, max(tiles)):
            return
        pins = [list(p) for p, n in zip(cfg.image_grid_pinpoints, tiles) if n <= max_tiles] or [[tile, tile]]
        log.info("AnyRes capped at %d tile(s): pinpoints %s -> %s", max_tiles, cfg.image_grid_pinpoints, pins)
        cfg.image_grid_pinpoints = pins
        self.image_processor.image_grid_pinpoints = pins

    def limit_pixels(self, max_pixels: int) -> None:
        """The AnyRes grids within ``max_pixels`` pixels: :meth:`limit_anyres` with :func:`~.base.whole_tiles`."""
        self.limit_anyres(whole_tiles(max_pixels, self.model.config.vision_config.image_size))

    def stack_images(self, images):
        tiles = max(im["pixel_values"].shape[1] for im in images)
        pixels = []
        for im in images:
            pv = im["pixel_values"]
            if pv.shape[1] < tiles:
                pad = pv.new_zeros((pv.shape[0], tiles - pv.shape[1], *pv.shape[2:]))
                pv = torch.cat([pv, pad], dim=1)
            pixels.append(pv)
        return {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat([im["image_sizes"] for im in images])}
