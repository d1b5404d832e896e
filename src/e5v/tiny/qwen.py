"""Tiny Qwen2-VL and Qwen2.5-VL."""
from __future__ import annotations

import pathlib

from .common import PATCH, QWEN_STYLE, TEXT_DIMS, build_tokenizer


FAMILIES = ("qwen2-vl", "qwen2.5-vl")


def build(family: str, out: pathlib.Path) -> None:
    """Qwen2-VL / Qwen2.5-VL: model, tokenizer and PIL image processor (the full processor needs torchvision)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN_STYLE)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in QWEN_STYLE.specials}
    head_dim = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]
    text = dict(vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], **TEXT_DIMS,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2-vl":
        cls, cfg_cls = Qwen2VLForConditionalGeneration, Qwen2VLConfig
        vision.update(embed_dim=32, hidden_size=TEXT_DIMS["hidden_size"], mlp_ratio=2)
    else:
        cls, cfg_cls = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=TEXT_DIMS["hidden_size"],
                      window_size=4 * PATCH, fullatt_block_indexes=[1])
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    config = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                     video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                     vision_end_token_id=ids["<|vision_end|>"])
    cls(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}).save_pretrained(out)
