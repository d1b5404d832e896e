"""Tiny Gemma 3 (as google/gemma-3-4b-it) and InternVL (as OpenGVLab/InternVL3-1B-hf).

Real processor geometry, scaled where it allows:

- ``gemma3``: ``Gemma3Processor`` with the PIL ``Gemma3ImageProcessorPil`` (square resize, mean/std 0.5, pan-and-scan
  off as in the real config), SigLIP patches of 14 px average-pooled 4x4 into the soft image tokens, each image
  ``\\n\\n<start_of_image>`` + soft tokens + ``<end_of_image>\\n\\n``. Scaled: 224 px instead of 896, so 16 image tokens
  instead of 256; a 2-layer LM with one sliding-window layer (window 16 instead of 1024) and one global layer.
- ``internvl``: the PIL ``GotOcr2ImageProcessorPil`` (ImageNet mean/std, at most 12 tiles plus a thumbnail, as the
  real config), InternViT patches of 14 px and a 0.5 pixel shuffle, each image ``<img>`` + ``<IMG_CONTEXT>`` per token
  + ``</img>``, a Qwen2 LM. Scaled: 56-px tiles instead of 448, so 4 tokens a tile instead of 256. No processor
  config: ``InternVLProcessor`` cannot be built without torchvision (its video processor needs it).

The chat templates are the real checkpoints' (sources at each constant). The named special tokens these processors
read from the tokenizer (``boi_token``, ``context_image_token``, ...) are written into ``tokenizer_config.json`` as
the real checkpoints have them.
"""
from __future__ import annotations

import json
import pathlib

from .common import HEAD_DIM, TEXT_DIMS, TokenizerStyle, build_tokenizer, randomise_zeros

FAMILIES = ("gemma3", "internvl")

#: google/gemma-3-4b-it chat_template.json (also in transformers' tests/models/gemma3/test_processing_gemma3.py):
#: writes BOS, trims every text part, ``<start_of_image>`` for an image part.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

#: OpenGVLab/InternVL3-*-hf chat template (transformers' models/internvl/convert_internvl_weights_to_hf.py writes it):
#: ChatML without a system turn, ``<IMG_CONTEXT>\n`` for an image part.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")

# Special tokens in the real id order (Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3; the image soft token last).
GEMMA3_STYLE = TokenizerStyle(
    ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"),
    bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", chat_template=GEMMA3_TEMPLATE)
INTERNVL_STYLE = TokenizerStyle(  # Qwen2.5's tokenizer (no BOS) with InternVL's image tokens
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=INTERNVL_TEMPLATE)

GEMMA3_IMG, GEMMA3_TOKENS = 224, 16          # 224 / 14 = 16 patches a side, pooled 4x4: 4 x 4 image tokens
INTERNVL_TILE = 56                           # 56 / 14 = 4 patches a side, pixel shuffle 0.5: 2 x 2 tokens a tile


def _tokenizer(style: TokenizerStyle, out: pathlib.Path, named: dict[str, str], image_token: str | None = None):
    """Save the tokenizer with the processor's named special tokens in its config, and load it back."""
    from transformers import AutoTokenizer

    build_tokenizer(style, image_token=image_token).save_pretrained(out)
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **named}, indent=2, sort_keys=True) + "\n")
    return AutoTokenizer.from_pretrained(out)


def build(family: str, out: pathlib.Path) -> None:
    """Gemma 3: model + ``Gemma3Processor``. InternVL: model + tokenizer + PIL GotOcr2 image processor."""
    (_gemma3 if family == "gemma3" else _internvl)(out)


def _gemma3(out: pathlib.Path) -> None:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer(GEMMA3_STYLE, out, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
                     image_token="<image_soft_token>")
    text = Gemma3TextConfig(vocab_size=len(tok), **TEXT_DIMS, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(image_size=GEMMA3_IMG, patch_size=14, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=GEMMA3_TOKENS,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                          image_token_index=tok.image_token_id)
    model = Gemma3ForConditionalGeneration(config)
    randomise_zeros(model, config.initializer_range)
    model.save_pretrained(out)
    image_processor = Gemma3ImageProcessorPil(size={"height": GEMMA3_IMG, "width": GEMMA3_IMG}, image_mean=[0.5] * 3,
                                              image_std=[0.5] * 3)
    Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
                    image_seq_length=GEMMA3_TOKENS).save_pretrained(out)


def _internvl(out: pathlib.Path) -> None:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = _tokenizer(INTERNVL_STYLE, out, {"start_image_token": "<img>", "end_image_token": "</img>",
                                           "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    text = Qwen2Config(vocab_size=len(tok), **TEXT_DIMS, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    vision = InternVLVisionConfig(image_size=INTERNVL_TILE, patch_size=14, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2)
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=tok.context_image_token_id,
                            image_seq_length=(INTERNVL_TILE // 14) ** 2 // 4, downsample_ratio=0.5,
                            vision_feature_layer=-1)
    model = InternVLForConditionalGeneration(config)
    randomise_zeros(model, config.text_config.initializer_range)
    model.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, min_patches=1, max_patches=12,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
