"""The benchmark's model: the real llama3-llava-next-8b architecture (``llama3-llava-next-8b/config.json`` beside
this module, the one royokong/e5-v uses, shipped with the package) with random weights, and E5-V's processor
with a Llama-3-shaped tokenizer, all built offline. ``tiny=True`` keeps the real image geometry (336-px CLIP-L/14
tiles, AnyRes pinpoints, 128,320 vocabulary) with a narrow, shallow network, for CPU runs."""
from __future__ import annotations

import json
from pathlib import Path

CONFIG = Path(__file__).with_name("llama3-llava-next-8b") / "config.json"
#: Llama-3 special token ids (the real tokenizer's) and E5-V's ``<image>`` id, one past Llama-3's 128,256.
LLAMA3_SPECIALS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
                   "<|end_header_id|>": 128007, "<|eot_id|>": 128009, "<pad>": 128004}
IMAGE_TOKEN_ID = 128256
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def offline_tokenizer(vocab_size: int = 128320, image_id: int = IMAGE_TOKEN_ID):
    """A Llama-3-shaped fast tokenizer built offline: BOS added, no EOS, Llama-3's special ids, ``<image>``
    at ``image_id`` as in royokong/e5-v. Its ordinary tokens come from e5v.tiny's small byte-level BPE (any text
    tokenises, never to UNK); the ids in between are unused placeholders, so every id fits ``vocab_size``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from ..tiny import LLAMA3_STYLE, build_tokenizer

    small = build_tokenizer(LLAMA3_STYLE, image_token="<image>", vocab_size=2000)
    data = json.loads(small.backend_tokenizer.to_str())
    ids = {**LLAMA3_SPECIALS, "<image>": image_id}
    ordinary = sorted((i, t) for t, i in data["model"]["vocab"].items() if t not in ids)
    vocab = {t: k for k, (_, t) in enumerate(ordinary)}
    taken = set(ids.values())
    vocab.update({f"<|reserved_{k}|>": k for k in range(len(vocab), image_id) if k not in taken})
    vocab.update(ids)  # the specials live in the model vocabulary too, so their ids are kept on loading
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer ids reach {max(vocab.values())}, over the vocabulary of {vocab_size}")
    data["model"]["vocab"] = vocab
    for tok in data["added_tokens"]:
        tok["id"] = ids[tok["content"]]
    for spec in data["post_processor"]["special_tokens"].values():
        spec["ids"] = [ids[t] for t in spec["tokens"]]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
                                   padding_side="left", extra_special_tokens={"image_token": "<image>"})


def build_config(config_path=CONFIG, *, tiny: bool = False):
    """The ``LlavaNextConfig`` of a config.json (default: the shipped llama3-llava-next-8b one), with tiny widths
    if asked."""
    from transformers import LlavaNextConfig

    raw = json.loads(Path(config_path).read_text())
    if tiny:
        raw["text_config"].update(TINY_TEXT)
        raw["vision_config"].update(TINY_VISION)
    return LlavaNextConfig.from_dict(raw)


def build_backbone(config, *, device, dtype, attn_implementation: str = "sdpa"):
    """The model with random weights, made directly on ``device`` in ``dtype``, and E5-V's processor."""
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from ..backbones.llava import fix_processor_and_model
    from ..backbones.llava_next import LlavaNextBackbone

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype: no fp32 copy of 8 B weights
    try:
        with torch.device(device):
            model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    model.eval().requires_grad_(False)
    tile = config.vision_config.image_size
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, resample=3,
        image_grid_pinpoints=config.image_grid_pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=offline_tokenizer(
        config.text_config.vocab_size, config.image_token_id), patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
    fix_processor_and_model(processor, model)
    return LlavaNextBackbone(model, processor, chat_format="llama3", path=f"random {config.model_type}")
