"""Prompts byte for byte as the official E5-V code writes them (its README, retrieval and STS evaluations)."""
import pytest

from e5v import prompts
from e5v.errors import ConfigError


def test_llama3_wrapper_and_retrieval_prompts_are_byte_exact():
    llama3 = ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n \n")
    assert prompts.LLAMA3_CHAT == llama3
    assert prompts.LLAMA3_CHAT.endswith("<|end_header_id|>\n\n \n")  # the extra " \n" after the assistant header
    assert prompts.TEXT == "<sent>\nSummary above sentence in one word: "  # trailing space
    assert prompts.IMAGE_PROMPT == "<image>\nSummary above image in one word: "
    assert prompts.STS == " <sent>\nSummary above sentence in one word:"  # leading space, no trailing space


def test_composed_prompts_keep_the_official_typos():
    q, c = prompts.composed_prompts("cirr")
    assert q == '<image>Modify this image with "<sent>", desribe modified image in one word:'
    assert c == "<image>\n Describe this image in one word:"
    q, c = prompts.composed_prompts("fashioniq-dress")
    assert q == ("<image> change the style of this dress to <sent>\n"
                 " Desribe this modified dress in one word based on its style:")
    assert c == "<image>\n Describe this dress in one word based on its style:"
    # toptee is prompted as "shirt" in the official code
    assert prompts.composed_prompts("fashioniq-toptee") == prompts.composed_prompts("fashioniq-shirt")
    with pytest.raises(ConfigError, match="cirr"):
        prompts.composed_prompts("fashioniq-hat")


def test_official_readme_strings_reproduced():
    """The README builds ``llama3_template.format(...)`` then replaces <sent>: the same string results."""
    sentence = "A dog sitting in the grass."
    want = ("<|start_header_id|>user<|end_header_id|>\n\nA dog sitting in the grass.\nSummary above sentence in one "
            "word: <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n")
    assert prompts.fill(prompts.LLAMA3_CHAT.format(prompts.TEXT), sentence) == want
    assert prompts.fill(prompts.IMAGE_PROMPT, "ignored") == prompts.IMAGE_PROMPT


def test_other_chat_formats():
    assert prompts.MISTRAL_CHAT.format("x") == "[INST] x [/INST]"
    assert prompts.QWEN_CHAT.format("x") == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert set(prompts.CHAT_FORMATS) == {"llama3", "mistral", "vicuna", "qwen", "raw"}
