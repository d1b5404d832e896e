"""The issue-17 experiment on the toy world: its training data (real and shuffled) and its resumable harness."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from e5v.toyworld import MINI_BEFORE_C, modalities, recipe, world


def one_change(a: world.Scene, b: world.Scene) -> bool:
    """``b`` is ``a`` with exactly one attribute of one object changed."""
    diff = [(x, y) for x, y in zip(a.objects, b.objects) if x != y]
    return len(a.objects) == len(b.objects) and len(diff) == 1 and \
        sum(getattr(diff[0][0], f) != getattr(diff[0][1], f) for f in ("colour", "shape", "position")) == 1


def test_image_rows_pair_what_belongs_together():
    for query, positive, negative in modalities.rows("pairs", 100, seed=0):
        assert query.scene is None and positive.text is None and negative.text is None
        words = set(re.findall(r"[a-z]+", query.text))
        for o in positive.scene.objects:                # the caption names every object of the picture
            assert {o.colour, world.COLOURS[o.colour][1]} & words and {o.shape, world.SHAPES[o.shape]} & words
        assert one_change(positive.scene, negative.scene)
    for query, positive, negative in modalities.rows("composed", 100, seed=0):
        assert query.text and query.scene and positive.prompt == negative.prompt == modalities.prompts.CIRR_CANDIDATE
        assert one_change(query.scene, positive.scene) and one_change(query.scene, negative.scene)
        assert positive.scene != negative.scene
        assert dict(world.edits(query.scene))[positive.scene] == query.text     # the words ask for the positive


@pytest.mark.parametrize("source", modalities.SOURCES)
def test_shuffled_rows_keep_the_items_and_lose_the_pairs(source):
    real, control = modalities.rows(source, 200, seed=1), modalities.rows(source, 200, seed=1, shuffled=True)
    assert [r[0] for r in real] == [r[0] for r in control]
    for k in (1, 2):
        assert sorted(map(repr, (r[k] for r in real))) == sorted(map(repr, (r[k] for r in control)))
        assert sum(a[k] == b[k] for a, b in zip(real, control)) < 10
    assert real == modalities.rows(source, 200, seed=1) and real != modalities.rows(source, 200, seed=2)


def test_written_data_is_what_train_reads(tmp_path):
    data = modalities.rows("composed", 4, seed=0)
    path = modalities.write("composed", data, tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and set(records[0]) == {"query", "positive", "negative"}
    first = records[0]
    assert first["query"]["text"] == data[0][0].text and "prompt" not in first["query"]
    assert first["positive"]["prompt"] == modalities.prompts.CIRR_CANDIDATE
    for side, row_side in zip(("query", "positive", "negative"), data[0]):
        assert np.array_equal(np.asarray(Image.open(tmp_path / first[side]["image"])),
                              np.asarray(world.render(row_side.scene)))
    assert modalities.write("text", modalities.rows("text", 3, 0), tmp_path).read_text().startswith(
        "sent0,sent1,hard_neg")
    with pytest.raises(ValueError, match=r"unknown condition 'text\+images'"):
        modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], conditions=["text", "text+images"])


def test_harness_measures_two_conditions_and_resumes(tmp_path, monkeypatch):
    """A tiny run of two conditions, a mixture with images and one image source (1 step, 8-scene gallery); then a
    rerun after a lost figures file and an interrupted training (a work folder without its report) re-measures
    the first, retrains only the second and gives the same summary."""
    setup = recipe.setting(recipe.setting(recipe.setting(recipe.QUICK, "c_steps=1"), "c_triplets=8"), "c_batch=4")
    conditions = ["text+pairs", "pairs"]
    summary = modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions)
    rows = summary["galleries"]["0"]
    assert list(rows) == ["before", *conditions] and list(summary["loss"]) == conditions
    assert rows["pairs"]["t2i_r1_plain"]["runs"] and rows["pairs"] != rows["before"] != rows["text+pairs"]
    assert list(summary["versus"]["0"]) == ["text+pairs − pairs"]
    table = (tmp_path / "modalities.md").read_text()
    assert "| 0 | text+pairs |" in table and "| 0 | text+pairs − pairs |" in table
    report = json.loads((tmp_path / "runs" / "text+pairs-s0" / "stage-c.json").read_text())
    assert report["condition"] == "text+pairs" and report["recipe"]["c_steps"] == 1
    assert report["data_weights"] == "1,1"
    data = tmp_path / "runs" / "pairs-s0" / "work" / "data"
    pictures = [data / json.loads(line)[side]["image"] for line in (data / "pairs.jsonl").read_text().splitlines()
                for side in ("positive", "negative")]
    assert all(p.resolve().parent == (tmp_path / "images").resolve() and p.is_file() for p in pictures)

    (tmp_path / "runs" / "text+pairs-s0" / "figures.json").unlink()
    retrained = []
    stage_c = recipe.stage_c
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: pytest.fail("trained again"))
    assert modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions) == summary

    run = tmp_path / "runs" / "pairs-s0"
    (run / "stage-c.json").unlink()                     # killed during training: the report was never written
    (run / "figures.json").unlink()
    (run / "work" / "leftover").write_text("half a step")
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: retrained.append(a[2]) or stage_c(*a, **k))
    assert modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions) == summary
    assert retrained == [run / "work"] and not (run / "work" / "leftover").exists()
