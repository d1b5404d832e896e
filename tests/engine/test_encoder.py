"""The engine against the official formula: the full model called one item at a time with
``output_hidden_states=True``, ``hidden_states[-1][:, -1]``, L2-normalised, fp32 — for every backbone.

The reference below is written independently of e5v: the HF processor (or, for Qwen, its image processor
and a hand expansion of the image pad), the chat strings spelled out, and the fixes that vLLM's own
reference test applies to royokong/e5-v on current transformers (processor ``patch_size``, embedding resize).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import e5v
import e5v.batching
import e5v.items
from e5v import E5V
from e5v.errors import BatchInputError, ConfigError, ModelLoadError

from support import TEXTS
from support.families import check_family, official_vector

CHAT = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n \n"),
    "mistral": "[INST] {} [/INST]",
    "vicuna": "USER: {} ASSISTANT:",
    "qwen": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
}
FAMILY_CHAT = {"llava-next-llama3": "llama3", "e5v-like": "llama3", "llava-next-mistral": "mistral",
               "llava-next-vicuna": "vicuna", "llava-1.5": "vicuna", "qwen2-vl": "qwen", "qwen2.5-vl": "qwen"}
ALL = list(FAMILY_CHAT)


class Reference:
    """The official recipe, one item at a time, on the full model."""

    def __init__(self, path, family):
        self.family = family
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.qwen = family.startswith("qwen")
        if self.qwen:
            self.tok = AutoTokenizer.from_pretrained(path)
            self.imgp = Qwen2VLImageProcessorPil.from_pretrained(path)
        else:
            self.proc = AutoProcessor.from_pretrained(path, backend="pil")  # the official (slow) processor
            cfg = self.model.config
            if self.proc.patch_size is None:  # royokong/e5-v's processor config lacks it; set as vLLM's test does
                self.proc.patch_size = cfg.vision_config.patch_size
                self.proc.vision_feature_select_strategy = cfg.vision_feature_select_strategy
            image_id = self.proc.tokenizer.convert_tokens_to_ids("<image>")
            self.model.config.image_token_id = image_id
            if image_id >= self.model.get_input_embeddings().num_embeddings:
                self.model.resize_token_embeddings(image_id + 1)

    def prompt(self, inner, text=None):
        s = CHAT[FAMILY_CHAT[self.family]].format(inner)
        if self.qwen:
            s = s.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
        return s.replace("<sent>", text) if text is not None else s

    def embed(self, text, image=None):
        if self.qwen:
            extra = {}
            if image is not None:
                extra = dict(self.imgp(images=[image], return_tensors="pt"))
                n = int(extra["image_grid_thw"].prod()) // 4
                text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
            enc = dict(self.tok([text], return_tensors="pt"))
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.model.config.image_token_id).int()
            enc.update(extra)
        else:
            enc = self.proc(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        return official_vector(self.model, enc)


@pytest.fixture(scope="module")
def refs(tiny_dirs):
    return {f: Reference(tiny_dirs[f], f) for f in ALL}


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    return {f: E5V.from_pretrained(str(tiny_dirs[f]), device="cpu", dtype="float32") for f in ALL}


@pytest.mark.parametrize("family", ALL)
def test_parity_with_official_formula(family, refs, engines, mixed_images, monkeypatch):
    ref = refs[family]
    check_family(engines[family], lambda inner, text=None, image=None: ref.embed(ref.prompt(inner, text), image),
                 mixed_images, monkeypatch)


def test_chat_format_detected_per_family(engines):
    assert {f: e.backbone.chat_format for f, e in engines.items()} == FAMILY_CHAT


def test_batch_plan_does_not_change_vectors(engines, mixed_images):
    m = engines["llava-next-llama3"]
    items = TEXTS + TEXTS[::-1]
    whole = m.encode_text(items)
    old = m.max_batch_tokens
    try:
        m.max_batch_tokens = 60  # forces many small batches, different padding per batch
        np.testing.assert_allclose(m.encode_text(items), whole, atol=1e-5)
    finally:
        m.max_batch_tokens = old


def test_plan_batches_respects_budget(engines):
    m = E5V(engines["llava-next-llama3"].backbone, max_batch_tokens=100, max_batch_size=3)
    lengths = [10, 50, 20, 30, 40, 5, 5, 5, 5, 90]
    batches = m.plan_batches(lengths)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[k] for k in b) <= 100)
    assert batches[0] == [9]  # longest first, alone


def test_prompt_bytes_reach_the_tokenizer(engines):
    bb = engines["e5v-like"].backbone
    feats = bb.prepare(bb.render(e5v.prompts.TEXT).replace("<sent>", "A dog."))
    tok = bb.tokenizer
    ids = feats.input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] != tok.eos_token_id  # no EOS appended (the template's own <|eot_id|> stays)
    assert tok.decode(ids[1:]) == CHAT["llama3"].format("A dog.\nSummary above sentence in one word: ")


def test_bad_items_are_skipped_and_named(engines, mixed_images, tmp_path):
    m = engines["llava-next-llama3"]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    items = [mixed_images[0], str(bad), mixed_images[1], str(tmp_path / "missing.png")]
    res = m.embed(items, prompt=e5v.prompts.IMAGE_PROMPT)
    assert res.indices.tolist() == [0, 2]
    assert [i for i, _ in res.skipped] == [1, 3]
    assert "broken.jpg" in str(res.skipped[0][1]) and "missing.png" in str(res.skipped[1][1])
    np.testing.assert_allclose(res.vectors, m.encode_image([mixed_images[0], mixed_images[1]]), atol=1e-6)
    with pytest.raises(BatchInputError) as exc:
        m.encode_image(items)
    assert "broken.jpg" in str(exc.value) and len(exc.value.result) == 2
    with pytest.raises(BatchInputError, match="empty text"):
        m.encode_text(["fine", "   "])


def test_text_with_image_marker_rejected(engines):
    with pytest.raises(BatchInputError, match="image marker"):
        engines["llava-next-llama3"].encode_text(["look <image> here"])


def test_long_text_truncated_to_limit(engines, caplog):
    base = engines["llava-next-llama3"]
    m = E5V(base.backbone, max_length=40)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)
    with caplog.at_level("WARNING"):
        got = m.encode_text([long])
    assert "truncated" in caplog.text
    tok = base.backbone.tokenizer
    prompt_len = (len(m.prepare(e5v.items.Item(text="x"), e5v.prompts.TEXT))
                  - len(tok("x", add_special_tokens=False)["input_ids"]))
    cut = tok.decode(tok(long, add_special_tokens=False)["input_ids"][: 40 - prompt_len])
    np.testing.assert_allclose(got, base.encode_text([cut]), atol=1e-5)
    assert not np.allclose(got, base.encode_text([long]), atol=1e-3)


def test_output_options(engines):
    m = engines["llava-next-llama3"]
    t = m.encode_text(TEXTS[:2], convert_to_tensor=True, precision="float16")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float16
    np.testing.assert_allclose(t.float().numpy(), m.encode_text(TEXTS[:2]), atol=1e-3)
    with pytest.raises(ConfigError):
        m.encode_text(["x"], precision="int8")
    with pytest.raises(ConfigError):
        m.encode_composed([("a.png", "x")], task="nope")


def test_user_prompt_and_gallery_prompt(engines, refs, mixed_images):
    m, ref = engines["llava-next-llama3"], refs["llava-next-llama3"]
    own = "<sent>\nIn one word, this text means:"
    np.testing.assert_allclose(m.encode_text(TEXTS[:2], prompt=own),
                               np.stack([ref.embed(ref.prompt(own, t)) for t in TEXTS[:2]]), atol=1e-5)
    cand = "<image>\n Describe this image in one word:"
    np.testing.assert_allclose(m.encode_image(mixed_images[:2], task="cirr"),
                               np.stack([ref.embed(ref.prompt(cand), im) for im in mixed_images[:2]]), atol=1e-5)
    with pytest.raises(BatchInputError, match="needs an image"):
        m.encode(["just text"], prompt="<image><sent>")


def test_public_api_is_lazy_and_names_each_home():
    """``import e5v`` loads no torch (the CLI parses its arguments first); each public name is its module's object."""
    code = ("import sys, e5v; assert 'torch' not in sys.modules, 'torch imported'; "
            "import e5v.config, e5v.encoder, e5v.items; "
            "assert (e5v.E5V, e5v.EmbedResult, e5v.EngineConfig, e5v.Item) == "
            "(e5v.encoder.E5V, e5v.items.EmbedResult, e5v.config.EngineConfig, e5v.items.Item); "
            "assert sorted(e5v.__all__) == ['E5V', 'EmbedResult', 'EngineConfig', 'Item', '__version__']")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'Preparer'"):
        e5v.Preparer  # noqa: B018  (only the public names)


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError):
        E5V.from_pretrained(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        E5V.from_pretrained(str(tmp_path), device="cpu")


def test_lora_adapter_merges(tiny_dirs, engines, tmp_path):
    """An LM-only adapter (the E5-V training layout) merged at load equals W + (alpha/r) B A applied by hand."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    path = tiny_dirs["llava-next-llama3"]
    base = engines["llava-next-llama3"]
    lm = LlamaForCausalLM(base.backbone.model.config.text_config)
    torch.manual_seed(1)
    peft_model = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                               target_modules=["q_proj", "v_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")

    merged = E5V.from_pretrained(str(path), device="cpu", dtype="float32", adapter=str(tmp_path / "adapter"))
    manual = E5V.from_pretrained(str(path), device="cpu", dtype="float32")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lm_manual = manual.backbone.model.model.language_model
    with torch.no_grad():
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            module = lm_manual.get_submodule(key.removeprefix("base_model.model.model.").split(".lora_A.")[0])
            module.weight += (8 / 4) * b @ a
    got, want, before = merged.encode_text(TEXTS), manual.encode_text(TEXTS), base.encode_text(TEXTS)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - before).max() > 1e-3


def test_checkpoint_in_the_transformers_441_layout_loads(tiny_dirs, engines, mixed_images, tmp_path):
    """royokong/e5-v was saved by transformers 4.41 (``vision_tower.vision_model.*`` keys): same vectors."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dirs["e5v-like"]
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    weights = load_file(src / "model.safetensors")
    assert any(k.startswith("vision_tower.") for k in weights)
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in weights.items()}
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    m = E5V.from_pretrained(str(legacy), device="cpu", dtype="float32")
    np.testing.assert_array_equal(m.encode_image(mixed_images[:2]), engines["e5v-like"].encode_image(mixed_images[:2]))


