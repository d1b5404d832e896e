"""Options every backbone shares: the checkpoint's own chat template as the chat format, and the pixel budget of
dynamic-resolution families (issue 15)."""
from __future__ import annotations

import numpy as np
import pytest

from e5v import E5V, prompts
from e5v.config import EngineConfig
from e5v.errors import ConfigError
from e5v.items import Item

from support import TEXTS, random_images

QWEN_IMAGE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nSummary above image in one word: "
              "<|im_end|>\n<|im_start|>assistant\n")


def test_template_chat_format_renders_the_checkpoints_template(tiny_dirs):
    """The tiny Qwen template is the Qwen turn without the default system message: "template" renders the E5-V
    prompts exactly as the hand-written qwen format does, so the vectors are the same."""
    fixed = E5V.from_pretrained(str(tiny_dirs["qwen2-vl"]), device="cpu", dtype="float32")
    own = E5V.from_pretrained(str(tiny_dirs["qwen2-vl"]), device="cpu", dtype="float32", chat_format="template")
    assert own.backbone.render(prompts.IMAGE_PROMPT) == QWEN_IMAGE == fixed.backbone.render(prompts.IMAGE_PROMPT)
    images = random_images(3)
    np.testing.assert_array_equal(own.encode_image(images), fixed.encode_image(images))
    np.testing.assert_array_equal(own.encode_text(TEXTS), fixed.encode_text(TEXTS))


def test_template_chat_format_drops_a_bos_the_tokenizer_adds(tiny_dirs, monkeypatch):
    """A template that writes BOS itself (Gemma's, Llama 3's) would give two BOS tokens: the rendered text drops it,
    the tokenizer puts back exactly one."""
    m = E5V.from_pretrained(str(tiny_dirs["llava-next-llama3"]), device="cpu", dtype="float32",
                            chat_format="template")
    tok = m.backbone.tokenizer
    plain = m.backbone.render(prompts.TEXT)
    monkeypatch.setattr(tok, "chat_template", "{{ bos_token }}" + tok.chat_template)
    assert m.backbone.render(prompts.TEXT) == plain
    ids = m.prepare(Item(text="A dog."), prompts.TEXT).input_ids.tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_template_chat_format_needs_a_template(tiny_dirs, tmp_path):
    import shutil

    shutil.copytree(tiny_dirs["qwen2-vl"], tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template"):
        E5V.from_pretrained(str(tmp_path / "m"), device="cpu", chat_format="template")


def test_image_max_pixels_gives_fewer_image_tokens_and_is_a_vector_setting(tiny_dirs):
    path = str(tiny_dirs["qwen2-vl"])
    full = E5V.from_pretrained(path, device="cpu", dtype="float32")
    capped = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=32 * 32)
    image = random_images(1, seed=3)[0].resize((120, 90))
    item = Item(image=image, name="x")
    n_full, n_capped = (len(m.prepare(item, prompts.IMAGE_PROMPT)) for m in (full, capped))
    assert n_capped < n_full
    assert np.abs(full.encode_image([image]) - capped.encode_image([image])).max() > 1e-3
    assert EngineConfig(model=path, image_max_pixels=1024).vector_settings()["image_max_pixels"] == 1024
    with pytest.raises(ConfigError, match="below the model's minimum"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=10)


def test_image_max_pixels_is_refused_where_the_resolution_is_fixed(tiny_dirs):
    with pytest.raises(ConfigError, match="fixed resolution"):
        E5V.from_pretrained(str(tiny_dirs["llava-1.5"]), device="cpu", image_max_pixels=10_000)


def test_llava_next_pixel_budget_is_a_tile_cap(tiny_dirs, mixed_images, caplog):
    """LLaVA-NeXT's budget counts whole grid tiles of 32x32 px (the base tile on top), as OneVision's and InternVL's:
    just under two tiles' pixels is ``anyres_max_tiles=1``; a budget at or above the whole grid changes nothing."""
    path = str(tiny_dirs["llava-next-llama3"])
    full = E5V.from_pretrained(path, device="cpu", dtype="float32")
    tiles = E5V.from_pretrained(path, device="cpu", dtype="float32", anyres_max_tiles=1)
    pixels = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=2 * 32 * 32 - 1)
    assert pixels.backbone.image_processor.image_grid_pinpoints == [[32, 32]]
    assert pixels.backbone.preprocessing_key() == tiles.backbone.preprocessing_key()
    np.testing.assert_array_equal(pixels.encode_image(mixed_images), tiles.encode_image(mixed_images))
    n_full, n_capped = (sum(len(m.prepare(Item(image=im, name="x"), prompts.IMAGE_PROMPT)) for im in mixed_images)
                        for m in (full, pixels))
    assert n_capped < n_full
    with caplog.at_level("WARNING", logger="e5v"):
        above = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=100 * 32 * 32)
    assert "not below the checkpoint's own 4" in caplog.text
    assert above.backbone.preprocessing_key() == full.backbone.preprocessing_key()
    with pytest.raises(ConfigError, match="below one 32x32 tile"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=32 * 32 - 1)
