"""LLaVA-OneVision (``model_type: llava_onevision``; llava-hf/llava-onevision-qwen2-*-ov-hf, a Qwen2 language model).

Images are tiled AnyRes-style as in LLaVA-NeXT (a base tile plus a grid of up to 6x6 SigLIP tiles of 384 px,
padded to the batch's largest tile count) and the model unpads the grid, appends a newline feature to each row, and
shrinks the grid (bilinear) when it holds more than about 9 tiles' worth of features ("anyres_max_9").

``LlavaOnevisionProcessor`` cannot be built without torchvision (its video processor needs it): tokenizer and PIL
image processor are loaded separately and :class:`OnevisionProcessor` expands ``<image>`` by the processor's rule.
The chat template is the processor's (``chat_template.json``); the llava-hf tokenizer configs keep their text
model's (Qwen2-Instruct's). The grid caps are LLaVA-NeXT's (:meth:`~.llava_next.LlavaNextBackbone.limit_anyres`).
Only the "full" vision feature strategy (every SigLIP feature) is supported, as the llava-hf checkpoints use.
"""
from __future__ import annotations

import math

from .. import prompts
from ..errors import ModelLoadError
from .base import load_tokenizer, register
from .llava_next import LlavaNextBackbone


class OnevisionProcessor:
    """``LlavaOnevisionProcessor`` for one text with at most one image (as ``ProcessorBackbone.prepare`` calls it):
    the image processor's tiles, and ``<image>`` repeated once per image feature the model will put there."""

    def __init__(self, tokenizer, image_processor, settings: dict):
        """``settings``: the processor's (``processor_config.json``)."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = int(settings["num_image_tokens"])         # features per tile: 27 x 27 = 729
        self.max_tiles = int(settings.get("vision_aspect_ratio", "anyres_max_9").removeprefix("anyres_max_"))

    def __call__(self, text: list[str], images=None, return_tensors: str = "pt") -> dict:
        (prompt,) = text
        out = {}
        if images:
            (image,) = images
            enc = self.image_processor(images=[image], return_tensors=return_tensors)
            out = {"pixel_values": enc["pixel_values"], "image_sizes": enc["image_sizes"]}
            n = self.image_tokens(*enc["image_sizes"][0].tolist())
            prompt = prompt.replace(prompts.IMAGE, prompts.IMAGE * n)
        out["input_ids"] = self.tokenizer([prompt], return_tensors=return_tensors)["input_ids"]
        return out

    def image_tokens(self, height: int, width: int) -> int:
        """Features of one image of ``height`` x ``width`` px: the base tile, the grid's rows without the letterbox
        padding, each with a newline, the grid shrunk past ``max_tiles`` tiles (1.1x slack) as the model does."""
        from transformers.image_processing_utils import select_best_resolution

        side = math.isqrt(self.num_image_tokens)
        tile = self.image_processor.size["height"]
        best_h, best_w = select_best_resolution([height, width], self.image_processor.image_grid_pinpoints)
        rows, cols = side * (best_h // tile), side * (best_w // tile)
        if width / height > cols / rows:
            rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
        else:
            cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
        ratio = math.sqrt(rows * cols / (self.max_tiles * side ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return self.num_image_tokens + rows * (cols + 1)


@register
class LlavaOnevisionBackbone(LlavaNextBackbone):
    model_types = ("llava_onevision",)
    chat_formats = (prompts.TEMPLATE,)

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        tokenizer, settings = load_tokenizer(path, **hub_kwargs)
        if "num_image_tokens" not in settings:
            raise ModelLoadError(f"{path}: processor_config.json has no num_image_tokens (image features per tile)")
        strategies = {settings.get("vision_feature_select_strategy"),
                      getattr(getattr(model, "config", None), "vision_feature_select_strategy", None)}
        if "default" in strategies:
            raise ModelLoadError(f"{path}: vision_feature_select_strategy 'default' is not supported for "
                                 "LLaVA-OneVision: it drops each tile's first feature, a CLS token that SigLIP does "
                                 "not have, and the model's tile grid no longer fits ('full', as llava-hf's "
                                 "checkpoints, is)")
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path, **hub_kwargs)
        return {"processor": OnevisionProcessor(tokenizer, image_processor, settings)}
