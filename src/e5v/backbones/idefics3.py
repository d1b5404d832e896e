"""Idefics3 (``model_type: idefics3``: HuggingFaceM4/Idefics3-8B-Llama3, and SmolVLM v1: HuggingFaceTB/SmolVLM-256M-
/ -500M-Instruct, SmolVLM-Instruct) and SmolVLM2 (``model_type: smolvlm``: HuggingFaceTB/SmolVLM2-*).

Each image is resized to the processor's longest edge (``size``), split into square tiles of the tower's size
(``max_image_size``) plus the whole image as a global tile, and every tile becomes ``image_seq_len`` tokens after
the pixel shuffle. ``<image>`` in the prompt expands to ``<fake_token_around_image><row_r_col_c>`` + the tile's
``<image>`` tokens for each tile (a newline after each row), then ``\\n<fake_token_around_image><global-img>`` + the
global tile's tokens + ``<fake_token_around_image>``; an image of one tile is the global part alone.

SmolVLM's processor cannot be built without torchvision (its video processor), and its image processor and that
expansion are Idefics3's; so both families load the PIL image processor alone and expand ``<image>`` here (the
tests check the expansion against ``Idefics3Processor``). The LM is ``model.model.text_model``, a Llama.
"""
from __future__ import annotations

import logging
import math

import torch

from .. import prompts
from ..errors import ConfigError
from .base import Backbone, Features, load_tokenizer, lowers, register

log = logging.getLogger(__name__)

FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"


def expand_image(rows: int, cols: int, seq_len: int) -> str:
    """The text an image of ``rows`` x ``cols`` tiles (0 x 0: not split) takes in place of ``<image>``."""
    tile = prompts.IMAGE * seq_len
    whole = f"{FAKE}{GLOBAL}{tile}{FAKE}"
    if not rows and not cols:
        return whole
    grid = "".join("".join(f"{FAKE}<row_{r}_col_{c}>{tile}" for c in range(1, cols + 1)) + "\n"
                   for r in range(1, rows + 1))
    return f"{grid}\n{whole}"


@register
class Idefics3Backbone(Backbone):
    model_types = ("idefics3",)
    chat_formats = (prompts.TEMPLATE,)
    reserved_tokens = (prompts.IMAGE, FAKE, GLOBAL)

    @classmethod
    def image_processor_class(cls):
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        return Idefics3ImageProcessorPil

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        return {"tokenizer": load_tokenizer(path, **hub_kwargs)[0],
                "image_processor": cls.image_processor_class().from_pretrained(path, **hub_kwargs)}

    def __init__(self, model, tokenizer, image_processor, *, chat_format: str | None = None, path: str = ""):
        super().__init__(model, tokenizer, image_processor, chat_format=chat_format, path=path)
        # tokens per tile: the model's (the processor config's image_seq_len must equal it); texts need none
        self.image_seq_len = model.model.image_seq_len if model is not None else None

    def limit_pixels(self, max_pixels: int) -> None:
        """Images are resized to a longest edge of whole tiles with at most ``max_pixels`` pixels in its square
        (``size["longest_edge"]``, never above the checkpoint's): at most ``(edge / tile)^2 + 1`` tiles of
        ``image_seq_len`` tokens. One tile (the global image alone, not split) is the least."""
        tile = self.image_processor.max_image_size["longest_edge"]
        size = dict(self.image_processor.size)
        if max_pixels < tile * tile:
            raise ConfigError(f"image_max_pixels {max_pixels} is below the model's minimum of {tile * tile} pixels "
                              f"(one {tile}x{tile} tile)")
        if lowers("image_max_pixels", max_pixels, size["longest_edge"] ** 2):
            edge = math.isqrt(max_pixels) // tile * tile
            log.info("image longest edge capped at %d px (was %d): at most %d x %d tiles", edge,
                     size["longest_edge"], edge // tile, edge // tile)
            self.image_processor.size = {**size, "longest_edge": edge}

    def prepare(self, text: str, image=None) -> Features:
        images = {}
        if image is not None:
            enc = self.image_processor(images=[[image]], return_row_col_info=True, return_tensors="pt")
            expansion = expand_image(enc["rows"][0][0], enc["cols"][0][0], self.image_seq_len)
            text = text.replace(prompts.IMAGE, expansion, 1)
            images = {k: enc[k] for k in ("pixel_values", "pixel_attention_mask")}
        return Features(self.tokenizer(text, return_tensors="pt")["input_ids"][0], images)

    def stack_images(self, images):
        """All tiles of the batch in one row of images, in item order (the model drops a row's padding images,
        which this needs none of); their features fill the ``<image>`` tokens in the same order."""
        return {k: torch.cat([im[k] for im in images], dim=1) for k in images[0]}


@register
class SmolVLMBackbone(Idefics3Backbone):
    model_types = ("smolvlm",)

    @classmethod
    def image_processor_class(cls):
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        return SmolVLMImageProcessorPil
