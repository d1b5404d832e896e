"""Training with images on any side: the readers and prompts per side, mixtures of files, GradCache over image
batches, the engine's vectors, a corrupt image skipped, 2 processes equal 1, resume and merge of everything."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from e5v import prompts
from e5v.errors import ConfigError, InputError
from e5v.serve.server import free_port
from e5v.tiny import FAMILIES
from e5v.train.config import make_config
from e5v.train.data import MMEB_PROMPT, Sampler, Side, Triplet, batch_indices, default_prompt, read_triplets
from support.training import WORKER, env, image_rows, triplet, write_csv

CPU = torch.device("cpu")
FAMILY = "e5v-like"  # LLaVA-NeXT with AnyRes tiles, the image token one past the vocabulary (as royokong/e5-v)


# --- readers, prompts, mixtures -----------------------------------------------------------------------------------
def test_sides_and_mmeb_records_with_their_prompts(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"query": {"text": "a dog"}, "positive": {"image": "a.png"}, "negative": {"image": "/abs/b.png", "text": "x"}},
        {"query": {"text": "plain"}, "positive": {"text": "text"}},
        {"query": {"text": "own", "prompt": "Q: <sent>"},
         "positive": {"image": "a.png", "prompt": "<image> in a word:"}},
        {"query": {"text": "bad", "prompt": "no marker"}, "positive": {"text": "p"}},
        {"query": {"image": 7}, "positive": {"text": "p"}},
        {"positive": {"text": "no query"}},
        {"query": {"text": "typo"}, "positive": {"img": "a.png"}},
        {"query": {"text": "two", "prompt": "<sent> and <sent>"}, "positive": {"text": "p"}},
        {"query": {"text": "img typo", "img": "x.png"}, "positive": {"text": "p", "caption": "c"}},
    ]) + "\n")
    rows = read_triplets(tmp_path / "sub" / "d.jsonl")
    folder = str(tmp_path / "sub")
    assert rows[0] == Triplet("a dog", Side(None, f"{folder}/a.png", None, f"{folder}/d.jsonl:line 1 positive (a.png)"),
                              Side("x", "/abs/b.png", None, f"{folder}/d.jsonl:line 1 negative (/abs/b.png)"))
    assert rows[1] == Triplet("plain", "text")  # a text-only side without its own prompt is a plain text
    assert rows[2].anchor.prompt == "Q: <sent>" and rows[2].positive.prompt == "<image> in a word:"
    assert rows[3] == Triplet("img typo", "p")
    assert len(rows) == 4
    assert "d.jsonl:line 4 query: the prompt lacks <sent> but the side has text" in caplog.text
    assert "d.jsonl:line 5 query: image must be a string, got int" in caplog.text
    assert "d.jsonl:line 6: empty or missing 'query'" in caplog.text
    assert "d.jsonl:line 7: empty or missing 'positive'" in caplog.text
    assert "d.jsonl:line 8 query: a prompt may hold at most one <sent>" in caplog.text
    # unknown side keys: one warning per key, with the count and the first place (a typo of "image" is not silent)
    assert "d.jsonl: 2 side(s) have the unknown key 'img', ignored (first: " in caplog.text
    assert "line 7 positive); a side's keys are text, image, prompt" in caplog.text
    assert "1 side(s) have the unknown key 'caption', ignored (first: " in caplog.text
    # image_root: relative paths are relative to that folder instead of the data file's
    moved = read_triplets(tmp_path / "sub" / "d.jsonl", image_root=str(tmp_path / "pics"))
    assert moved[0].positive.image == str(tmp_path / "pics" / "a.png") and moved[0].negative.image == "/abs/b.png"
    # the prompts E5-V embeds each kind of side with at inference
    assert default_prompt(rows[0].positive, prompts.TEXT) == prompts.IMAGE_PROMPT
    assert default_prompt(rows[0].negative, prompts.TEXT) == prompts.CIRR_QUERY
    assert default_prompt(Side("t", None, None), "<sent> run's") == "<sent> run's"
    assert default_prompt(rows[2].anchor, prompts.TEXT) == "Q: <sent>"
    # MMEB-train (VLM2Vec): its image marker is dropped from the text, paths are relative to the file's folder; a
    # side with an image and a text is the image with its instruction (MMEB_PROMPT), not a composed CIRR query
    mmeb = {"qry": ["<|image_1|>\nRepresent the given image.", "find the cat"], "qry_image_path": ["q.jpg", ""],
            "pos_text": ["a cat", ""], "pos_image_path": ["", "c.jpg"], "neg_text": ["a dog", ""],
            "neg_image_path": ["", ""]}
    pq.write_table(pa.table(mmeb), tmp_path / "m.parquet")
    got = read_triplets(tmp_path / "m.parquet")
    assert got[0].anchor == Side("Represent the given image.", str(tmp_path / "q.jpg"), MMEB_PROMPT,
                                 f"{tmp_path}/m.parquet:row 0 query (q.jpg)")
    assert MMEB_PROMPT == "<image>\n<sent>\nSummary above image in one word: "
    assert default_prompt(got[0].anchor, prompts.TEXT) == MMEB_PROMPT
    assert (got[0].positive, got[0].negative) == ("a cat", "a dog")
    assert (got[1].anchor, got[1].positive.image, got[1].negative) == ("find the cat", str(tmp_path / "c.jpg"), None)
    assert default_prompt(got[1].positive, prompts.TEXT) == prompts.IMAGE_PROMPT  # an image alone: E5-V's


def test_sampler_mixture_ratio_single_source_and_resume():
    """Two sources (10 and 30 rows): each batch takes the weights' share of each, shuffled together; each source is
    read epoch by epoch (every row once before any repeats); single-source batches draw one source per step in the
    weights' ratio. Step k's rows are a function of (seed, k): a fresh sampler asked for step k alone agrees."""
    sizes, ends = [10, 30], (range(0, 10), range(10, 40))
    mixed = Sampler(sizes, 8, seed=3, weights=[0.5, 0.5])
    batches = [mixed.indices(k) for k in range(10)]
    assert all(sum(i in ends[0] for i in b) == 4 and len(b) == 8 for b in batches)
    assert sorted(i for b in batches[:5] for i in b if i < 10) == sorted(list(range(10)) * 2)  # 2 epochs of A
    b_rows = [i for b in batches[:7] for i in b if i >= 10]
    assert len(b_rows) == len(set(b_rows)) == 28  # B (30 rows): no repeat within its epoch
    assert batches[1] != sorted(batches[1])  # the sources are shuffled together (shards get a mix)
    assert Sampler(sizes, 8, seed=3, weights=[0.5, 0.5]).indices(9) == batches[9]
    assert Sampler(sizes, 8, seed=4, weights=[0.5, 0.5]).indices(9) != batches[9]
    assert sum(i < 10 for i in Sampler(sizes, 8, seed=3).indices(0)) == 2  # default: by size (1:3)
    assert Sampler(sizes, 8, 3).per_epoch == 5

    single = Sampler(sizes, 8, seed=3, weights=[0.25, 0.75], single_source=True)
    steps = [single.indices(k) for k in range(400)]
    sources = [single.source_of(k) for k in range(400)]
    assert all(all((i >= 10) == bool(s) for i in b) for b, s in zip(steps, sources))  # one source per batch
    assert 0.18 < sources.count(0) / 400 < 0.32
    a_rows = [i for b, s in zip(steps, sources) if s == 0 for i in b]
    assert sorted(a_rows[:10]) == list(range(10))  # source A read epoch by epoch across its batches
    fresh = Sampler(sizes, 8, seed=3, weights=[0.25, 0.75], single_source=True)
    assert fresh.indices(399) == steps[399] and fresh.source_of(250) == sources[250]
    assert Sampler([7], 4, 1).indices(1) == Sampler([7], 4, 1, single_source=True).indices(1)  # one file: as before


def test_settings_that_need_or_refuse_images(tiny_dirs, tmp_path):
    from e5v.train import train

    data = image_rows(tmp_path, 5)
    text = write_csv(tmp_path / "t.csv", [triplet(i) for i in range(4)])
    base = dict(model=str(tiny_dirs[FAMILY]), output_dir=str(tmp_path / "out"), progress=False, lora_r=4,
                gradient_checkpointing=False, tensorboard=False)
    with pytest.raises(ConfigError, match=r"official_quirks reproduces the text-only release.*sides.jsonl:line 1"):
        train(make_config(**base, data=str(data), official_quirks=True))
    with pytest.raises(ConfigError, match="need data with images"):
        train(make_config(**base, data=str(text), train_projector=True))
    with pytest.raises(ConfigError, match="data_weights has 1 numbers for 2 data file"):
        train(make_config(**base, data=f"{text},{data}", data_weights="1"))
    # a run prompt that cannot embed the text sides is the run's error at once, not a row failure in every step
    for prompt, message in [("<image>\n<sent>\nIn one word:", "it must contain <sent> and no <image>"),
                            ("<sent> or <sent>", "a prompt may hold at most one <sent>")]:
        with pytest.raises(ConfigError, match=message):
            train(make_config(**base, data=str(text), prompt=prompt))
    # 4-bit QLoRA would quantise the vision tower and projector: refused for data with images (before the GPU check)
    with pytest.raises(ConfigError, match="4-bit QLoRA is for text-only data.*--load-in-4bit false"):
        train(make_config(**base, data=str(data), load_in_4bit="true"))
    with pytest.raises(ConfigError, match="alpha must be one of"):
        train(make_config(**base, data=str(data), alpha="black"))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_qlora_auto_trains_images_unquantised(monkeypatch):
    from e5v.train import model

    monkeypatch.setattr(model, "has_bitsandbytes", lambda: True)
    gpu = torch.device("cuda", 0)
    assert model.wants_4bit("auto", gpu) and not model.wants_4bit("auto", gpu, images=True)
    assert not model.wants_4bit("false", gpu, images=True)


@pytest.mark.parametrize("family", [FAMILY, "qwen3-vl"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_weights_train_in_fp32_under_a_half_precision_model(tiny_dirs, tmp_path, family, dtype):
    """The base model in fp16/bf16, the LoRA (LM and tower) and projector weights in fp32 (autocast runs the
    forward): the trainer's plain step with fp16 loss scaling unscales their gradients (GradScaler refuses fp16
    gradients) and moves every trainable weight that has a gradient (the tiny Qwen3-VL's second deepstack merger
    feeds its last LM layer at image positions only: no gradient at the pooled token)."""
    from support.train_worker import image_model

    from e5v.train.gradcache import contrastive_step
    from e5v.train.parallel import Plain

    model, sents = image_model(str(tiny_dirs[family]), dtype=dtype)
    named = model.named_trainable()
    assert model.mm.get_input_embeddings().weight.dtype == dtype  # the frozen base stays in half precision
    assert {p.dtype for p in named.values()} == {torch.float32} and model.vision
    before = {k: v.detach().clone() for k, v in named.items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0) if dtype == torch.float16 else None
    strategy = Plain(model, lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
                     lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), max_grad_norm=1.0,
                     scaler=scaler)
    a, p, n, _ = sents.inputs(read_triplets(image_rows(tmp_path, 5)))
    res = contrastive_step(sents.encoder(model.runner, CPU, autocast=dtype), a, p, n, chunk_size=4,
                           backward=strategy.backward)
    assert res.chunks > 1 and np.isfinite(res.loss) and np.isfinite(strategy.step())
    moved = {k for k, v in model.named_trainable().items() if not torch.equal(before[k], v)}
    assert moved == {k for k, v in named.items() if v.grad is not None and v.grad.any()}
    for group in ("base_model.", ".lora_B.", "multi_modal_projector." if family == FAMILY else "visual.merger."):
        assert any(group in k for k in moved), group


def test_the_whole_model_is_loaded_without_its_lm_head(tiny_dirs):
    """Training with images pools hidden states: the whole model's lm_head is dropped (nothing for ZeRO-3 or
    FSDP to carry); tied input embeddings (Gemma 3's) stay."""
    from e5v.train.model import load_language_model

    for family in (FAMILY, "gemma3"):
        _, _, full = load_language_model(str(tiny_dirs[family]), dtype=torch.float32, device=CPU, load_vision=True)
        assert isinstance(full.lm_head, torch.nn.Identity)
        assert not any(n.startswith("lm_head") for n, _ in full.named_parameters())
        assert full.get_input_embeddings().weight.abs().sum() > 0


def test_image_settings_are_the_engines(tiny_dirs, tmp_path):
    """anyres_max_tiles, image_max_pixels, max_pixels and alpha act in training as in the engine: the same tokens
    and pixels as E5V.from_pretrained with those options (and not those of the defaults); they are in the run's
    recorded config; an image over max_pixels is the engine's item error."""
    from PIL import Image

    from e5v import E5V
    from e5v.items import Item
    from e5v.train.trainer import start_run

    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:24, :, 3] = 200, 255  # the lower half transparent: white or the stored red by alpha
    data = image_rows(tmp_path, 5)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "img" / "rgba.png")
    big = Side(None, str(tmp_path / "img" / "rgba.png"), None, "rgba")
    path = str(tiny_dirs[FAMILY])
    options = dict(anyres_max_tiles=1, alpha="official")
    base = dict(model=path, data=str(data), progress=False, lora_r=4, gradient_checkpointing=False,
                tensorboard=False)
    tuned = start_run(make_config(**base, **options, output_dir=str(tmp_path / "a")))
    plain = start_run(make_config(**base, output_dir=str(tmp_path / "b")))
    want = E5V.from_pretrained(path, **options).prepare(Item(image=big.image), prompts.IMAGE_PROMPT)
    got, default = tuned.mode.prepare_side(big), plain.mode.prepare_side(big)
    assert torch.equal(got.input_ids, want.input_ids) and len(got) < len(default)
    assert torch.equal(got.images["pixel_values"], want.images["pixel_values"])
    white = E5V.from_pretrained(path, anyres_max_tiles=1).prepare(Item(image=big.image), prompts.IMAGE_PROMPT)
    assert not torch.equal(got.images["pixel_values"], white.images["pixel_values"])  # alpha really acts
    assert tuned.cfg.to_dict()["anyres_max_tiles"] == 1 and tuned.cfg.to_dict()["alpha"] == "official"
    small = start_run(make_config(**base, max_pixels=2000, image_max_pixels=32 * 32, output_dir=str(tmp_path / "c")))
    with pytest.raises(InputError, match=r"rgba: image too large \(64x48 = 3072 pixels > max_pixels 2000\)"):
        small.mode.prepare_side(big)
    limited = E5V.from_pretrained(path, image_max_pixels=32 * 32).prepare(Item(image=str(tmp_path / "img" / "0.png")),
                                                                          prompts.IMAGE_PROMPT)
    assert torch.equal(small.mode.prepare_side(Side(None, str(tmp_path / "img" / "0.png"))).input_ids,
                       limited.input_ids)


