"""Gemma 3 and InternVL against their official formula (issue 15), and the checkpoints e5v refuses.

The references are written without e5v: Gemma 3 through its HF processor's own ``apply_chat_template`` (images in
the message, tokenised as the processor does it); InternVL, whose processor cannot be built without torchvision,
through its chat template, its PIL image processor with tiling on (the processor's default) and the processor's
expansion rule written out (``<img>`` + ``<IMG_CONTEXT>`` x tokens a tile x tiles + ``</img>``). Then the full model
on one item, ``hidden_states[-1][:, -1]``, L2-normalised, fp32.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from e5v import E5V, prompts
from e5v.errors import ConfigError, ModelLoadError
from e5v.items import Item

from support import TEXTS
from support.families import CIRR_INNER, IMAGE_INNER, TEXT_INNER, check_family, messages, official_vector

FAMILIES = ("gemma3", "internvl")

# The E5-V prompts as the real templates render them (google/gemma-3-4b-it: BOS written by the template and dropped
# because the tokenizer adds it, text parts trimmed; OpenGVLab/InternVL3-*-hf: ChatML, "<IMG_CONTEXT>\n" per image).
RENDERED = {
    "gemma3": {
        TEXT_INNER: "<start_of_turn>user\n<sent>\nSummary above sentence in one word:<end_of_turn>\n"
                    "<start_of_turn>model\n",
        IMAGE_INNER: "<start_of_turn>user\n<start_of_image>Summary above image in one word:<end_of_turn>\n"
                     "<start_of_turn>model\n",
        CIRR_INNER: '<start_of_turn>user\n<start_of_image>Modify this image with "<sent>", desribe modified image '
                    "in one word:<end_of_turn>\n<start_of_turn>model\n"},
    "internvl": {
        TEXT_INNER: "<|im_start|>user\n<sent>\nSummary above sentence in one word: <|im_end|>\n<|im_start|>assistant\n",
        IMAGE_INNER: "<|im_start|>user\n<IMG_CONTEXT>\n\nSummary above image in one word: <|im_end|>\n"
                     "<|im_start|>assistant\n",
        CIRR_INNER: '<|im_start|>user\n<IMG_CONTEXT>\nModify this image with "<sent>", desribe modified image in one '
                    "word:<|im_end|>\n<|im_start|>assistant\n"},
}


class Reference:
    def __init__(self, path, family):
        self.family = family
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        if family == "gemma3":
            self.proc = AutoProcessor.from_pretrained(path, backend="pil")
        else:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.imgp = GotOcr2ImageProcessorPil.from_pretrained(path)

    def inputs(self, inner, text=None, image=None):
        msgs = messages(inner, text, image)
        if self.family == "gemma3":
            return self.proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                 return_tensors="pt")
        s = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        extra = {}
        if image is not None:
            extra = dict(self.imgp(images=[image], crop_to_patches=True, return_tensors="pt"))
            n = self.model.config.image_seq_length * int(extra.pop("num_patches")[0])
            s = s.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n + "</img>")
        return {**self.tok([s], return_tensors="pt"), **extra}

    def embed(self, inner, text=None, image=None):
        return official_vector(self.model, self.inputs(inner, text, image))


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    return {f: E5V.from_pretrained(str(tiny_dirs[f]), device="cpu", dtype="float32") for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_official_formula(family, tiny_dirs, engines, mixed_images, monkeypatch):
    check_family(engines[family], Reference(tiny_dirs[family], family).embed, mixed_images, monkeypatch)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_render_as_the_real_template_does(family, engines, mixed_images):
    bb = engines[family].backbone
    assert bb.chat_format == "template"
    for inner, want in RENDERED[family].items():
        assert bb.render(inner) == want
    ids = engines[family].prepare(Item(image=mixed_images[0], name="x"), prompts.IMAGE_PROMPT).input_ids.tolist()
    tok = bb.tokenizer
    if family == "gemma3":  # one BOS, from the tokenizer
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] != tok.eos_token_id


def test_gemma3_text_is_trimmed_as_its_template_trims_it(tiny_dirs, engines):
    """Gemma's template trims each text part: the text goes in before the template runs, as in the official path,
    so leading and trailing spaces of an item are trimmed too (they were kept when the text was filled in after)."""
    ref = Reference(tiny_dirs["gemma3"], "gemma3")
    texts = ["  A dog runs.  ", "\tA dog runs."]
    want = np.stack([ref.embed(TEXT_INNER, t) for t in texts])
    np.testing.assert_allclose(engines["gemma3"].encode_text(texts), want, atol=1e-5)


def test_gemma3_has_no_pixel_budget_and_does_not_pack(tiny_dirs, engines):
    with pytest.raises(ConfigError, match="fixed resolution"):
        E5V.from_pretrained(str(tiny_dirs["gemma3"]), device="cpu", image_max_pixels=100_000)
    with pytest.raises(ConfigError, match="packing is not supported"):
        E5V(engines["gemma3"].backbone, packing=True).encode_text(TEXTS)


def test_gemma3_is_refused_in_float16_and_with_flash_attention(tiny_dirs):
    """Gemma 3's activations overflow float16; FlashAttention would drop the both-ways attention among an image's
    soft tokens (transformers 5.17 lets it, 5.24 refuses it): both are refused before the model loads."""
    path = str(tiny_dirs["gemma3"])
    with pytest.raises(ConfigError, match=r"Gemma 3 overflows in float16: use --dtype bfloat16 \(or float32\)"):
        E5V.from_pretrained(path, device="cpu", dtype="float16")
    for impl in ("flash_attention_2", "flash_attention_3"):
        with pytest.raises(ConfigError, match=f"{impl}.*bidirectional"):
            E5V.from_pretrained(path, device="cpu", dtype="float32", attn_implementation=impl)


def test_gemma3_training_is_refused_in_float16_and_with_flash_attention(tiny_dirs, tmp_path):
    """Training loads Gemma 3 through its own path (the language model alone): the same refusals apply."""
    from support.training import triplet, write_csv

    from e5v.train import make_config, train

    data = write_csv(tmp_path / "nli.csv", [triplet(i) for i in range(4)])
    common = dict(model=str(tiny_dirs["gemma3"]), data=str(data), output_dir=str(tmp_path / "run"), batch_size=4,
                  max_steps=1, device="cpu", progress=False, tensorboard=False)
    with pytest.raises(ConfigError, match="Gemma 3 overflows in float16"):
        train(make_config(dtype="float16", **common))
    with pytest.raises(ConfigError, match="flash_attention_2.*bidirectional"):
        train(make_config(dtype="float32", attn_implementation="flash_attention_2", **common))


def test_gemma3_renders_the_processors_chat_template(tiny_dirs, engines, tmp_path):
    """As google/gemma-3-*-it ship it: the processor's template in chat_template.json, the tokenizer config with a
    template of its own; the processor's is the one rendered."""
    path = tmp_path / "m"
    shutil.copytree(tiny_dirs["gemma3"], path)
    template = (path / "chat_template.jinja").read_text()
    (path / "chat_template.jinja").unlink()
    (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'text model' }}"}))
    bb = E5V.from_pretrained(str(path), device="cpu", dtype="float32").backbone
    assert all(bb.render(inner) == want for inner, want in RENDERED["gemma3"].items())


