"""Gemma 3 (``model_type: gemma3``; google/gemma-3-4b-it, -12b-it, -27b-it): SigLIP at a fixed 896 px, 256 soft
image tokens per image, the checkpoint's own chat template (which writes BOS and trims every text part).

``Gemma3Processor`` loads without torchvision (PIL image processor) and expands ``<start_of_image>`` into
``\\n\\n<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>\\n\\n``. The soft tokens of one image attend
to each other both ways: the model builds that mask from ``token_type_ids`` (1 on soft tokens), which every batch
carries, as the processor's output does.
"""
from __future__ import annotations

from .base import Backbone, Features, register


@register
class Gemma3Backbone(Backbone):
    """No packing: the bidirectional image block is looked up by row position, and in a packed row the
    sliding-window layers look it up by each sequence's own positions (transformers remaps them), so images would
    attend to the wrong tokens; nor would packing pay, since Gemma 3 runs no variable-length kernel (transformers
    turns FlashAttention off for it)."""

    model_types = ("gemma3",)
    chat_formats = ("template",)
    image_placeholder = "<start_of_image>"
    supports_packing = False

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        from transformers import AutoProcessor

        return {"processor": AutoProcessor.from_pretrained(path, backend="pil", **hub_kwargs)}

    def __init__(self, model, processor, *, chat_format: str | None = None, path: str = ""):
        super().__init__(model, processor.tokenizer, processor.image_processor, chat_format=chat_format, path=path)
        self.processor = processor
        self.image_token_id = processor.tokenizer.image_token_id

    def prepare(self, text: str, image=None) -> Features:
        soft = self.tokenizer.image_token  # in a text it would ask for one image feature more than there are
        if soft in text:
            raise ValueError(f"the text contains the image token {soft!r}")
        enc = self.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        return Features(enc["input_ids"][0], {"pixel_values": enc["pixel_values"]} if image is not None else {})

    def collate(self, items):
        batch = super().collate(items)
        batch["token_type_ids"] = (batch["input_ids"] == self.image_token_id).long()
        return batch