def test_windows_stream_in_input_order(engines):
    base = engines["llava-next-llama3"]
    m = E5V(base.backbone, window=2, max_batch_tokens=70)
    items = [TEXTS[0], TEXTS[1], "", TEXTS[3], TEXTS[4]]
    res = m.embed(items, prompt=e5v.prompts.TEXT)
    assert res.indices.tolist() == [0, 1, 3, 4] and [i for i, _ in res.skipped] == [2]
    np.testing.assert_allclose(res.vectors, base.encode_text([items[i] for i in (0, 1, 3, 4)]), atol=1e-5)


def test_non_finite_vectors_are_reported_not_returned(engines, monkeypatch):
    m = engines["llava-next-llama3"]
    bb = m.backbone
    real_forward = type(bb).forward

    def overflowing(self, batch):  # the longest input overflows, as fp16 can
        hidden = real_forward(self, batch).clone()
        lengths = batch["attention_mask"].sum(1)
        hidden[lengths == lengths.max()] = float("inf")
        return hidden

    monkeypatch.setattr(type(bb), "forward", overflowing)
    res = m.embed(TEXTS, prompt=e5v.prompts.TEXT)
    assert [i for i, _ in res.skipped] == [4] and "non-finite" in str(res.skipped[0][1])
    assert res.indices.tolist() == [0, 1, 2, 3] and np.isfinite(res.vectors).all()


