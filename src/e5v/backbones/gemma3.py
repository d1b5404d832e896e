"""Gemma 3 (``model_type: gemma3``; google/gemma-3-4b-it, -12b-it, -27b-it): SigLIP at a fixed 896 px, 256 soft
image tokens per image, the processor's chat template (which writes BOS and trims every text part).

``Gemma3Processor`` loads without torchvision (PIL image processor) and expands ``<start_of_image>`` into
``\\n\\n<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``. The soft tokens of one image attend
to each other both ways: the model builds that mask from ``token_type_ids`` (1 on soft tokens), which every batch
carries, as the processor's output does.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import ProcessorBackbone, register


@register
class Gemma3Backbone(ProcessorBackbone):
    """No packing: the bidirectional image block is looked up by row position, and in a packed row the
    sliding-window layers look it up by each sequence's own positions (transformers remaps them), so images would
    attend to the wrong tokens. No FlashAttention either: it drops that bidirectional block (transformers 5.24 turns
    it off for Gemma 3, 5.17 does not), so it is refused, as float16 is, where Gemma 3's activations overflow."""

    model_types = ("gemma3",)
    chat_formats = ("template",)
    image_placeholder = "<start_of_image>"
    reserved_tokens = ("<image_soft_token>", "<start_of_image>")
    supports_packing = False

    @classmethod
    def check_load(cls, dtype, attn_implementation) -> None:
        if dtype == torch.float16:
            raise ConfigError("Gemma 3 overflows in float16: use --dtype bfloat16 (or float32)")
        if attn_implementation and "flash" in attn_implementation:
            raise ConfigError(f"Gemma 3 cannot run with {attn_implementation}: FlashAttention drops the bidirectional "
                              "attention among an image's soft tokens (the vectors would be wrong); use sdpa or "
                              "eager")

    def collate(self, items):
        batch = super().collate(items)
        batch["token_type_ids"] = (batch["input_ids"] == self.tokenizer.image_token_id).long()  # the soft tokens
        return batch
