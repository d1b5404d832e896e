"""Idefics3 and SmolVLM against the official formula (issue 15): the full model, one item at a time, fp32,
``hidden_states[-1][:, -1]``. The reference is written without e5v: for Idefics3 the HF ``Idefics3Processor``; for
SmolVLM (whose processor needs torchvision) its PIL image processor, the processor's own expansion function
(``processing_smolvlm.get_image_prompt_string``) and the tokenizer. Prompts are spelled out as each model's chat
template renders them (a BOS the Llama-3 template writes is the tokenizer's, added once)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer, Idefics3Processor
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

from e5v import E5V, prompts
from e5v.errors import ConfigError
from e5v.items import Item

from support import random_images
from support.families import assert_parity, check_family, official_vector, reference_vectors

FAMILIES = ("idefics3", "smolvlm")
#: the E5-V prompts (text, image, CIRR query) as each real chat template renders them, the tokenizer's BOS apart
RENDERED = {
    "idefics3": ("User: <sent>\nSummary above sentence in one word: <end_of_utterance>\nAssistant:",
                 "User:<image>\nSummary above image in one word: <end_of_utterance>\nAssistant:",
                 'User:<image>Modify this image with "<sent>", desribe modified image in one word:'
                 "<end_of_utterance>\nAssistant:"),
    "smolvlm": ("<|im_start|>User: <sent>\nSummary above sentence in one word: <end_of_utterance>\nAssistant:",
                "<|im_start|>User:<image>\nSummary above image in one word: <end_of_utterance>\nAssistant:",
                '<|im_start|>User:<image>Modify this image with "<sent>", desribe modified image in one word:'
                "<end_of_utterance>\nAssistant:"),
}


class Reference:
    """The official recipe for one item on the full model."""

    def __init__(self, path, family, longest_edge=None):
        """``longest_edge``: the image processor's size set to it (what ``image_max_pixels`` should do)."""
        self.family = family
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        if family == "idefics3":
            # built from its parts: on transformers 5.17 the auto classes do not resolve the PIL image processor
            settings = json.loads((Path(path) / "processor_config.json").read_text())
            self.processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil.from_pretrained(path),
                                               tokenizer=AutoTokenizer.from_pretrained(path),
                                               image_seq_len=settings["image_seq_len"])
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.image_processor = SmolVLMImageProcessorPil.from_pretrained(path)
            cfg = self.model.config.vision_config
            self.seq_len = (cfg.image_size // cfg.patch_size) ** 2 // self.model.config.scale_factor ** 2
        if longest_edge:
            self.image_processor_of().size = {"longest_edge": longest_edge}

    def image_processor_of(self):
        return self.processor.image_processor if self.family == "idefics3" else self.image_processor

    def inputs(self, text, image):
        if self.family == "idefics3":
            return self.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        extra = {}
        if image is not None:
            extra = self.image_processor(images=[[image]], return_row_col_info=True, return_tensors="pt")
            text = text.replace("<image>", get_image_prompt_string(
                extra.pop("rows")[0][0], extra.pop("cols")[0][0], self.seq_len, fake_token_around_image=
                "<fake_token_around_image>", image_token="<image>", global_image_token="<global-img>"))
        return {**self.tokenizer([text], return_tensors="pt"), **extra}

    def __call__(self, inner, text=None, image=None):
        prompt = dict(zip((prompts.TEXT, prompts.IMAGE_PROMPT, prompts.CIRR_QUERY), RENDERED[self.family]))[inner]
        prompt = prompt.replace("<sent>", text) if text is not None else prompt
        return official_vector(self.model, self.inputs(prompt, image))


@pytest.fixture(scope="module")
def refs(tiny_dirs):
    return {f: Reference(tiny_dirs[f], f) for f in FAMILIES}


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    return {f: E5V.from_pretrained(str(tiny_dirs[f]), device="cpu", dtype="float32") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_official_formula(family, refs, engines, mixed_images, monkeypatch):
    check_family(engines[family], refs[family], mixed_images, monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_the_chat_templates_byte_for_byte(family, engines):
    bb = engines[family].backbone
    assert bb.chat_format == prompts.TEMPLATE
    assert tuple(bb.render(p) for p in (prompts.TEXT, prompts.IMAGE_PROMPT, prompts.CIRR_QUERY)) == RENDERED[family]
    ids = engines[family].prepare(Item(text="A dog."), prompts.TEXT).input_ids.tolist()
    tok = bb.tokenizer
    # Idefics3: the Llama-3 tokenizer adds <|begin_of_text|> once; SmolVLM: <|im_start|> comes from the template
    start = "<|begin_of_text|>" if family == "idefics3" else "<|im_start|>"
    assert ids[0] == tok.convert_tokens_to_ids(start) and ids.count(ids[0]) == 1
    assert tok.decode(ids[1:]) == RENDERED[family][0].removeprefix(start).replace("<sent>", "A dog.")


def test_image_max_pixels_is_the_processors_longest_edge(tiny_dirs, engines):
    """A cap of 70x70 pixels: a longest edge of 64 (two 32-px tiles), as the HF processor with that size embeds
    the image; fewer image tokens than the checkpoint's 128."""
    path = str(tiny_dirs["idefics3"])
    capped = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=70 * 70)
    image = random_images(1, seed=3)[0].resize((120, 90))
    item = Item(image=image, name="x")
    n_full, n_capped = (len(m.prepare(item, prompts.IMAGE_PROMPT)) for m in (engines["idefics3"], capped))
    assert n_capped < n_full
    want = Reference(tiny_dirs["idefics3"], "idefics3", longest_edge=64)(prompts.IMAGE_PROMPT, None, image)
    np.testing.assert_allclose(capped.encode_image([image])[0], want, atol=1e-5)
    assert np.abs(engines["idefics3"].encode_image([image])[0] - want).max() > 1e-3
    assert capped.backbone.preprocessing_key() != engines["idefics3"].backbone.preprocessing_key()
    with pytest.raises(ConfigError, match="below the model's minimum of 1024 pixels"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=1000)


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_of_unsplit_images(family, tiny_dirs, mixed_images):
    """A budget of one tile: no image is split (rows = cols = 0), each is the global image alone, as the official
    formula with that longest edge embeds it (padded and packed)."""
    m = E5V.from_pretrained(str(tiny_dirs[family]), device="cpu", dtype="float32", image_max_pixels=32 * 32)
    tok = m.backbone.tokenizer
    for image in mixed_images:
        text = tok.decode(m.prepare(Item(image=image, name="x"), prompts.IMAGE_PROMPT).input_ids)
        assert "<row_1_col_1>" not in text and text.count("<global-img>") == 1
    want = reference_vectors(Reference(tiny_dirs[family], family, longest_edge=32), mixed_images)
    assert_parity(m, want, mixed_images)


def test_idefics3_checkpoint_keeps_its_template_in_chat_template_json(tiny_dirs):
    """The tiny Idefics3 has the older layout of real checkpoints: the template only in chat_template.json (its
    tokenizer has none), which the parity and prompt tests above then cover."""
    path = tiny_dirs["idefics3"]
    assert json.loads((path / "chat_template.json").read_text())["chat_template"]
    assert not (path / "chat_template.jinja").exists()
    for config in ("tokenizer_config.json", "processor_config.json"):
        assert not json.loads((path / config).read_text()).get("chat_template"), config


@pytest.mark.parametrize("size, tile, seq_len, want", [
    (1456, 364, 169, 13 * 169),  # HuggingFaceM4/Idefics3-8B-Llama3: 3 x 4 tiles + the global image
    (2048, 512, 64, 13 * 64),    # HuggingFaceTB/SmolVLM-256M/500M-Instruct, SmolVLM2-256M/500M-Video-Instruct
    (1536, 384, 81, 13 * 81),    # HuggingFaceTB/SmolVLM-Instruct (2.2B), SmolVLM2-2.2B-Instruct
])
def test_image_tokens_of_a_640x480_image_with_the_real_settings(size, tile, seq_len, want):
    """The counts of the backbone table (docs/backbones.md): the real checkpoints' processor settings."""
    from e5v.backbones.idefics3 import expand_image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": tile})
    enc = ip(images=[[Image.new("RGB", (640, 480))]], return_row_col_info=True)
    assert (enc["rows"][0][0], enc["cols"][0][0]) == (3, 4)
    assert expand_image(3, 4, seq_len).count("<image>") == want == len(enc["pixel_values"][0]) * seq_len
