"""Tiny Idefics3 (Llama-3 LM, as HuggingFaceM4/Idefics3-8B-Llama3) and SmolVLM (SmolLM2 tokenizer conventions, as
HuggingFaceTB/SmolVLM2-*): SigLIP-style tower, pixel shuffle, images split into square tiles plus a global image.

Real geometry kept: the processor's longest edge is 4 tiles (Idefics3 4 x 364, SmolVLM 4 x 512), tiles are the tower's
image size, the pixel-shuffle scale factor (Idefics3 2, SmolVLM 4), LANCZOS resampling, mean/std 0.5, the special
tokens (``<fake_token_around_image>``, ``<image>``, ``<global-img>``, ``<row_1_col_1>`` .. ``<row_6_col_6>``,
``<end_of_utterance>``) and each model's chat template, verbatim: Idefics3's in ``chat_template.json`` alone, as older
processor checkpoints keep it (its tokenizer has none), SmolVLM's in ``chat_template.jinja``. Scaled down: 32 px
tiles (patches of 8 px for Idefics3, 4 px for SmolVLM, so 4 image tokens per tile), the tower and the LM sizes.
"""
from __future__ import annotations

import json
import pathlib

from .common import IMG, PATCH, TEXT_DIMS, TokenizerStyle, build_tokenizer, write_legacy_chat_template

FAMILIES = ("idefics3", "smolvlm")

_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                 *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))

#: HuggingFaceM4/Idefics3-8B-Llama3's chat template (as quoted by code that fine-tunes it; it renders what
#: transformers' test_processing_idefics3.py::test_apply_chat_template expects of that checkpoint): it writes BOS
#: itself, which the Llama-3 tokenizer adds too.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]"
    "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if "
    "line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
#: HuggingFaceTB/SmolVLM-256M-Instruct's chat_template.json, verbatim (SmolVLM2's differs at most by a video branch,
#: which E5-V prompts never reach): it writes ``<|im_start|>``, the tokenizer's bos_token, which SmolLM2 never adds.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

# Llama 3: BOS added by the tokenizer; pad is Idefics3Config's default pad id 128002 (<|reserved_special_token_0|>)
IDEFICS3_STYLE = TokenizerStyle(("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                 *_IMAGE_TOKENS), bos="<|begin_of_text|>", eos="<|end_of_text|>",
                                pad="<|reserved_special_token_0|>", chat_template=IDEFICS3_TEMPLATE)
# SmolLM2 (SmolVLM's tokenizer_config): bos <|im_start|> never added, eos <end_of_utterance>, pad <|im_end|>
SMOLVLM_STYLE = TokenizerStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>", *_IMAGE_TOKENS), bos=None,
                               eos="<end_of_utterance>", pad="<|im_end|>", unk="<|endoftext|>",
                               chat_template=SMOLVLM_TEMPLATE)


def build(family: str, out: pathlib.Path) -> None:
    """Idefics3: model + ``Idefics3Processor`` (PIL image processor) files. SmolVLM: model, tokenizer and PIL image
    processor; no processor config, because ``SmolVLMProcessor`` needs torchvision (its video processor)."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig,
                              SmolVLMConfig, SmolVLMForConditionalGeneration)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    smol = family == "smolvlm"
    tokenizer = build_tokenizer(SMOLVLM_STYLE if smol else IDEFICS3_STYLE)
    if smol:
        tokenizer.bos_token = "<|im_start|>"  # named, but not added (no post-processor), as in SmolLM2
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.convert_tokens_to_ids(
        "<|im_start|>" if smol else "<|begin_of_text|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_DIMS)
    vision = dict(image_size=IMG, patch_size=PATCH // 2 if smol else PATCH, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    scale = 4 if smol else 2
    cfg_cls, model_cls = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else (
        Idefics3Config, Idefics3ForConditionalGeneration)
    config = cfg_cls(text_config=text.to_dict(), vision_config=vision, scale_factor=scale,
                     image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model_cls(config).save_pretrained(out)
    images = dict(size={"longest_edge": 4 * IMG}, max_image_size={"longest_edge": IMG}, do_image_splitting=True,
                  image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=1)
    if smol:
        tokenizer.save_pretrained(out)
        SmolVLMImageProcessorPil(**images).save_pretrained(out)
    else:
        # the older layout of processor checkpoints: the chat template in chat_template.json alone (the tokenizer
        # has none), the image processor in preprocessor_config.json, processor_config.json the rest
        tokenizer.chat_template = None
        image_processor = Idefics3ImageProcessorPil(**images)
        Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                          image_seq_len=(IMG // PATCH) ** 2 // scale ** 2).save_pretrained(out)
        image_processor.save_pretrained(out)
        path = out / "processor_config.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "image_processor"},
                                   indent=2, sort_keys=True) + "\n")
        write_legacy_chat_template(out, IDEFICS3_TEMPLATE)
