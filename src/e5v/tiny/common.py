"""What every tiny checkpoint shares: the geometry of the tiny towers, the language model's size, and one
byte-level BPE tokenizer recipe whose special tokens and chat template differ per style."""
from __future__ import annotations

from dataclasses import dataclass

IMG, PATCH = 32, 8                                          # vision tower: 32 px images, 8 px patches
PINPOINTS = [[IMG, 2 * IMG], [2 * IMG, IMG], [2 * IMG, 2 * IMG]]
TEXT_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)
HEAD_DIM = TEXT_DIMS["hidden_size"] // TEXT_DIMS["num_attention_heads"]

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


def write_legacy_chat_template(out, template: str) -> None:
    """The processor's chat template as older checkpoints keep it: in ``chat_template.json`` alone (no
    ``chat_template.jinja``), where only a loader that reads the processor's files finds it."""
    import json
    import pathlib

    (pathlib.Path(out) / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
    (pathlib.Path(out) / "chat_template.jinja").unlink(missing_ok=True)


def randomise_zeros(model, std: float = 0.02) -> None:
    """Draw every weight matrix that transformers initialises to zeros (Gemma 3's projector, InternVL's class token
    and position embeddings) from N(0, std): with zeros, every image would embed alike and no image test could
    fail. Seeded by the caller, like the rest of the model."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=std)
