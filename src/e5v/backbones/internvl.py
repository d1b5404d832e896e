"""InternVL 2.5 / 3 in the transformers format (``model_type: internvl``; OpenGVLab/InternVL3-1B-hf ... -78B-hf):
InternViT on 448-px tiles, dynamic tiling (the grid of at most ``max_patches`` tiles closest to the image's aspect
ratio, plus a thumbnail when there is more than one tile), 256 ``<IMG_CONTEXT>`` tokens a tile, a Qwen2 LM.

``InternVLProcessor`` cannot be built without torchvision (its video processor needs it), and images are all we
need: the tokenizer and the PIL GotOcr2 image processor are loaded separately and the processor's expansion is done
here: ``<IMG_CONTEXT>`` becomes ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>``, with tiling on
(``crop_to_patches``), which the processor turns on by default.
"""
from __future__ import annotations

import logging

from ..errors import ConfigError
from .base import Backbone, Features, load_tokenizer, lowers, register, whole_tiles

log = logging.getLogger(__name__)


@register
class InternVLBackbone(Backbone):
    model_types = ("internvl",)
    chat_formats = ("template",)
    image_placeholder = "<IMG_CONTEXT>"
    reserved_tokens = ("<IMG_CONTEXT>", "<img>", "</img>")

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return {"tokenizer": load_tokenizer(path, **hub_kwargs)[0],
                "image_processor": GotOcr2ImageProcessorPil.from_pretrained(path, **hub_kwargs)}

    def __init__(self, model, tokenizer, image_processor, *, chat_format: str | None = None, path: str = ""):
        super().__init__(model, tokenizer, image_processor, chat_format=chat_format, path=path)
        # tokens a tile (the processor's image_seq_length); texts-only copies (no model) never expand an image
        self.tokens_per_tile = model.config.image_seq_length if model is not None else None

    def limit_anyres(self, max_tiles: int) -> None:
        """At most ``max_tiles`` tiles in the grid (the processor's ``max_patches``; 12 in InternVL3, never raised),
        plus the thumbnail when the grid has more than one. A 640x480 image takes 13 tiles (a 4x3 grid + thumbnail),
        3,328 image tokens, at the default; 1 tile, 256 tokens, with ``max_tiles=1``."""
        if max_tiles < 1:
            raise ConfigError(f"anyres max_tiles must be >= 1, not {max_tiles}")
        if lowers("tile cap", max_tiles, self.image_processor.max_patches):
            log.info("tiles capped at %d (was %d)", max_tiles, self.image_processor.max_patches)
            self.image_processor.max_patches = int(max_tiles)

    def limit_pixels(self, max_pixels: int) -> None:
        """The grid's tiles within ``max_pixels`` pixels: :meth:`limit_anyres` with :func:`~.base.whole_tiles`
        (the thumbnail on top, as LLaVA-NeXT's base tile)."""
        self.limit_anyres(whole_tiles(max_pixels, self.image_processor.size["height"]))

    def preprocessing_key(self) -> tuple:
        return (*super().preprocessing_key(), self.image_processor.max_patches)

    def prepare(self, text: str, image=None) -> Features:
        images = {}
        if image is not None:
            out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
            images = {"pixel_values": out["pixel_values"]}
            tok = self.tokenizer
            context = tok.context_image_token * (self.tokens_per_tile * int(out["num_patches"][0]))
            text = text.replace(tok.context_image_token, tok.start_image_token + context + tok.end_image_token, 1)
        return Features(self.tokenizer(text, return_tensors="pt")["input_ids"][0], images)
