"""Tiny Qwen3-VL and LLaVA-OneVision (Qwen2 language model, as llava-hf/llava-onevision-qwen2-*-ov-hf).

Real processor geometry, smaller towers and images:

- ``qwen3-vl``: ``Qwen2VLImageProcessorPil`` with Qwen3-VL's settings (16-px patches, 2x2 merge, temporal patch 2,
  mean/std 0.5); only the pixel budget is scaled: 32x32 to 128x128 px (1 to 64 image tokens) instead of 256x256 to
  4096x4096. Vision tower: 2 blocks, DeepStack features from both into the first 2 LM layers (Qwen3-VL-2B: 24 blocks,
  3 DeepStack layers); 16 learned position embeddings (4x4, interpolated) instead of 2304; interleaved M-RoPE.
- ``llava-onevision``: ``LlavaOnevisionImageProcessorPil`` with the real grid, 1x1 to 6x6 tiles, scaled from 384-px
  to 32-px tiles; SigLIP tower with 8-px patches (4x4 = 16 features per tile instead of 27x27 = 729), features of
  the last layer ("full"), "anyres_max_9". The files mimic the llava-hf layout: the tokenizer config keeps the text
  model's template (Qwen2-Instruct's), ``chat_template.json`` holds the processor's, ``processor_config.json`` its
  settings; the processor itself cannot be saved here (its video processor needs torchvision).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from .common import IMG, PATCH, QWEN_STYLE, TEXT_DIMS, TokenizerStyle, build_tokenizer, write_legacy_chat_template
from .qwen import qwen_vl_config

FAMILIES = ("qwen3-vl", "llava-onevision")

#: Qwen/Qwen3-VL-2B-Instruct's chat template (chat_template.json), verbatim: the user turn has no default system
#: message, an image part is ``<|vision_start|><|image_pad|><|vision_end|>``.
QWEN3_VL_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

#: llava-hf/llava-onevision-qwen2-*-ov-hf's chat template (chat_template.json, written by transformers'
#: convert_llava_onevision_weights_to_hf.py): a message's images first (``<image>\n`` each), then its texts.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
#: Qwen/Qwen2-0.5B-Instruct's template, which the llava-hf OneVision tokenizer configs keep (text only, with a
#: default system message): a loader must render with the processor's template instead.
QWEN2_TEXT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN3_VL_STYLE = dataclasses.replace(QWEN_STYLE, chat_template=QWEN3_VL_TEMPLATE)
ONEVISION_STYLE = TokenizerStyle(  # Qwen2-Instruct's specials; <image> is added on top, <video> is one of these
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<video>"), bos=None, eos="<|im_end|>", pad="<|endoftext|>",
    chat_template=QWEN2_TEXT_TEMPLATE)
#: Qwen3-VL's image processor settings, the pixel budget scaled down (real: 65536 to 16777216 pixels)
QWEN3_VL_PIXELS = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
#: LLaVA-OneVision's grid of 1x1 to 6x6 tiles (real: 384-px tiles, 384x384 to 2304x2304)
ONEVISION_PINPOINTS = [[IMG * rows, IMG * cols] for rows in range(1, 7) for cols in range(1, 7)]


def build(family: str, out: pathlib.Path) -> None:
    """Qwen3-VL: model, tokenizer, PIL image processor. LLaVA-OneVision: the same plus the processor's files."""
    if family == "qwen3-vl":
        _build_qwen3_vl(out)
    else:
        _build_onevision(out)


def _build_qwen3_vl(out: pathlib.Path) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(QWEN3_VL_STYLE)
    # real: head_dim 128, rope_theta 5e6, interleaved M-RoPE
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=TEXT_DIMS["hidden_size"], num_position_embeddings=16,
                  deepstack_visual_indexes=[0, 1])
    config = qwen_vl_config(Qwen3VLConfig, tokenizer, vision, rope_theta=5e6, mrope_interleaved=True)
    Qwen3VLForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, size=QWEN3_VL_PIXELS,
                             image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)


def _build_onevision(out: pathlib.Path) -> None:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tokenizer = build_tokenizer(ONEVISION_STYLE, image_token="<image>")
    image_id, video_id = tokenizer.convert_tokens_to_ids(["<image>", "<video>"])
    text = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **TEXT_DIMS)
    vision = SiglipVisionConfig(image_size=IMG, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=image_id,
                                  video_token_index=video_id, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=ONEVISION_PINPOINTS)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": IMG, "width": IMG}, image_grid_pinpoints=ONEVISION_PINPOINTS,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    # what LlavaOnevisionProcessor.save_pretrained writes (it cannot be built without torchvision)
    settings = {"image_token": "<image>", "num_image_tokens": (IMG // PATCH) ** 2, "processor_class":
                "LlavaOnevisionProcessor", "video_token": "<video>", "vision_aspect_ratio": "anyres_max_9",
                "vision_feature_select_strategy": "full"}
    (out / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    write_legacy_chat_template(out, ONEVISION_TEMPLATE)
    # as on the hub (saved by transformers 4.x): the tokenizer's template inside tokenizer_config.json
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": QWEN2_TEXT_TEMPLATE}, indent=2) + "\n")
