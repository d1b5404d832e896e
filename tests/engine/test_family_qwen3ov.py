"""Qwen3-VL and LLaVA-OneVision against their official formula (issue 15).

Neither processor can be built without torchvision (their video processors need it), so the references are written
without e5v from the checkpoint's parts: the processor's chat template (OneVision's from ``chat_template.json``: the
llava-hf tokenizer config keeps the text model's), the PIL image processor and the processor's expansion rule
written out (Qwen3-VL: one ``<|image_pad|>`` per 2x2 merged 16-px patch; OneVision:
``LlavaOnevisionProcessor._get_number_of_features``). Then the full model on one item, ``hidden_states[-1][:, -1]``,
L2-normalised, fp32.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer, LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from e5v import E5V, prompts
from e5v.errors import ConfigError, ModelLoadError
from e5v.items import Item

from support.families import CIRR_INNER, IMAGE_INNER, TEXT_INNER, check_family, messages, official_vector

FAMILIES = ("qwen3-vl", "llava-onevision")

# The E5-V prompts as the real templates render them (Qwen/Qwen3-VL-*-Instruct: ChatML without a system turn;
# llava-hf/llava-onevision-qwen2-*-ov-hf: a message's images first, "<image>\n" each, then its text parts).
RENDERED = {
    "qwen3-vl": {
        TEXT_INNER: "<|im_start|>user\n<sent>\nSummary above sentence in one word: <|im_end|>\n<|im_start|>assistant\n",
        IMAGE_INNER: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nSummary above image in one word: "
                     "<|im_end|>\n<|im_start|>assistant\n",
        CIRR_INNER: '<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Modify this image with "<sent>", '
                    "desribe modified image in one word:<|im_end|>\n<|im_start|>assistant\n"},
    "llava-onevision": {
        TEXT_INNER: "<|im_start|>user\n<sent>\nSummary above sentence in one word: <|im_end|>\n<|im_start|>assistant\n",
        IMAGE_INNER: "<|im_start|>user\n<image>\n\nSummary above image in one word: <|im_end|>\n"
                     "<|im_start|>assistant\n",
        CIRR_INNER: '<|im_start|>user\n<image>\nModify this image with "<sent>", desribe modified image in one word:'
                    "<|im_end|>\n<|im_start|>assistant\n"},
}


def onevision_image_tokens(image_processor, height, width, num_image_tokens=729, max_tiles=9):
    """``LlavaOnevisionProcessor._get_number_of_features`` itself, on a stand-in for the processor (which cannot be
    built without torchvision): what it reads of the processor, and its own ``_get_unpadded_features``."""
    stub = SimpleNamespace(image_processor=image_processor, num_image_tokens=num_image_tokens,
                           vision_aspect_ratio=f"anyres_max_{max_tiles}")
    stub._get_unpadded_features = partial(LlavaOnevisionProcessor._get_unpadded_features, stub)
    tile = image_processor.size["height"]
    return LlavaOnevisionProcessor._get_number_of_features(stub, height, width, tile, tile)


class Reference:
    def __init__(self, path, family):
        self.family = family
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(path)
        if family == "qwen3-vl":
            self.imgp = Qwen2VLImageProcessorPil.from_pretrained(path)
            self.template = self.tok.chat_template
        else:
            self.imgp = LlavaOnevisionImageProcessorPil.from_pretrained(path)
            self.template = json.loads((path / "chat_template.json").read_text())["chat_template"]
            self.settings = json.loads((path / "processor_config.json").read_text())

    def inputs(self, inner, text=None, image=None):
        s = self.tok.apply_chat_template(messages(inner, text), chat_template=self.template, tokenize=False,
                                         add_generation_prompt=True)
        if image is None:
            return self.tok([s], return_tensors="pt")
        if self.family == "qwen3-vl":
            extra = dict(self.imgp(images=[image], return_tensors="pt"))
            s = s.replace("<|image_pad|>", "<|image_pad|>" * (int(extra["image_grid_thw"].prod()) // 4))
            enc = self.tok([s], return_tensors="pt")
            # M-RoPE positions need the image-token positions (the processor returns them)
            return {**enc, **extra, "mm_token_type_ids": (enc["input_ids"] == self.model.config.image_token_id).int()}
        px = self.imgp(images=[image], return_tensors="pt")
        n = onevision_image_tokens(self.imgp, *px["image_sizes"][0].tolist(), self.settings["num_image_tokens"],
                                   int(self.settings["vision_aspect_ratio"].removeprefix("anyres_max_")))
        enc = self.tok([s.replace("<image>", "<image>" * n)], return_tensors="pt")
        return {**enc, "pixel_values": px["pixel_values"], "image_sizes": px["image_sizes"]}

    def embed(self, inner, text=None, image=None):
        return official_vector(self.model, self.inputs(inner, text, image))


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    return {f: E5V.from_pretrained(str(tiny_dirs[f]), device="cpu", dtype="float32") for f in FAMILIES}


@pytest.fixture(scope="module")
def big_image():
    """190x150 px: a 5x6 grid of 32-px tiles on the tiny OneVision, past anyres_max_9, so the model shrinks it."""
    return Image.fromarray(np.random.default_rng(5).integers(0, 255, (150, 190, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_official_formula(family, tiny_dirs, engines, mixed_images, big_image, monkeypatch):
    images = mixed_images + [big_image]
    check_family(engines[family], Reference(tiny_dirs[family], family).embed, images, monkeypatch)


def test_onevision_big_image_is_shrunk_to_anyres_max_9(tiny_dirs, big_image):
    """The parity above covers the model's shrinking: the big image's features are fewer than its grid's."""
    ip = LlavaOnevisionImageProcessorPil.from_pretrained(tiny_dirs["llava-onevision"])
    capped = onevision_image_tokens(ip, 150, 190, 16)
    uncapped = onevision_image_tokens(ip, 150, 190, 16, max_tiles=100)
    assert (capped, uncapped) == (16 + 10 * 13 + 10, 16 + 18 * 24 + 18)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_render_as_the_real_template_does(family, tiny_dirs, engines, mixed_images):
    bb = engines[family].backbone
    assert bb.chat_format == "template"
    for inner, want in RENDERED[family].items():
        assert bb.render(inner) == want
    if family == "qwen3-vl":  # no system turn: the hand-written qwen format is the same
        qwen = type(bb).for_text(str(tiny_dirs[family]), chat_format="qwen")
        assert all(qwen.render(inner) == want for inner, want in RENDERED[family].items())
    ids = engines[family].prepare(Item(image=mixed_images[0], name="x"), prompts.IMAGE_PROMPT).input_ids.tolist()
    tok = bb.tokenizer
    assert tok.bos_token_id is None and ids[-1] != tok.eos_token_id
    assert tok.decode(ids).endswith("in one word: <|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_vl_pixel_budget_gives_fewer_image_tokens(tiny_dirs, engines):
    path, full = str(tiny_dirs["qwen3-vl"]), engines["qwen3-vl"]
    capped = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=64 * 64)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    item = Item(image=image, name="x")
    # 120x90 -> 128x96 px, 8x6 patches, 12 tokens; capped: 64x32 px, 4x2 patches, 2 tokens
    assert len(full.prepare(item, prompts.IMAGE_PROMPT)) - len(capped.prepare(item, prompts.IMAGE_PROMPT)) == 10
    assert np.abs(capped.encode_image([image]) - full.encode_image([image])).max() > 1e-3
    with pytest.raises(ConfigError, match="below the model's minimum"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=32 * 32 - 1)