def test_bench_texts_are_put_in_before_the_template_renders(engines, monkeypatch):
    """As the engine does (a template may transform the text: Gemma's trims it), not rendered first and filled in."""
    from e5v.bench.inputs import make_texts

    bb, rendered = engines["gemma3"].backbone, []
    render = bb.render
    monkeypatch.setattr(bb, "render", lambda inner: rendered.append(inner) or render(inner))
    make_texts(2, bb)
    assert rendered and all("<sent>" not in inner and "Summary above sentence" in inner for inner in rendered)


def test_gemma3_packed_rows_would_break_the_image_block(engines, mixed_images, monkeypatch):
    """Why Gemma 3 does not pack: forced to, its image vectors leave the padded (reference-equal) ones."""
    m = engines["gemma3"]
    padded = m.encode_image(mixed_images)
    monkeypatch.setattr(type(m.backbone), "supports_packing", True)
    packed = E5V(m.backbone, packing=True).encode_image(mixed_images)
    assert np.abs(packed - padded).max() > 1e-3


def test_internvl_tile_cap_gives_fewer_image_tokens(tiny_dirs, engines, mixed_images):
    path, full = str(tiny_dirs["internvl"]), engines["internvl"]
    tile = 56 * 56  # the tiny checkpoint's tile
    image = mixed_images[2]  # 100x30: a 3x1 grid and the thumbnail
    item = Item(image=image, name="x")
    n_full = len(full.prepare(item, prompts.IMAGE_PROMPT))
    for capped in (E5V.from_pretrained(path, device="cpu", dtype="float32", anyres_max_tiles=1),
                   E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=2 * tile - 1)):
        assert n_full - len(capped.prepare(item, prompts.IMAGE_PROMPT)) == 3 * 4  # 4 tiles -> 1, 4 tokens a tile
        assert np.abs(capped.encode_image([image]) - full.encode_image([image])).max() > 1e-3
        assert capped.backbone.preprocessing_key() != full.backbone.preprocessing_key()
    # the budget counts the grid's tiles; the thumbnail comes on top (as LLaVA-NeXT's base tile)
    three = E5V.from_pretrained(path, device="cpu", dtype="float32", image_max_pixels=3 * tile)
    assert three.backbone.image_processor.max_patches == 3
    with pytest.raises(ConfigError, match="below one 56x56 tile"):
        E5V.from_pretrained(path, device="cpu", image_max_pixels=tile - 1)


