"""Qwen3-VL (``model_type: qwen3_vl``) on Qwen2-VL's path (:mod:`.qwen2_vl`): the same PIL image processor with
16-px patches (one ``<|image_pad|>`` per 2x2 merged patch: 300 for a 640x480 image), M-RoPE positions from the
model's own ``get_rope_index`` (interleaved sections, also for packed rows), and DeepStack: transformers adds the
vision tower's intermediate features to the first language-model layers at the image-token positions by itself, for
padded and packed rows alike. Qwen3-VL's chat template has no default system turn, so "template" and the hand-written
"qwen" format render the same prompts."""
from __future__ import annotations

from .base import register
from .qwen2_vl import QwenVLBackbone


@register
class Qwen3VLBackbone(QwenVLBackbone):
    model_types = ("qwen3_vl",)
    chat_formats = ("template", "qwen")
