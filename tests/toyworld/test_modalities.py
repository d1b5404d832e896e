"""The issue-17 experiment on the toy world: its training data (real and shuffled) and its resumable harness."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from e5v.toyworld import MINI, MINI_BEFORE_C, modalities, recipe, world


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
    rerun after a lost figures file and an interrupted training (a work folder without its report, beside the
    figures of an older training) re-measures the first, retrains and re-measures only the second and gives the
    same summary."""
    setup = recipe.setting(recipe.setting(recipe.setting(recipe.QUICK, "c_steps=1"), "c_triplets=8"), "c_batch=4")
    conditions = ["text+pairs", "pairs"]
    summary = modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions)
    rows = summary["galleries"]["0"]
    assert list(rows) == ["before", *conditions] and list(summary["loss"]) == conditions
    assert rows["pairs"]["t2i_r1_plain"]["runs"] and rows["pairs"] != rows["before"] != rows["text+pairs"]
    assert list(summary["versus"]["0"]) == ["text+pairs − pairs"]
    table = (tmp_path / "modalities_conditions=text+pairs,pairs_seeds=0_galleries=0.md").read_text()
    assert "| 0 | text+pairs |" in table and "| 0 | text+pairs − pairs |" in table
    settings = json.loads((tmp_path / "runs" / "text+pairs-s0" / "stage-c.json").read_text())["settings"]
    assert settings["condition"] == "text+pairs" and settings["recipe"]["c_steps"] == 1
    assert settings["data_weights"] == "1,1"
    data = tmp_path / "runs" / "pairs-s0" / "work" / "data"
    pictures = [data / json.loads(line)[side]["image"] for line in (data / "pairs.jsonl").read_text().splitlines()
                for side in ("positive", "negative")]
    assert all(p.resolve().parent == (tmp_path / "images-r1").resolve() and p.is_file() for p in pictures)

    (tmp_path / "runs" / "text+pairs-s0" / "figures.json").unlink()
    retrained = []
    stage_c = recipe.stage_c
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: pytest.fail("trained again"))
    assert modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions) == summary

    run = tmp_path / "runs" / "pairs-s0"
    (run / "stage-c.json").unlink()                     # killed during training: the report was never written
    stale = json.loads((run / "figures.json").read_text())
    stale["galleries"]["0"]["t2i_r1_plain"] = -1.0      # figures of an older training: measured again
    (run / "figures.json").write_text(json.dumps(stale))
    (run / "work" / "leftover").write_text("half a step")
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: retrained.append(a[2]) or stage_c(*a, **k))
    assert modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=conditions) == summary
    assert retrained == [run / "work"] and not (run / "work" / "leftover").exists()