# --- GradCache and the engine's vectors ------------------------------------------------------------------------------
def _image_grads(tiny_dirs, tmp_path, *, chunk, sort, tokens=None):
    from support.train_worker import image_model

    from e5v.train.gradcache import contrastive_step

    model, sents = image_model(str(tiny_dirs[FAMILY]))
    a, p, n, _ = sents.inputs(read_triplets(image_rows(tmp_path, 10)))
    res = contrastive_step(sents.encoder(model.runner, CPU), a, p, n, chunk_size=chunk, sort_by_length=sort,
                           chunk_tokens=tokens)
    return res, {k: v.grad.clone() for k, v in model.named_trainable().items()}


def _close(got: dict, want: dict) -> bool:
    """Equal within 1e-5, or 1e-5 of the largest entry for a gradient larger than 1 (fp32 sums of many terms)."""
    return got.keys() == want.keys() and all(
        float((got[k] - want[k]).abs().max()) <= 1e-5 * max(1.0, float(want[k].abs().max())) for k in want)


def test_image_batch_under_gradcache_equals_one_pass(tiny_dirs, tmp_path):
    """Text, image and composed sides in one batch, the projector and LoRA on the LM and the tower trained: GradCache
    chunks (sorted by length, image tokens included, or not; by sequences or by a padded-token budget) give the
    one-pass loss and gradients (fp32, 1e-5; for a gradient larger than 1, such as the projector's bias (about 100),
    1e-5 of its largest entry)."""
    plain, g0 = _image_grads(tiny_dirs, tmp_path, chunk=1000, sort=False)
    assert plain.chunks == 1 and plain.candidates == 10 + 6
    assert any(k.startswith("vision_tower.") for k in g0) and any(k.startswith("multi_modal_projector.") for k in g0)
    for group in ("base_model.", "vision_tower.", "multi_modal_projector."):  # every part really gets a gradient
        assert max(float(v.abs().max()) for k, v in g0.items() if k.startswith(group)) > 1e-4, group
    for chunk, sort, tokens in [(4, True, None), (3, False, None), (1000, True, 300), (1000, False, 300)]:
        res, g = _image_grads(tiny_dirs, tmp_path, chunk=chunk, sort=sort, tokens=tokens)
        assert res.chunks > 1 and abs(res.loss - plain.loss) < 1e-5
        assert _close(g, g0)
        if tokens:  # the budget, not the sequence cap (1000), cut the chunks
            assert res.padded_tokens <= tokens * res.chunks


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_equals_the_engine_for_every_side(tiny_dirs, tmp_path, family):
    """The vectors training computes for image, composed and own-prompt sides are the engine's: the adapter and
    vision weights (projector, tower LoRA) saved from the training model, loaded by E5V.from_pretrained, give the
    same vectors (fp32), for every backbone family (each layout of vision tower and projectors)."""
    from support.train_worker import image_model

    from e5v import E5V
    from e5v.items import Item
    from e5v.train.trainer import write_adapter

    path = str(tiny_dirs[family])
    model, sents = image_model(path)
    if family == "qwen3-vl":  # --train-projector: the merger and the deepstack mergers
        assert any(n.startswith("visual.deepstack_merger_list.") for n in model.vision)
    rows = read_triplets(image_rows(tmp_path, 5))
    sides = [rows[0].positive, rows[1].anchor, rows[2].anchor, rows[4].anchor, rows[4].positive, rows[0].anchor]
    with torch.no_grad():
        got = F.normalize(sents.encoder(model.runner, CPU)(sents.prepare(sides)), dim=-1).numpy()
    write_adapter(model, tmp_path, model.named_trainable())
    engine = E5V.from_pretrained(path, adapter=str(tmp_path))
    base = E5V.from_pretrained(path)
    for i, s in enumerate(sides):
        text, item = (s, Item(text=s)) if isinstance(s, str) else (s.text, Item(text=s.text, image=s.image))
        prompt = default_prompt(s, prompts.TEXT) if not isinstance(s, str) else prompts.TEXT
        want = engine.encode([item], prompt=prompt)[0]
        assert np.abs(got[i] - want).max() <= 1e-5, (i, s)
        assert np.abs(got[i] - base.encode([item], prompt=prompt)[0]).max() > 1e-3, (i, text)