def test_qwen3_vl_pixel_budget_above_the_checkpoints_changes_nothing(tiny_dirs, engines, big_image, caplog):
    """The budget only lowers the checkpoint's 128x128 px: a 190x150 image is resized to it either way."""
    path, full = str(tiny_dirs["qwen3-vl"]), engines["qwen3-vl"]
    with caplog.at_level("WARNING", logger="e5v"):
        above = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=4 * 128 * 128)
    item = Item(image=big_image, name="x")
    assert len(above.prepare(item, prompts.IMAGE_PROMPT)) == len(full.prepare(item, prompts.IMAGE_PROMPT))
    assert above.backbone.preprocessing_key() == full.backbone.preprocessing_key()
    assert "not below the checkpoint's own 16384" in caplog.text


def test_onevision_tile_and_pixel_caps_give_fewer_image_tokens(tiny_dirs, engines, big_image):
    path, full = str(tiny_dirs["llava-onevision"]), engines["llava-onevision"]
    item = Item(image=big_image, name="x")
    n_full = len(full.prepare(item, prompts.IMAGE_PROMPT))
    for capped in (E5V.from_pretrained(path, device="cpu", dtype="float32", anyres_max_tiles=2),
                   E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=2 * 32 * 32 + 100)):
        # at most 2 tiles: a 1x2 grid, 4 rows of 6 unpadded features and a newline, instead of the 5x6 grid's
        # 18x24 features shrunk to 10 rows of 13 and a newline (plus the base tile's 16 either way)
        assert n_full - len(capped.prepare(item, prompts.IMAGE_PROMPT)) == 10 * 14 - 4 * 7
        assert capped.backbone.image_processor.image_grid_pinpoints == [[32, 32], [32, 64], [64, 32]]
        assert np.abs(capped.encode_image([big_image]) - full.encode_image([big_image])).max() > 1e-3
        assert capped.backbone.preprocessing_key() != full.backbone.preprocessing_key()
    with pytest.raises(ConfigError, match="below one 32x32 tile"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=32 * 32 - 1)