def test_a_rerun_refuses_other_settings_measures_new_galleries_and_adopts_old_files(tmp_path, monkeypatch):
    """Each run records what it depends on: a rerun with another recipe, gallery size or base model is refused
    before anything runs, naming the file and the keys; a gallery a run lacks is measured; a selection gets its
    own summary files; files written before settings were recorded are adopted when what they record matches."""
    setup = recipe.setting(recipe.setting(recipe.setting(recipe.QUICK, "c_steps=6"), "c_triplets=24"), "c_batch=4")
    first = modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=8, conditions=["text"])
    run = tmp_path / "runs" / "text-s0"
    losses = [json.loads(line)["loss"] for line in (run / "work" / "stage-c" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and first["loss"]["text"]["runs"] == [pytest.approx(sum(losses[-5:]) / 5)]
    stem = tmp_path / "modalities_conditions=text_seeds=0_galleries=0"
    assert json.loads(stem.with_suffix(".json").read_text()) == first
    monkeypatch.setattr(recipe, "stage_c", lambda *a, **k: pytest.fail("trained again"))

    with pytest.raises(ValueError, match=r"runs/text-s0/stage-c.json: recipe.c_steps: 6 there, 7 asked"):
        modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], recipe.setting(setup, "c_steps=7"), scenes=8,
                       conditions=["text"])
    with pytest.raises(ValueError, match=r"runs/before/figures.json: scenes: 8 there, 6 asked"):
        modalities.run(tmp_path, MINI_BEFORE_C, [0], [0], setup, scenes=6, conditions=["text"])
    with pytest.raises(ValueError, match=r"runs/text-s0/stage-c.json: .*trained_from: sha256:\w+ there, sha256:"):
        modalities.run(tmp_path, MINI, [0], [0], setup, scenes=8, conditions=["text"])
    assert set(json.loads((run / "figures.json").read_text())["galleries"]) == {"0"}     # refused: nothing done

    both = modalities.run(tmp_path, MINI_BEFORE_C, [0], [0, 5], setup, scenes=8, conditions=["text"])
    assert both["galleries"]["0"] == first["galleries"]["0"] and both["galleries"]["5"]["text"] != \
        both["galleries"]["5"]["before"]
    assert set(json.loads((run / "figures.json").read_text())["galleries"]) == {"0", "5"}
    assert (tmp_path / "modalities_conditions=text_seeds=0_galleries=0,5.json").exists()
    assert json.loads(stem.with_suffix(".json").read_text()) == first         # the other selection's summary stays
    assert modalities.experiment.label("modalities", {"seeds": [0, 1, 2]}, {"seeds": [0, 1, 2]}) == "modalities"

    # the files of the first experiment (2026-12-01) recorded the recipe, the condition and the training base's path
    report, figures = (json.loads((run / f).read_text()) for f in ("stage-c.json", "figures.json"))
    old = {"recipe": report["settings"]["recipe"], "condition": "text", "trained_from": str(MINI_BEFORE_C),
           "stage_c_loss": report["stage_c_loss"]}
    (run / "stage-c.json").write_text(json.dumps(old))
    (run / "figures.json").write_text(json.dumps({**old, "galleries": figures["galleries"]}))
    before = tmp_path / "runs" / "before" / "figures.json"
    galleries = json.loads(before.read_text())["galleries"]
    before.write_text(json.dumps({"galleries": galleries}))
    assert modalities.run(tmp_path, MINI_BEFORE_C, [0], [0, 5], setup, scenes=8, conditions=["text"]) == both
    assert json.loads((run / "stage-c.json").read_text()) == {**old, **report}
    assert json.loads((run / "figures.json").read_text())["settings"] == figures["settings"]

    old["recipe"]["c_lr"] = 1.0                     # recorded, and not what is asked
    (run / "stage-c.json").write_text(json.dumps(old))
    galleries["0"]["composed_queries"] = 999          # not the composed queries of an 8-scene gallery 0
    before.write_text(json.dumps({"galleries": galleries}))
    with pytest.raises(ValueError, match=r"(?s)before/figures.json: scenes: not recorded there, 8 asked.*"
                                         r"stage-c.json: recipe.c_lr: 1.0 there, 0.0004 asked"):
        modalities.run(tmp_path, MINI_BEFORE_C, [0], [0, 5], setup, scenes=8, conditions=["text"])


def test_a_difference_is_marked_beyond_welchs_threshold_and_one_query():
    """Marked (bold) only beyond both the two-sided 95 % Welch t threshold, as scipy's Welch test decides, and
    one query's worth of recall: not twice the standard error, and an error of 0 is no licence."""
    from scipy import stats

    rng = np.random.default_rng(0)
    runs = {"t2i_r1_plain": ([50.0, 51.0, 52.0], [52.0, 53.0, 54.0]),      # 2 > 2 × se (1.6), < t(4) × se (2.3)
            "t2i_r1_rich": ([50.5] * 3, [50.0] * 3),                       # se 0: half a point, one query of 200
            "t2t_r1": ([51.0] * 3, [50.0] * 3),                            # se 0: two queries
            "composed_r1": ([40.0, 40.1, 39.9], [39.3, 39.2, 39.4]),       # p < 0.001, but < one query of 122
            **{f"gap_{k}": (list(rng.normal(0, 1, 3)), list(rng.normal(rng.uniform(-4, 4), rng.uniform(0.2, 3), n)))
               for k, n in enumerate([3, 5, 4] * 20)}}
    summary = {"galleries": {"0": {kind: {c: modalities.experiment.spread(v[i]) for c, v in runs.items()}
                                   for i, kind in enumerate(("a", "b"))}},
               "queries": {"0": {"t2i_r1_plain": 200, "t2i_r1_rich": 200, "t2t_r1": 200, "composed_r1": 122}}}
    cells = modalities.experiment.versus(summary, [("a", "b")])["0"]["a − b"]
    table = modalities.experiment.versus_table({"0": {"a − b": cells}}, list(runs))
    assert "| 0 | a − b | -2.0 ± 0.8 | +0.5 ± 0.0 | **+1.0 ± 0.0** | +0.7 ± 0.1 |" in table
    assert table.count("**") == 2 * sum(c["marked"] for c in cells.values())
    gaps = [c for c in runs if c.startswith("gap_")]                      # no floor: Welch's test alone
    assert [cells[c]["marked"] for c in gaps] == [stats.ttest_ind(*runs[c], equal_var=False).pvalue < 0.05
                                                  for c in gaps]
    assert 10 < sum(cells[c]["marked"] for c in gaps) < 50