def test_single_image_path_is_one_item(engines, mixed_images, tmp_path):
    path = tmp_path / "one.png"
    mixed_images[1].save(path)
    m = engines["llava-next-llama3"]
    np.testing.assert_allclose(m.encode_image(str(path)), m.encode_image([mixed_images[1]]), atol=1e-6)


def test_unusual_image_modes_embed_like_their_rgb_version(engines, mixed_images, tmp_path):
    """CMYK, palette, LA, 16-bit and animated files go through the model as the RGB image they show."""
    from PIL import Image

    m = engines["llava-next-llama3"]
    rgb = mixed_images[3]
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "palette.png")
    Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    frames = [rgb, Image.new("RGB", rgb.size, "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    got = m.encode_image([str(tmp_path / n) for n in ("cmyk.jpg", "palette.png", "grey16.png", "anim.gif")])
    want = m.encode_image([Image.open(tmp_path / "cmyk.jpg").convert("RGB"), pal.convert("RGB"),
                           rgb.convert("L").convert("RGB"), Image.open(tmp_path / "anim.gif").convert("RGB")])
    np.testing.assert_allclose(got, want, atol=1e-5)
    blue = m.encode_image([frames[1]])
    assert np.abs(got[3] - blue[0]).max() > 1e-3  # the first frame, not the second


def test_real_e5v_image_geometry(tiny_dirs, tmp_path):
    """royokong/e5-v's image settings (336 px CLIP-L/14 tiles, its AnyRes pinpoints, processor without
    patch_size) on a narrow random model: a 640x480 image takes 2,340 image tokens (as measured on the real model), and
    mixed sizes batched together equal one-by-one."""
    import shutil

    from PIL import Image
    from transformers import AutoConfig, CLIPVisionConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    src, out = tiny_dirs["e5v-like"], tmp_path / "e5v-geometry"
    shutil.copytree(src, out)
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    cfg = AutoConfig.from_pretrained(src)
    cfg.vision_config = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2)
    cfg.image_grid_pinpoints = pins
    cfg.text_config.max_position_embeddings = 8192  # Llama-3's; a full AnyRes image needs ~2.4k
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    proc_cfg = json.loads((out / "processor_config.json").read_text())
    proc_cfg["image_processor"] = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pins,
        resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711]).to_dict()
    (out / "processor_config.json").write_text(json.dumps(proc_cfg))

    m = E5V.from_pretrained(str(out), device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
              for w, h in [(640, 480), (500, 375), (375, 500)]]
    feats = m.prepare(e5v.items.Item(image=images[0]), e5v.prompts.IMAGE_PROMPT)
    image_id = m.backbone.model.config.image_token_id
    assert int((feats.input_ids == image_id).sum()) == 2340
    batched = m.encode_image(images)
    np.testing.assert_allclose(batched, np.concatenate([m.encode_image([im]) for im in images]), atol=1e-5)