# --- runs: a corrupt image, resume and merge, 2 processes -----------------------------------------------------------
def _cfg(tiny_dirs, data, out, **kw) -> dict:
    base = dict(model=str(tiny_dirs[FAMILY]), data=str(data), output_dir=str(out), batch_size=6, micro_batch_size=8,
                warmup_steps=1, learning_rate=2e-3, lora_r=4, lora_dropout=0.1, max_steps=3, save_steps=1,
                gradient_checkpointing=False, progress=False, tensorboard=False, train_projector=True,
                vision_lora=True)
    return {**base, **kw}


def test_corrupt_images_are_skipped_with_their_reason_and_the_run_goes_on(tiny_dirs, tmp_path, caplog):
    """Rows whose query image is no image are left out of their step (a warning names the row, the file and the
    reason; the step's record counts them); a corrupt hard negative drops only itself (the pair trains). A step
    whose rows are all bad is no item failure but broken data or settings: the run stops with the reason."""
    from e5v.train import train

    data = image_rows(tmp_path, 12, corrupt=(0, 1, 2, 3, 7), corrupt_negatives=(5,))
    cfg = _cfg(tiny_dirs, data, tmp_path / "run", batch_size=4, max_steps=3, seed=0)
    with caplog.at_level(logging.WARNING, logger="e5v.train"):
        train(make_config(**cfg))
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    batches = [batch_indices(12, 4, k, 0) for k in range(3)]
    want = [sum(i in (0, 1, 2, 3, 7) for i in b) for b in batches]
    assert [r["skipped"] for r in log] == want and sum(want) == 5
    assert [r["skipped_negatives"] for r in log] == [int(5 in b) for b in batches]
    k = next(k for k, b in enumerate(batches) if 5 in b)  # row 5 trains without its negative
    kept = [i for i in batches[k] if i not in (0, 1, 2, 3, 7)]
    assert log[k]["candidates"] == len(kept) + sum(i % 5 in (0, 2, 3) and i != 5 for i in kept)
    warned = [r.getMessage() for r in caplog.records if "left out of its step" in r.getMessage()]
    rows_out = [m for m in warned if m.startswith("training row left out")]
    assert len(rows_out) == 5 and all("img/broken.png" in m and "not a recognised image file" in m for m in rows_out)
    assert any("sides.jsonl:line 8 query" in m for m in rows_out)
    assert [m for m in warned if m.startswith("hard negative left out of its step, the pair stays: ")
            and "sides.jsonl:line 6 negative (img/broken.png)" in m]

    every = image_rows(tmp_path / "all", 4, corrupt=(0, 1, 2, 3))  # every row bad: the run stops, with the reason
    with pytest.raises(InputError, match=r"step 1: all 4 rows of the batch were left out \(first: .*sides.jsonl:line "
                                         r"\d query \(img/broken.png\): not a recognised image file"):
        train(make_config(**_cfg(tiny_dirs, every, tmp_path / "all-bad", batch_size=4, max_steps=2)))
    assert not (tmp_path / "all-bad" / "adapter").exists()


