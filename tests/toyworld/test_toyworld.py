"""The toy world, the bundled mini model's meaning, the recipe that builds it, and ``e5v demo``."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import e5v.batching
from e5v import E5V, prompts
from e5v.items import Item
from e5v.cli import main
from e5v.toyworld import MINI, demo, measure, modalities, recipe, world


# --- the world ----------------------------------------------------------------------------------------------------
def test_split_holds_out_combinations_and_scenes_follow_it():
    train, held = world.split()
    assert len(held) == 40 and not train & held and len(train | held) == 200
    for attr, names in (("colour", world.COLOURS), ("shape", world.SHAPES), ("position", world.POSITIONS)):
        assert {getattr(o, attr) for o in train} == set(names)   # every word is still seen in training
    for s in world.scenes("train", 500):
        assert set(s.objects) <= train
    gallery = world.scenes("held-out", 200)
    assert len({s.content for s in gallery}) == 200
    assert all(set(s.objects) & held for s in gallery)
    assert all(len({o.position for o in s.objects}) == len(s.objects) for s in gallery)
    assert [s.id for s in world.scenes("held-out", 200)] == [s.id for s in gallery]   # deterministic


def test_galleries_of_different_seeds_share_few_scenes():
    """Galleries used to start with the same 40 single held-out objects, so every two shared over 40 of 200 scenes."""
    galleries = [{s.content for s in world.scenes("held-out", 200, seed=k)} for k in (0, 1, 7, 23, 101)]
    shared = [len(a & b) for i, a in enumerate(galleries) for b in galleries[i + 1:]]
    assert max(shared) <= 25, shared
    assert all(sum(len(s) == 1 for s in g) == 20 for g in galleries)        # single objects are still there


def test_render_is_deterministic_and_draws_the_colours_where_they_belong():
    scene = world.Scene((world.Obj("red", "square", "left"), world.Obj("blue", "circle", "right")), seed=3)
    img = np.asarray(world.render(scene))
    assert img.shape == (world.SIZE, world.SIZE, 3)
    assert np.array_equal(img, np.asarray(world.render(scene)))
    half = world.SIZE // 2
    red = (img[..., 0] > 180) & (img[..., 1] < 90) & (img[..., 2] < 90)
    blue = (img[..., 2] > 180) & (img[..., 0] < 100)
    assert red[:, :half].sum() > 50 and red[:, half:].sum() == 0
    assert blue[:, half:].sum() > 50 and blue[:, :half].sum() == 0


def test_captions_name_every_attribute_in_both_registers():
    scene = world.Scene((world.Obj("orange", "diamond", "top"),))
    rng = random.Random(0)
    for _ in range(20):
        plain = world.caption(scene, rng)
        assert "orange" in plain and "diamond" in plain and "at the top" in plain and "an orange" in plain
    rich = {world.caption(scene, rng, rich=True) for _ in range(60)}
    assert any("amber" in c for c in rich) and any("rhombus" in c for c in rich) and any("up north" in c for c in rich)
    assert all(re.search(r"\ba [aeiou]", c) is None for c in rich)


def test_edits_change_exactly_one_attribute():
    scene = world.Scene((world.Obj("red", "square", "left"), world.Obj("blue", "circle", "right")))
    edits = world.edits(scene)
    assert len(edits) == 2 * (7 + 4 + 3)
    for new, words in edits:
        diff = [(a, b) for a, b in zip(scene.objects, new.objects) if a != b]
        assert len(diff) == 1
        (a, b), = diff
        assert sum(getattr(a, f) != getattr(b, f) for f in ("colour", "shape", "position")) == 1
        assert f"{a.colour} {a.shape}" in words and (b.colour in words or b.shape in words or b.position in words)


# --- the bundled model ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mini():
    with E5V.from_pretrained(str(MINI), device="cpu", dtype="float32") as m:
        yield m


@pytest.fixture(scope="module")
def held_out():
    return measure.gallery(200)


def test_mini_model_is_small_and_a_llava_next_checkpoint():
    size = sum(f.stat().st_size for f in MINI.iterdir())
    assert size < 5 * 2 ** 20, size
    cfg = json.loads((MINI / "config.json").read_text())
    assert cfg["model_type"] == "llava_next" and cfg["vision_config"]["model_type"] == "clip_vision_model"
    assert cfg["text_config"]["model_type"] == "llama"


def test_shipped_model_is_stage_c_of_the_shipped_checkpoint_before_it():
    """mini-before-c is the model before stage C: stage C (LoRA on the language model, merged) changed the language
    model and nothing else; the control adapter holds LoRA weights for the language model only."""
    from safetensors.numpy import load_file

    from e5v.toyworld import MINI_BEFORE_C, MINI_SHUFFLED

    after, before = load_file(MINI / "model.safetensors"), load_file(MINI_BEFORE_C / "model.safetensors")
    assert after.keys() == before.keys()
    lm = {k for k in after if "language_model" in k}
    assert lm and all(np.array_equal(after[k], before[k]) for k in after.keys() - lm)
    assert sum(not np.array_equal(after[k], before[k]) for k in lm) >= 4 * 7     # every adapted projection
    control = load_file(MINI_SHUFFLED / "adapter_model.safetensors")
    assert control and all("lora_" in k for k in control)
    assert json.loads((MINI_SHUFFLED / "adapter_config.json").read_text())["r"] == recipe.Recipe().c_lora_r


@pytest.fixture(scope="module")
def unprompted(mini, held_out):
    return measure.evaluate(mini, held_out, prompted=False)


@pytest.mark.slow
def test_mini_model_retrieves_unseen_scenes_with_the_e5v_prompts(mini, held_out, unprompted):
    figures = measure.evaluate(mini, held_out)
    assert figures["t2i_r1_plain"] >= 40, figures
    assert figures["i2t_r1_plain"] >= 30, figures
    assert figures["gap_plain"] < unprompted["gap_plain"]


def test_no_prompt_loses_the_shared_space(unprompted):
    assert unprompted["t2i_r1_plain"] <= 5


@pytest.mark.slow
def test_first_token_pooling_fails(mini, held_out, monkeypatch):
    monkeypatch.setattr(e5v.batching, "pool_last", lambda h: h[:, 0])
    assert measure.evaluate(mini, held_out)["t2i_r1_plain"] <= 5


@pytest.mark.slow
def test_right_padding_fails(mini, held_out, monkeypatch):
    """Right padding pools a pad position for every caption shorter than the longest in its batch. All 400 query
    captions (both registers) go in one batch, so that is every caption shorter than the longest of all."""
    monkeypatch.setattr(mini, "max_batch_tokens", 1 << 20)
    monkeypatch.setattr(mini, "max_batch_size", 1024)
    captions = held_out.plain + held_out.rich
    lengths = np.array([len(mini.prepare(Item(text=t), prompts.TEXT)) for t in captions])
    padded = lengths < lengths.max()
    assert padded.mean() > 0.9
    images = mini.encode_image(held_out.images)

    def t2i_r1_of_padded():
        sim = mini.encode_text(captions) @ images.T
        return measure.recall_at(sim[padded], np.flatnonzero(padded) % len(images), 1)

    assert t2i_r1_of_padded() >= 25                    # the same captions, left-padded: found
    monkeypatch.setattr(mini.backbone, "padding_side", "right")
    assert t2i_r1_of_padded() <= 5


# --- the recipe -------------------------------------------------------------------------------------------------------
def test_training_never_shows_the_image_prompt():
    """Stage B captions images with its own instructions; "Summary above image" must work zero-shot."""
    rng = random.Random(1)
    texts = [p or "" for s in world.scenes("train", 300) for p, _ in [recipe.text_example(s, rng)]]
    texts += [recipe.image_example(s, rng)[0] for s in world.scenes("train", 300)]
    assert any("Summary above sentence in one word" in t for t in texts)
    assert not any("Summary above image" in t for t in texts)


@pytest.mark.slow
def test_no_training_text_or_picture_shows_a_held_out_triple(monkeypatch):
    """All training data of the full recipe: the tokenizer's corpus, stage C's triplets (the real ones and the
    shuffled control) and every batch of stages A, V and B; and every row of the modalities experiment. Every text
    names its objects through ``world.phrase``, ``world.edit_words`` or ``world.question``, and every picture is a
    scene: spies collect them all."""
    held = world.split()[1]
    named = set()

    def spy(name, objects):
        real = getattr(world, name)
        monkeypatch.setattr(world, name, lambda *a, **k: (named.update(objects(*a, **k)), real(*a, **k))[1])

    spy("phrase", lambda o, *a, **k: [o])
    spy("edit_words", lambda old, new: [old, new])
    spy("question", lambda scene, rng: scene.objects)

    def check(part):
        shown = sorted(f"{o.colour} {o.shape} {o.position}" for o in named & held)
        assert not shown, f"{part} shows {len(shown)} held-out triples, e.g. {shown[:3]}"

    setup = recipe.Recipe()
    for shuffled in (False, True):
        recipe.triplets(setup.c_triplets, setup.c_seed, shuffled)
        check("stage C")
    for source in modalities.SOURCES:         # the issue-17 experiment's data: its seeds, real and shuffled
        for seed in (0, 1, 2):
            for shuffled in (False, True):
                for row in modalities.rows(source, modalities.SETTINGS.c_triplets, seed, shuffled):
                    named.update(o for side in row if isinstance(side, modalities.Side) and side.scene
                                 for o in side.scene.objects)
        check(f"the {source} data of e5v.toyworld.modalities")
    recipe.corpus(setup.seed)
    check("the tokenizer's corpus")
    for stage in "AVB":
        for batch in recipe.training_data(setup, stage):
            pictures = batch if stage == "V" else batch[1] if stage == "B" else []
            named.update(o for s in pictures for o in s.objects)
        check(f"stage {stage}")
    assert len(named) == 160      # the spies saw every training triple


def test_shuffled_control_keeps_the_sentences_and_loses_the_pairs():
    real, control = recipe.triplets(200, seed=0), recipe.triplets(200, seed=0, shuffled=True)
    for k in range(3):
        assert sorted(r[k] for r in real) == sorted(r[k] for r in control)
    assert [r[0] for r in real] == [r[0] for r in control]
    assert sum(a[1] == b[1] for a, b in zip(real, control)) < 10
    assert sum(a[2] == b[2] for a, b in zip(real, control)) < 10


def test_nli_triplets_are_paraphrases_and_one_attribute_changes():
    for anchor, positive, negative in recipe.triplets(50, seed=0):
        assert anchor != negative
        a, n = Counter(anchor.split(" ")), Counter(negative.split(" "))
        assert 1 <= sum((a - n).values()) <= 4 and sum((a & n).values()) >= 3   # the anchor's wording, one change
        assert positive


@pytest.mark.slow
def test_quick_recipe_gives_the_same_weights_under_1_and_2_threads(tmp_path):
    """Two runs of ``python -m e5v.toyworld.recipe --quick``, with OMP_NUM_THREADS 1 and 2: bit-identical weights
    (without the recipe's own thread setting the vision tower differed by 1e-5 after 4 steps)."""
    from safetensors.numpy import load_file

    runs = {n: subprocess.Popen([sys.executable, "-m", "e5v.toyworld.recipe", str(tmp_path / n), "--quick"],
                                env={**os.environ, "OMP_NUM_THREADS": n}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for n in ("1", "2")}
    for p in runs.values():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    first = json.loads((tmp_path / "1" / "recipe.json").read_text())
    one, two = load_file(tmp_path / "1" / "model.safetensors"), load_file(tmp_path / "2" / "model.safetensors")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    for stage in ("stage_a_loss", "stage_b_loss", "stage_c_loss"):
        assert all(np.isfinite(first[stage]))
    with E5V.from_pretrained(str(tmp_path / "1"), device="cpu", dtype="float32") as m:
        vec = m.encode_image([world.render(world.scenes("held-out", 1)[0])])
        assert vec.shape == (1, 128) and np.isclose(np.linalg.norm(vec), 1)


def test_claim2_measures_real_and_shuffled_stage_c_and_resumes(tmp_path, monkeypatch):
    """A tiny claim-2 run (1 stage-C step, 8-scene gallery); then a rerun after a lost figures file re-measures that
    run only, trains nothing, and gives the same summary."""
    from e5v.toyworld import claim2

    setup = recipe.setting(recipe.QUICK, "c_steps=1")
    summary = claim2.run(tmp_path, MINI, [0], [0], setup, scenes=8)
    rows = summary["galleries"]["0"]
    assert list(rows) == ["before", "real", "shuffled"] and list(summary["loss"]) == ["real", "shuffled"]
    assert rows["real"]["t2t_r1"]["runs"] and rows["real"]["match_cos"] != rows["before"]["match_cos"]
    assert "| 0 | shuffled |" in (tmp_path / "claim2_seeds=0_galleries=0.md").read_text()
    (tmp_path / "runs" / "shuffled-s0" / "figures.json").unlink()
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: pytest.fail("trained again"))
    assert claim2.run(tmp_path, MINI, [0], [0], setup, scenes=8) == summary


# --- the demo --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_indexes_queries_reports_and_writes_a_page(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--scenes", "60"]) == 0
    text = capsys.readouterr().out
    assert "gallery: 60 held-out scenes" in text
    assert len(re.findall(r"^(text|image|composed) query:", text, re.M)) == 8
    figures = json.loads((out / "recall.json").read_text())
    assert figures["with prompts"]["t2i_r1_plain"] > figures["without prompts"]["t2i_r1_plain"]
    page = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 8 * 5 and all((out / s).is_file() for s in srcs)
    assert page.count('class="hit"') >= 4    # wanted scenes found and framed
    claim = figures["claim 2"]      # before / after stage C and the shuffled control, on two galleries
    assert list(claim) == ["gallery 0 (held-out)", "gallery 7"]
    for rows in claim.values():
        assert list(rows) == [name for name, _, _ in demo.CLAIM2_MODELS]
        assert len({json.dumps(f, sort_keys=True) for f in rows.values()}) == 3     # three different models
    assert claim["gallery 0 (held-out)"]["after stage C (shipped)"] == figures["with prompts"]
    assert len(re.findall(r"^ .*(before stage C|after stage C \(shipped\)|shuffled-pairs control) +text->image",
                          text, re.MULTILINE)) == 6

    # the same folder again with a smaller gallery (the documented `e5v demo --scenes 100` after `e5v demo`): the
    # demo's own index and pictures of the earlier gallery are replaced, not refused or mixed in
    assert main(["demo", "--out", str(out), "--scenes", "20"]) == 0
    again = capsys.readouterr()
    assert "index: 20 pictures" in again.out and "nan" not in again.out and "Loading weights" not in again.err
    assert sorted(p.name for p in (out / "gallery").iterdir()) == demo.gallery_names(measure.gallery(20))
