"""Qwen2-VL and Qwen2.5-VL (``model_type: qwen2_vl`` / ``qwen2_5_vl``); Qwen3-VL builds on them (:mod:`.qwen3_vl`).

The Qwen processor cannot be built without torchvision (its video processor needs it), and images are all
we need: tokenizer and PIL image processor are loaded separately and the image placeholder is expanded
here, one ``<|image_pad|>`` per merged patch. M-RoPE needs ``mm_token_type_ids`` (1 on image tokens).
"""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError
from .base import Backbone, Features, load_tokenizer, lowers, register

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"


@register
class QwenVLBackbone(Backbone):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    chat_formats = ("qwen",)
    image_placeholder = "<|vision_start|>" + IMAGE_PAD + "<|vision_end|>"
    reserved_tokens = (IMAGE_PAD, "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        # Qwen2-VL, Qwen2.5-VL and Qwen3-VL share this image processor; the PIL class loads without torchvision.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return {"tokenizer": load_tokenizer(path, **hub_kwargs)[0],
                "image_processor": Qwen2VLImageProcessorPil.from_pretrained(path, **hub_kwargs)}

    def __init__(self, model, tokenizer, image_processor, *, chat_format: str | None = None, path: str = ""):
        super().__init__(model, tokenizer, image_processor, chat_format=chat_format, path=path)
        self.image_token_id = (model.config.image_token_id if model is not None
                               else tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    def limit_pixels(self, max_pixels: int) -> None:
        """Qwen's dynamic resolution: images are resized to at most ``max_pixels`` pixels (the processor's
        ``max_pixels``, ``size["longest_edge"]``; never above the checkpoint's), so at most
        ``max_pixels / (patch * merge)^2`` image tokens."""
        size = dict(self.image_processor.size)
        if max_pixels < size["shortest_edge"]:
            raise ConfigError(f"image_max_pixels {max_pixels} is below the model's minimum of "
                              f"{size['shortest_edge']} pixels")
        if lowers("image_max_pixels", max_pixels, size["longest_edge"]):
            log.info("image pixels capped at %d (was %d)", max_pixels, size["longest_edge"])
            self.image_processor.size = {**size, "longest_edge": int(max_pixels)}

    def prepare(self, text: str, image=None) -> Features:
        images = {}
        if image is not None:
            images = dict(self.image_processor(images=[image], return_tensors="pt"))
            n = int(images["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
            text = text.replace(IMAGE_PAD, IMAGE_PAD * n)
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
        return Features(ids, images)

    def collate(self, items):
        batch = super().collate(items)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        return batch

    def collate_packed(self, items):
        """Packed row with M-RoPE: each sequence's 3-D positions computed alone (as the padded path does), under
        a first row of plain per-sequence positions that transformers reads to build the block-diagonal mask."""
        batch, ends = super().collate_packed(items)
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id).int()
        rows = []
        for f in items:
            ids = f.input_ids[None]
            text = torch.arange(len(f)).view(1, 1, -1)
            if "image_grid_thw" in f.images:
                pos, _ = self.model.model.get_rope_index(ids, (ids == self.image_token_id).int(),
                                                         image_grid_thw=f.images["image_grid_thw"],
                                                         attention_mask=torch.ones_like(ids))
            else:
                pos = text.expand(3, 1, -1)
            rows.append(torch.cat([text, pos.to(text.dtype)], dim=0))
        batch["position_ids"] = torch.cat(rows, dim=2)
        return batch, ends

