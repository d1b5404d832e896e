"""Tiny LLaVA-NeXT (Llama-3, Mistral, Vicuna), LLaVA-1.5 and the royokong/e5-v look-alike."""
from __future__ import annotations

import json
import pathlib

from .common import IMG, LLAMA3_STYLE, MISTRAL_STYLE, PATCH, PINPOINTS, TEXT_DIMS, VICUNA_STYLE, build_tokenizer


def text_config(kind: str, tokenizer, vocab_size: int | None = None):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if kind == "mistral" else LlamaConfig
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_DIMS, **extra)


FAMILIES = ("llava-next-llama3", "llava-next-mistral", "llava-next-vicuna", "llava-1.5", "e5v-like")


def build(family: str, out: pathlib.Path) -> None:
    """LLaVA-NeXT / LLaVA-1.5: CLIP tower + Llama/Mistral LM + a processor that expands ``<image>``."""
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    kind = {"llava-next-mistral": "mistral", "llava-next-vicuna": "vicuna", "llava-1.5": "vicuna"}.get(family, "llama3")
    style = {"mistral": MISTRAL_STYLE, "vicuna": VICUNA_STYLE, "llama3": LLAMA3_STYLE}[kind]
    tokenizer = build_tokenizer(style, image_token="<image>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    e5v_like = family == "e5v-like"
    vision = CLIPVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    common = dict(vision_config=vision, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  text_config=text_config(kind, tokenizer, vocab_size=image_id if e5v_like else None),
                  # royokong/e5-v keeps the Mistral llava value 32000, a normal in-range token, not <image>
                  image_token_index=image_id - 5 if e5v_like else image_id)
    size = dict(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})
    proc_kw = dict(tokenizer=tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=style.chat_template)
    if family == "llava-1.5":
        config = LlavaConfig(image_seq_length=(IMG // PATCH) ** 2, **common)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(**size), **proc_kw)
    else:
        config = LlavaNextConfig(image_grid_pinpoints=PINPOINTS, image_seq_length=(IMG // PATCH) ** 2, **common)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **size)
        processor = LlavaNextProcessor(image_processor=image_processor, **proc_kw)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if e5v_like:  # as in royokong/e5-v: no patch_size in the processor config, so expanding <image> fails
        path = out / "processor_config.json"
        cfg = json.loads(path.read_text())
        for key in ("patch_size", "vision_feature_select_strategy"):
            cfg.pop(key, None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
