"""Tiny Qwen2-VL and Qwen2.5-VL, and the Qwen-VL config they share with the tiny Qwen3-VL (:mod:`.qwen3ov`)."""
from __future__ import annotations

import pathlib

from .common import HEAD_DIM, PATCH, QWEN_STYLE, TEXT_DIMS, build_tokenizer


FAMILIES = ("qwen2-vl", "qwen2.5-vl")

#: M-RoPE's split of the rotary half-dimensions into time, height and width (real, of 64: Qwen2-VL [16, 24, 24],
#: Qwen3-VL [24, 20, 20]); the tiny ones keep Qwen2-VL's proportions for both: [2, 3, 3] of 8
MROPE_SECTION = [HEAD_DIM // 8, 3 * HEAD_DIM // 16, 3 * HEAD_DIM // 16]


def qwen_vl_config(cfg_cls, tokenizer, vision: dict, *, rope_theta: float, **rope):
    """A Qwen-VL config (``cfg_cls``) for a tokenizer with :data:`~.common.QWEN_STYLE`'s special tokens: the tiny
    language model with M-RoPE (``rope``: more rope parameters) and no BOS, ``vision``, and the image token ids."""
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in QWEN_STYLE.specials}
    assert sum(MROPE_SECTION) == HEAD_DIM // 2
    text = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], head_dim=HEAD_DIM, **TEXT_DIMS,
                rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": MROPE_SECTION,
                                 **rope})
    return cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                   video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                   vision_end_token_id=ids["<|vision_end|>"])


def build(family: str, out: pathlib.Path) -> None:
    """Qwen2-VL / Qwen2.5-VL: model, tokenizer and PIL image processor (the full processor needs torchvision)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_STYLE)
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2-vl":
        cls, cfg_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision.update(embed_dim=32, hidden_size=TEXT_DIMS["hidden_size"], mlp_ratio=2)
    else:
        cls, cfg_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_DIMS["hidden_size"],
                      window_size=4 * PATCH, fullatt_block_indexes=[1])
    cls(qwen_vl_config(cfg_cls, tokenizer, vision, rope_theta=1e4)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}).save_pretrained(out)