def test_internvl_caps_above_the_checkpoints_change_nothing(tiny_dirs, engines, caplog):
    """The tile cap and the pixel budget only lower the checkpoint's 12 tiles: a 20:1 image keeps its 12x1 grid."""
    path, full = str(tiny_dirs["internvl"]), engines["internvl"]
    item = Item(image=Image.new("RGB", (56 * 20, 56), "red"), name="wide")
    n_full = len(full.prepare(item, prompts.IMAGE_PROMPT))
    assert n_full > 13 * 4 and full.backbone.image_processor.max_patches == 12  # 12 tiles, a thumbnail, tags
    for above in (dict(anyres_max_tiles=30), dict(image_max_pixels=30 * 56 * 56)):
        with caplog.at_level("WARNING", logger="e5v"):
            m = E5V.from_pretrained(path, device="cpu", dtype="float32", **above)
        assert len(m.prepare(item, prompts.IMAGE_PROMPT)) == n_full
        assert m.backbone.preprocessing_key() == full.backbone.preprocessing_key()
        assert "not below the checkpoint's own 12" in caplog.text


def test_internvl3_image_tokens_of_a_640x480_image():
    """The real InternVL3 settings (448-px tiles, at most 12, 256 tokens a tile): a 4x3 grid and the thumbnail."""
    from PIL import Image

    real = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, max_patches=12)
    tiles = int(real(images=[Image.new("RGB", (640, 480))], crop_to_patches=True)["num_patches"][0])
    assert (tiles, tiles * 256) == (13, 3328)


def _checkpoint(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("config", [
    {"model_type": "phi3_v", "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                                          "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}},
    {"model_type": "llava_next", "auto_map": {"AutoModel": "modeling_custom.CustomModel"}},
    {"model_type": "internvl_chat"},
], ids=["phi3-v", "auto_map", "unknown-model-type"])
def test_checkpoints_that_need_remote_code_are_refused(tmp_path, config):
    """By the engine and by training alike."""
    from e5v.train.model import load_language_model

    path = _checkpoint(tmp_path, config)
    with pytest.raises(ModelLoadError, match="needs remote code.*e5v does not run"):
        E5V.from_pretrained(path, device="cpu")
    with pytest.raises(ModelLoadError, match="needs remote code.*e5v does not run"):
        load_language_model(path, dtype=torch.float32, device=torch.device("cpu"))


def test_phi4_multimodal_is_refused_with_its_reason(tmp_path):
    with pytest.raises(ModelLoadError, match="Phi-4-multimodal.*torchvision.*vision LoRA"):
        E5V.from_pretrained(_checkpoint(tmp_path, {"model_type": "phi4_multimodal"}), device="cpu")
