"""Tiny random checkpoints of every supported backbone family, built offline in a fraction of a second.

They are saved with ``save_pretrained`` and so load back through ``from_pretrained`` exactly like a real
checkpoint directory: the test suite, the CI smoke test of ``e5v embed`` and offline users all get the real
loading code path without a hub download. The weights are random, so the embeddings mean nothing.

Every family shares one byte-level BPE tokenizer recipe (no text yields UNK) and differs only in its special
tokens, its chat template and its model config. Chat templates take ``content`` as a string or as a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts and never write BOS: the tokenizer adds it.

CLI: ``python -m e5v.tiny FAMILY OUT_DIR [--seed N]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FAMILIES = ("llava-next-llama3", "llava-next-mistral", "llava-next-vicuna", "llava-1.5", "qwen2-vl", "qwen2.5-vl",
            "e5v-like")

IMG, PATCH = 32, 8                                          # vision tower: 32 px images, 8 px patches
PINPOINTS = [[IMG, 2 * IMG], [2 * IMG, IMG], [2 * IMG, 2 * IMG]]
TEXT_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)

# Fixed corpus: E5-V prompts and everyday words, so the BPE merges look like real sub-words.
_CORPUS = [
    "Summary above sentence in one word:", "Summary above image in one word:", "Describe this image in one word",
    "Modify this image with", "change the style of this dress", "change the style of this shirt",
    "A man is playing a guitar.", "Someone plays an instrument.", "A woman is slicing an onion.",
    "Two children are playing soccer on the grass in the sun.", "The stock market fell today.",
    "A dog runs across the park with a red ball.", "a cat sleeps on the sofa", "photo of a small house by the sea",
    "the quick brown fox jumps over the lazy dog", "What is in the picture? Answer in one word.",
    "user assistant system USER: ASSISTANT: [INST] [/INST]", "red green blue black white yellow color",
    "water food car tree city people time day night year world",
]

# Jinja for one message's content: a plain string, or a list of image / text parts.
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}")


def _chat_template(turn: str, generation: str, image: str) -> str:
    """Build a chat template from one turn (with ``{content}``), the generation prompt and the image placeholder."""
    body = turn.replace("{content}", _CONTENT.replace("IMAGE", image))
    return "{% for m in messages %}" + body + "{% endfor %}{% if add_generation_prompt %}" + generation + "{% endif %}"


@dataclass(frozen=True)
class TokenizerStyle:
    """A tokenizer style: special tokens (in id order), which are BOS/EOS/pad, and the chat template."""

    specials: tuple
    bos: str | None
    eos: str
    pad: str
    chat_template: str
    unk: str | None = None


LLAMA3_STYLE = TokenizerStyle(
    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"),
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<pad>",
    chat_template=_chat_template("<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{content}<|eot_id|>",
                                 "<|start_header_id|>assistant<|end_header_id|>\n\n", "<image>\n"))
MISTRAL_STYLE = TokenizerStyle(  # like llava-v1.6-mistral: [INST] / [/INST] are plain text, not special tokens
    ("<unk>", "<s>", "</s>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
    chat_template=_chat_template("{% if m['role'] == 'user' %}[INST] {content} [/INST]"
                                 "{% else %} {content}{{ eos_token }}{% endif %}", "", "<image>\n"))
VICUNA_STYLE = TokenizerStyle(
    ("<unk>", "<s>", "</s>", "<pad>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
    chat_template=_chat_template("{{ m['role'] | upper }}: {content} ", "ASSISTANT:", "<image>\n"))
QWEN_STYLE = TokenizerStyle(  # Qwen adds no BOS; unlike the real template, no default system message
    ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
     "<|video_pad|>"), bos=None, eos="<|im_end|>", pad="<|endoftext|>",
    chat_template=_chat_template("<|im_start|>{{ m['role'] }}\n{content}<|im_end|>\n", "<|im_start|>assistant\n",
                                 "<|vision_start|><|image_pad|><|vision_end|>"))


def build_tokenizer(style: TokenizerStyle, image_token: str | None = None, vocab_size: int = 500, corpus=None):
    """Train a byte-level BPE on ``corpus`` (default: the fixed one) and wrap it as a left-padding fast tokenizer.

    ``image_token`` is added after training, so it is the last id (as in llava-hf checkpoints, where it sits
    on top of the base vocabulary); the E5-V quirk of an image id one past the embedding relies on that.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus or _CORPUS * 4, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(style.specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))             # all 256 bytes: never UNK
    extra = {}
    if image_token:
        tok.add_special_tokens([image_token])
        extra["extra_special_tokens"] = {"image_token": image_token}
    if style.bos:  # BOS through the post-processor, EOS never (llama / llama3 / mistral behaviour)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A", pair=f"{style.bos} $A $B",
            special_tokens=[(style.bos, tok.token_to_id(style.bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=style.bos, eos_token=style.eos,
                                   pad_token=style.pad, unk_token=style.unk, padding_side="left",
                                   chat_template=style.chat_template, **extra)


def _text_config(kind: str, tokenizer, vocab_size: int | None = None):
    from transformers import LlamaConfig, MistralConfig

    cls = MistralConfig if kind == "mistral" else LlamaConfig
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(vocab_size=vocab_size or len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_DIMS, **extra)


def _build_llava(family: str, out: pathlib.Path) -> None:
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
                  text_config=_text_config(kind, tokenizer, vocab_size=image_id if e5v_like else None),
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


def _build_qwen(family: str, out: pathlib.Path) -> None:
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


def build_tiny_checkpoint(family: str, out_dir, *, seed: int = 0) -> pathlib.Path:
    """Build a tiny random checkpoint of ``family`` into ``out_dir`` and return its path.

    Same seed, same bit-identical weights and tokenizer files. Families:

    - ``llava-next-llama3`` / ``-mistral`` / ``-vicuna``: ``LlavaNextForConditionalGeneration`` +
      ``LlavaNextProcessor``.
    - ``llava-1.5``: ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (PIL CLIP image processor).
    - ``qwen2-vl`` / ``qwen2.5-vl``: model + tokenizer + ``Qwen2VLImageProcessorPil``; no processor config,
      because ``Qwen2VLProcessor`` cannot be built without torchvision.
    - ``e5v-like``: the llava-next-llama3 build with royokong/e5-v's quirks, which a loader must repair:
      (1) the ``<image>`` id equals ``text_config.vocab_size`` (one past the embedding matrix);
      (2) ``config.image_token_index`` is a wrong, in-range id (``<image>`` id - 5), not ``<image>``;
      (3) ``processor_config.json`` lacks ``patch_size`` and ``vision_feature_select_strategy``, so a plain
      ``LlavaNextProcessor.from_pretrained`` has ``patch_size=None``.
    """
    import torch
    from transformers.utils import logging as hf_logging

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard-writing bar per tiny file is noise
    try:
        torch.manual_seed(seed)
        (_build_qwen if family.startswith("qwen") else _build_llava)(family, out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    logger.info("built tiny %s checkpoint (seed %d) in %s", family, seed, out)
    return out


def main(argv=None) -> None:
    """``python -m e5v.tiny FAMILY OUT_DIR``: write a tiny checkpoint and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m e5v.tiny", description=main.__doc__)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_checkpoint(args.family, args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