def test_image_tokens_of_a_640x480_image_at_real_settings():
    """The docs table's counts, from the real processors' settings: Qwen3-VL (16-px patches, 2x2 merge, 256^2 to
    4096^2 px) and llava-onevision-qwen2-*-ov-hf (384-px tiles, 1x1 to 6x6 grids, 729 features a tile, anyres_max_9:
    a 2x2 grid, 40 of its 54 rows left after unpadding)."""
    image = Image.new("RGB", (640, 480))
    qwen3 = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                     size={"shortest_edge": 65536, "longest_edge": 16777216})
    assert int(qwen3(images=[image])["image_grid_thw"][0].prod()) // 4 == 300
    real = LlavaOnevisionImageProcessorPil()  # its defaults are the real grid and tile
    assert onevision_image_tokens(real, 480, 640) == 729 + 40 * 54 + 40 == 2929


@pytest.mark.parametrize("real", [True, False], ids=["real", "tiny"])
def test_onevision_image_tokens_are_the_processors_count(real, tiny_dirs, engines):
    """e5v's count of OneVision's image features equals ``LlavaOnevisionProcessor``'s own over many sizes: thin,
    wide, small, at the tile's edges, past anyres_max_9 (the real settings, and the tiny checkpoint's)."""
    from e5v.backbones.llava_onevision import OnevisionProcessor

    tok = engines["llava-onevision"].backbone.tokenizer
    if real:
        ip, features = LlavaOnevisionImageProcessorPil(), 729
    else:
        ip, features = LlavaOnevisionImageProcessorPil.from_pretrained(tiny_dirs["llava-onevision"]), 16
    ours = OnevisionProcessor(tok, ip, {"num_image_tokens": features, "vision_aspect_ratio": "anyres_max_9"})
    tile = ip.size["height"]
    sides = sorted({1, 7, tile // 2, tile - 1, tile, tile + 1, 2 * tile, 3 * tile - 5, 640, 480, 1000, 6 * tile + 9})
    for h in sides:
        for w in sides:
            assert ours.image_tokens(h, w) == onevision_image_tokens(ip, h, w, features), (h, w)
    assert ours.image_tokens(480, 640) == (2929 if real else onevision_image_tokens(ip, 480, 640, features))


def test_onevision_default_feature_strategy_is_refused(tiny_dirs, tmp_path):
    """"default" drops each tile's first feature (a CLS token SigLIP does not have): the model's tile grid then no
    longer fits, so a checkpoint asking for it is refused at load, not at its first image."""
    path = tmp_path / "m"
    shutil.copytree(tiny_dirs["llava-onevision"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "default"}))
    with pytest.raises(ModelLoadError, match="vision_feature_select_strategy 'default'"):
        E5V.from_pretrained(str(path), device="cpu")


def test_onevision_without_its_processor_settings_is_refused(tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(tiny_dirs["llava-onevision"], tmp_path / "m")
    config = tmp_path / "m" / "processor_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "num_image_tokens"}))
    with pytest.raises(ModelLoadError, match="processor_config.json has no num_image_tokens"):
        E5V.from_pretrained(str(tmp_path / "m"), device="cpu")
