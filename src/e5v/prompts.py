"""Task prompts and chat formats of E5-V, as plain strings, byte for byte as the official code uses them.

Placeholders: ``<sent>`` is replaced by the input text, ``<image>`` marks where the image goes (each backbone
swaps it for its own image token).  Chat formats take the inner prompt through ``str.format`` (one ``{}``).
Sources: the official E5-V code's README, its retrieval evaluation and its STS evaluation.
"""
from __future__ import annotations

SENT = "<sent>"
IMAGE = "<image>"

# --- chat formats (the user turn wrapped around the inner prompt) -------------------------------------------
#: Llama-3 chat format of E5-V (README ``llama3_template``): no system turn, and an extra " \n" after the
#: assistant header. BOS is added by the tokenizer; no EOS.
LLAMA3_CHAT = ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n \n")
#: LLaVA-1.6-Mistral as E5-V ran it (paper App. C): ``[INST] {} [/INST]``.
MISTRAL_CHAT = "[INST] {} [/INST]"
#: Vicuna v1 conversation format of LLaVA-1.5 and llava-v1.6-vicuna (no system prompt).
VICUNA_CHAT = "USER: {} ASSISTANT:"
#: Qwen2-VL / Qwen2.5-VL ChatML user turn followed by the assistant header (no system turn).
QWEN_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

#: No chat turn: the prompt as it is (after the tokenizer's BOS). The paper's "Last" ablation embeds the raw input.
RAW_CHAT = "{}"

CHAT_FORMATS = {"llama3": LLAMA3_CHAT, "mistral": MISTRAL_CHAT, "vicuna": VICUNA_CHAT, "qwen": QWEN_CHAT,
                "raw": RAW_CHAT}
#: Not a format string: the checkpoint's own chat template renders the user turn (one user message whose content
#: is the prompt's parts, ``<image>`` as an image part, then the generation prompt), byte for byte as
#: ``apply_chat_template`` writes it. The default of the families E5-V did not use; any family with a template can.
TEMPLATE = "template"

# --- task prompts (inner text) ------------------------------------------------------------------------------
#: Text prompt of the README and the retrieval evaluation (trailing space included).
TEXT = "<sent>\nSummary above sentence in one word: "
#: Image prompt of the README and the retrieval evaluation; also used for the rendered captions of I2I retrieval.
IMAGE_PROMPT = "<image>\nSummary above image in one word: "
#: Prompt of the STS evaluation: a leading space, no trailing space.
STS = " <sent>\nSummary above sentence in one word:"
#: CIRR query (reference image + modification text) of the retrieval evaluation; the typo "desribe" is evaluated as is.
CIRR_QUERY = '<image>Modify this image with "<sent>", desribe modified image in one word:'
#: CIRR candidate (gallery) image prompt of the retrieval evaluation.
CIRR_CANDIDATE = "<image>\n Describe this image in one word:"
#: FashionIQ query; ``{category}`` is dress or shirt (toptee is prompted as shirt). Typo "Desribe" kept.
FASHIONIQ_QUERY = ("<image> change the style of this {category} to <sent>\n"
                   " Desribe this modified {category} in one word based on its style:")
#: FashionIQ candidate image prompt.
FASHIONIQ_CANDIDATE = "<image>\n Describe this {category} in one word based on its style:"

# Ablation variants of the paper (Table 6): the raw input ("Last") and the prompt without "in one word".
TEXT_LAST = "<sent>"
IMAGE_LAST = "<image>"
TEXT_NO_ONE_WORD = "<sent> Summary above sentence:"
IMAGE_NO_ONE_WORD = "<image> Summary above image:"

#: FashionIQ categories and the word the official prompt uses for each.
FASHIONIQ_WORD = {"dress": "dress", "shirt": "shirt", "toptee": "shirt"}


def composed_prompts(task: str) -> tuple[str, str]:
    """(query prompt, candidate prompt) of a composed-retrieval task: ``cirr`` or ``fashioniq-<category>``."""
    if task == "cirr":
        return CIRR_QUERY, CIRR_CANDIDATE
    if task.startswith("fashioniq-") and task[len("fashioniq-"):] in FASHIONIQ_WORD:
        word = FASHIONIQ_WORD[task[len("fashioniq-"):]]
        return FASHIONIQ_QUERY.format(category=word), FASHIONIQ_CANDIDATE.format(category=word)
    from .errors import ConfigError

    tasks = ["cirr"] + [f"fashioniq-{c}" for c in FASHIONIQ_WORD]
    raise ConfigError(f"unknown composed task {task!r}; expected one of {', '.join(tasks)}")


def image_prompt(task: str | None = None) -> str:
    """The prompt of an image alone: the gallery (candidate) prompt of a composed task, else the E5-V image prompt."""
    return composed_prompts(task)[1] if task else IMAGE_PROMPT


def fill(prompt: str, text: str | None) -> str:
    """Put ``text`` in place of ``<sent>`` (plain replace, as the official code does)."""
    if SENT in prompt:
        return prompt.replace(SENT, text if text is not None else "")
    return prompt
