"""LLaVA-NeXT / LLaVA-1.6 (``model_type: llava_next``): E5-V's own backbone (Llama-3 chat format), and the
Mistral ``[INST]`` and Vicuna variants. AnyRes images give a different number of tiles per image: the
tiles are padded to the batch's largest count; the model drops the padding using ``image_sizes``."""
from __future__ import annotations

import torch

from .base import register
from .llava import LlavaBackbone


@register
class LlavaNextBackbone(LlavaBackbone):
    model_types = ("llava_next",)
    chat_formats = ("llama3", "mistral", "vicuna")

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