def test_image_run_resumes_exactly_and_merges_everything(tiny_dirs, tmp_path):
    """A run with images (LoRA on the LM and the tower, the projector trained) resumed from its step-1 checkpoint
    ends with the same adapter and vision weights; merged, they give the vectors of the adapter applied unmerged,
    for images and texts, and the vision weights are really in both (image vectors differ without them)."""
    from safetensors.torch import load_file

    from e5v import E5V
    from e5v.adapters import VISION_FILE
    from e5v.train import train
    from e5v.train.merge import merge

    data = image_rows(tmp_path, 12)
    cfg = _cfg(tiny_dirs, data, tmp_path / "straight", warmup_steps=0)  # step 1 already moves every weight
    straight = train(make_config(**cfg))
    again = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", again)
    shutil.rmtree(again / "adapter")
    for ckpt in sorted((again / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(ckpt)
    log = [json.loads(x) for x in (again / "log.jsonl").read_text().splitlines()]
    log[0]["before_kill"] = True
    (again / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    resumed = train(make_config(**{**cfg, "output_dir": str(again)}))
    assert json.loads((again / "log.jsonl").read_text().splitlines()[0]).get("before_kill")  # it resumed
    for name in ("adapter_model.safetensors", VISION_FILE):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    vision = load_file(str(straight / VISION_FILE))
    assert any(".lora_B." in k for k in vision) and "multi_modal_projector.linear_1.weight" in vision
    first = load_file(str(again / "checkpoints" / "step-000001" / VISION_FILE))
    assert all(first[k].abs().max() > 0 for k in first if ".lora_B." in k)  # the checkpoint resumed from has moved

    path = str(tiny_dirs[FAMILY])
    merge(path, str(straight), tmp_path / "merged")
    images, texts = [str(tmp_path / "img" / f"{i}.png") for i in range(3)], ["a dog", "there is a car 3"]
    merged, applied = E5V.from_pretrained(str(tmp_path / "merged")), E5V.from_pretrained(path, adapter=str(straight))
    assert np.abs(merged.encode_image(images) - applied.encode_image(images)).max() < 1e-5
    assert np.abs(merged.encode_text(texts) - applied.encode_text(texts)).max() < 1e-5
    lm_only = tmp_path / "lm-only"
    shutil.copytree(straight, lm_only)
    (lm_only / VISION_FILE).unlink()
    assert np.abs(E5V.from_pretrained(path, adapter=str(lm_only)).encode_image(images)
                  - applied.encode_image(images)).max() > 1e-3


@pytest.mark.parametrize("single", [False, True])
def test_mixed_run_resumes_exactly(tiny_dirs, tmp_path, single):
    """Two sources (text triplets, image sides) in the ratio 1:2, mixed in each batch or one source per batch, LoRA
    dropout on: a run resumed from its step-2 checkpoint (as if killed before step 3's) sees the same batches and
    ends with the same adapter and vision weights as the run that was never interrupted."""
    from safetensors.torch import load_file

    from e5v.adapters import VISION_FILE
    from e5v.train import train

    text = write_csv(tmp_path / "t.csv", [triplet(i) for i in range(8)])
    data = f"{text},{image_rows(tmp_path, 10)}"
    cfg = _cfg(tiny_dirs, data, tmp_path / "straight", batch_size=3, max_steps=5, warmup_steps=0,
               data_weights="1,2", single_source_batches=single)
    straight = train(make_config(**cfg))
    again = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", again)
    shutil.rmtree(again / "adapter")
    for ckpt in sorted((again / "checkpoints").glob("step-*"))[2:]:
        shutil.rmtree(ckpt)
    resumed = train(make_config(**{**cfg, "output_dir": str(again)}))
    log = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    relog = [json.loads(x) for x in (again / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in relog] == [1, 2, 3, 4, 5] and relog[:2] == log[:2]  # steps 1-2 not redone
    assert [(r["loss"], r.get("source")) for r in relog[2:]] == [(r["loss"], r.get("source")) for r in log[2:]]
    if single:
        assert {r["source"] for r in log} == {0, 1}  # both sources drawn, one per batch
    for name in ("adapter_model.safetensors", VISION_FILE):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_processes_equal_one_with_images(tiny_dirs, tmp_path):
    from support import train_worker

    data = image_rows(tmp_path, 7)
    path = str(tiny_dirs[FAMILY])
    train_worker.grads(path, str(data), str(tmp_path / "one.pt"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, "grads", path, str(data),
           str(tmp_path / "two.pt")]
    proc = subprocess.run(cmd, env={**env(), "CHUNK": "3"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["candidates"] == two["candidates"] == 7 + 4
    assert abs(one["loss"] - two["loss"]) < 1e-5
    assert any(k.startswith("vision_tower.") for k in one["grads"])
    assert _close(two["grads"], one["grads"])
