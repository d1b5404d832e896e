"""End-to-end `e5v eval` on a tiny model and tiny fixture datasets: every task, both layouts, the cache, a
resumed run, --limit, bad data.  Numbers mean nothing (random weights); what is checked is that each task
scores exactly what the engine gives with the official prompt and protocol."""
import json

import numpy as np
import pytest

import e5v.cli
import e5v.cli.common
from support import eval_data as fx
from e5v import prompts
from e5v.eval import metrics, tasks
from e5v.parts import PartStore

pytestmark = pytest.mark.slow  # end to end: every task of the paper on a tiny model (the full_run fixture)


@pytest.fixture(autouse=True)
def only_eval_verb(monkeypatch):
    monkeypatch.setattr(e5v.cli, "VERB_MODULES", ("e5v.cli.eval",))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return fx.write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    """The e5v-like tiny checkpoint; conftest's ``engine`` fixture loads it for this module."""
    return str(tiny_dirs["e5v-like"])


def run(argv, capsys=None):
    rc = e5v.cli.main(["eval", *argv, "--no-progress"])
    out = capsys.readouterr() if capsys else None
    return rc, out


def cached(folder):
    """Every vector a cache folder holds, in item order (the parts' rows put back at their indices)."""
    parts = [np.load(f) for f in sorted(folder.glob("part-*.npz"))]
    n = sum(len(p["indices"]) + len(p["skipped"]) for p in parts)
    out = np.zeros((n, parts[0]["vectors"].shape[1]), np.float32)
    for p in parts:
        out[p["indices"]] = p["vectors"]
    return out


def one_folder(parent, prefix):
    found = [f for f in parent.glob(f"{prefix}-*") if f.name[len(prefix) + 1:].isalnum()]
    assert len(found) == 1, found
    return found[0]


def hand_order(row, drop=()):
    """Candidate indices best first, without ``drop`` (an independent re-statement of the ranking)."""
    return [j for j in np.argsort(-row, kind="stable") if j not in drop]


def hand_recall(scores, positives, k, drop=None):
    drop = drop or [()] * len(scores)
    return 100 * np.mean([bool(set(hand_order(r, d)[:k]) & set(p)) for r, p, d in zip(scores, positives, drop)])


@pytest.fixture(scope="module")
def full_run(release, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    import e5v.cli as c

    saved, c.VERB_MODULES = c.VERB_MODULES, ("e5v.cli.eval",)
    try:
        rc = c.main(["eval", "paper", "cirr-test", "--model", model_dir, "--data", str(release), "--out", str(out),
                     "--no-progress", "--part-size", "8"])
    finally:
        c.VERB_MODULES = saved
    return rc, out, json.loads((out / "results.json").read_text())


def test_every_task_runs(full_run):
    rc, out, res = full_run
    assert rc == 0
    expected = {"flickr30k", "coco", "cirr", "fashioniq", "i2i-flickr30k", "i2i-coco", "sts12", "sts13", "sts14",
                "sts15", "sts16", "sts-b", "sick-r", "cirr-test"}
    assert set(res["tasks"]) == expected
    assert res["dtype"] == "float32"
    for name, t in res["tasks"].items():
        for v in t["metrics"].values():
            assert -100 <= v <= 100, (name, v)
    assert set(res["tasks"]["cirr"]["metrics"]) == {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"}
    assert res["tasks"]["coco"]["counts"] == {"images": 3, "captions": 15}
    f = res["tasks"]["fashioniq"]["metrics"]
    assert f["avg_R@10"] == pytest.approx(np.mean([f["dress_R@10"], f["shirt_R@10"], f["toptee_R@10"]]))
    md = (out / "results.md").read_text()
    assert "| flickr30k | t2i_R@1 |" in md and "79.50" in md and "sts (avg of 7)" in md and "86.00" in md
    # every number the paper has for a task run here is set beside ours (the metric names match)
    from e5v.eval import report

    shown = {(t, m): p for t, m, _, p in report.rows(res)}
    for task in res["tasks"]:
        for metric, value in report.PAPER.get(task, {}).items():
            assert shown[(task, metric)] == value, (task, metric)
            assert f"| {task} | {metric} |" in md


def test_retrieval_scores_the_engine_vectors(full_run, release, engine):
    _, _, res = full_run
    from e5v.eval import readers

    d = readers.read_retrieval(release / "flickr30k", "flickr30k")
    t = engine.encode_text(d.captions)  # the README text prompt
    i = engine.encode_image(list(d.images[:]))  # the README image prompt
    s = t @ i.T
    t2i = metrics.recall_at_k(s, d.caption_image, (1, 5, 10))
    i2t = metrics.recall_at_k(s.T, [np.flatnonzero(d.caption_image == k) for k in range(4)], (1, 5, 10))
    got = res["tasks"]["flickr30k"]["metrics"]
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i[k]) and got[f"i2t_R@{k}"] == pytest.approx(i2t[k])


def test_sts_uses_prompt_and_cleanup(full_run, release, engine):
    _, _, res = full_run
    from e5v.eval import readers

    a, b, g = readers.read_sts(release / "senteval", "sts-b").subsets["test"]
    ea = engine.encode([tasks.clean_sts_sentence(s) for s in a], prompt=prompts.STS)
    eb = engine.encode([tasks.clean_sts_sentence(s) for s in b], prompt=prompts.STS)
    expected = metrics.spearman((ea * eb).sum(1), g) * 100
    assert res["tasks"]["sts-b"]["metrics"]["spearman"] == pytest.approx(expected, abs=1e-4)
    # STS12-16: one correlation over every subset's pairs ("all"), the per-subset values in the details
    assert set(res["tasks"]["sts12"]["details"]["subsets"]) == {"MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN",
                                                                 "surprise.SMTnews"}
    assert res["tasks"]["sts12"]["counts"]["pairs"] == 15


def test_sts_all_aggregation_and_sick_r(full_run, release, engine):
    """STS12: one Spearman over the concatenated subsets (SentEval "all"), not the mean of the subsets';
    SICK-R: the test file (header skipped) with the STS prompt and clean-up."""
    from scipy.stats import spearmanr

    from e5v.eval import readers

    _, _, res = full_run

    def cosines(a, b):
        ea = engine.encode([tasks.clean_sts_sentence(s) for s in a], prompt=prompts.STS)
        eb = engine.encode([tasks.clean_sts_sentence(s) for s in b], prompt=prompts.STS)
        return (ea * eb).sum(1)

    cos, gold, per = [], [], []
    for a, b, g in readers.read_sts(release / "senteval", "sts12").subsets.values():
        c = cosines(a, b)
        cos.append(c)
        gold.append(g)
        per.append(spearmanr(c, g).correlation * 100)
    expected = spearmanr(np.concatenate(cos), np.concatenate(gold)).correlation * 100
    got = res["tasks"]["sts12"]
    assert got["metrics"]["spearman"] == pytest.approx(expected, abs=1e-4)
    assert got["details"]["mean"] == pytest.approx(np.mean(per), abs=1e-4)
    assert abs(expected - np.mean(per)) > 1  # the fixture tells "all" from the mean of the subsets
    a, b, g = readers.read_sts(release / "senteval", "sick-r").subsets["test"]
    expected = spearmanr(cosines(a, b), g).correlation * 100
    assert res["tasks"]["sick-r"]["metrics"]["spearman"] == pytest.approx(expected, abs=1e-4)


def test_i2i_embeds_rendered_captions_with_the_image_prompt(full_run, release, engine):
    from e5v.eval import readers, render

    _, out, res = full_run
    d = readers.read_retrieval(release / "coco", "coco", max_captions=5)
    t = engine.encode_image([render.render_caption(c) for c in d.captions])  # image prompt on the drawn captions
    i = engine.encode_image(list(d.images[:]))
    np.testing.assert_allclose(cached(one_folder(out / "cache" / "coco", "rendered-captions")), t, atol=1e-5)
    s = t @ i.T
    per_image = [np.flatnonzero(d.caption_image == k) for k in range(len(d.image_ids))]
    got = res["tasks"]["i2i-coco"]["metrics"]
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(hand_recall(s, [[o] for o in d.caption_image], k))
        assert got[f"i2t_R@{k}"] == pytest.approx(hand_recall(s.T, per_image, k))


def test_cirr_val_excludes_the_reference(full_run, release, engine):
    """Official prompts (CIRR query / candidate), the reference removed from the ranking, Recall_subset within
    the image set less the reference -- all recomputed here from the engine's vectors."""
    from e5v.eval import readers

    _, out, res = full_run
    d = readers.read_cirr(release / "cirr", "val")
    g = engine.encode_image(list(d.gallery[:]), task="cirr")  # "<image>\n Describe this image in one word:"
    q = engine.encode_composed([(d.query_images[k], x.text) for k, x in enumerate(d.queries)], task="cirr")
    np.testing.assert_allclose(cached(one_folder(out / "cache" / "cirr-val", "queries")), q, atol=1e-5)
    s = q @ g.T
    ix = {n: j for j, n in enumerate(d.gallery_ids)}
    targets = [[ix[x.target]] for x in d.queries]
    refs = [{ix[x.reference]} for x in d.queries]
    got = res["tasks"]["cirr"]["metrics"]
    for k in (1, 5, 10, 50):
        assert got[f"R@{k}"] == pytest.approx(hand_recall(s, targets, k, drop=refs))
    # the fixture is such that the reference would often come first: keeping it would change R@1
    assert hand_recall(s, targets, 1) != pytest.approx(got["R@1"])
    for k in (1, 2, 3):
        hits = [ix[x.target] in sorted((ix[m] for m in x.members if m != x.reference), key=lambda j: -s[i, j])[:k]
                for i, x in enumerate(d.queries)]
        assert got[f"Rsubset@{k}"] == pytest.approx(100 * np.mean(hits))


def test_fashioniq_sums_both_orders_before_normalising(release, engine, tmp_path):
    from e5v.eval import readers
    from e5v.eval.cache import Embedded, EmbeddingCache

    # by hand: raw states (3, 0) and (0, 1) sum to (3, 1) / sqrt(10); the mean of unit vectors would be (1, 1)
    a = Embedded(np.array([[3.0, 0.0], [1.0, 0.0]], np.float32), np.array([True, False]), [])
    b = Embedded(np.array([[0.0, 1.0], [0.0, 1.0]], np.float32), np.array([True, True]), [])
    c = tasks.combine_orders(a, b)
    assert c.vectors[0] == pytest.approx(np.array([3.0, 1.0]) / np.sqrt(10)) and c.valid.tolist() == [True, False]
    # the query sides are embedded raw: the cache asks the engine for unnormalised states
    d = readers.read_fashioniq(release / "fashioniq", "toptee")
    qp, _ = prompts.composed_prompts("fashioniq-toptee")
    assert "this shirt" in qp  # toptee is prompted as shirt
    ctx = tasks.Context(release, EmbeddingCache(tmp_path, {"m": 1}, lambda: engine, progress=False), tmp_path)
    res = tasks.fashioniq_category(ctx, "toptee")
    assert res.computed == 6 + 4 + 4
    raw = engine.embed([(d.query_images[k], tasks.fashioniq_query_text(q.text)) for k, q in enumerate(d.queries)],
                      prompt=qp, normalize=False).vectors
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    root = tmp_path / "fashioniq-toptee"
    np.testing.assert_allclose(cached(one_folder(root, "queries")), raw, atol=1e-5)
    rev = engine.embed([(d.query_images[k], tasks.fashioniq_query_text(q.text, reverse=True))
                       for k, q in enumerate(d.queries)], prompt=qp, normalize=False).vectors
    np.testing.assert_allclose(cached(one_folder(root, "queries-reversed")), rev, atol=1e-5)
    gallery = engine.encode_image(list(d.gallery[:]), task="fashioniq-toptee")  # "... this shirt ... its style:"
    np.testing.assert_allclose(cached(one_folder(root, "gallery")), gallery, atol=1e-5)


def test_cirr_test_submission_files(full_run, release, engine):
    _, out, res = full_run
    from e5v.eval import readers

    d = readers.read_cirr(release / "cirr", "test")
    s = engine.encode_composed([(d.query_images[k], x.text) for k, x in enumerate(d.queries)]) \
        @ engine.encode_image(list(d.gallery[:]), task="cirr").T
    rec = json.loads((out / "cirr_test_recall.json").read_text())
    sub = json.loads((out / "cirr_test_recall_subset.json").read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall" and sub["metric"] == "recall_subset"
    for q in d.queries:
        assert len(rec[q.pairid]) == 7 and q.reference not in rec[q.pairid]  # 8 images less the reference
        assert len(sub[q.pairid]) == 3 and set(sub[q.pairid]) <= set(q.members) - {q.reference}
        assert [x for x in rec[q.pairid] if x in sub[q.pairid]] == sub[q.pairid]  # same order as the full ranking
    for i, q in enumerate(d.queries):  # the ranking itself, recomputed: best first, reference left out
        order = [d.gallery_ids[j] for j in hand_order(s[i], {d.gallery_ids.index(q.reference)})]
        assert rec[q.pairid] == order[:50]
        assert sub[q.pairid] == [n for n in order if n in q.members][:3]
    names = ("cirr_test_recall.json", "cirr_test_recall_subset.json")
    assert sorted(res["tasks"]["cirr-test"]["files"]) == sorted(str(out / n) for n in names)


def test_second_run_reads_the_cache(full_run, release, model_dir, monkeypatch, capsys):
    _, out, res = full_run
    monkeypatch.setattr(e5v.cli.common, "load_model", lambda args: pytest.fail("the model was loaded"))
    rc, cap = run(["paper", "--model", model_dir, "--data", str(release), "--out", str(out), "--part-size", "8"],
                  capsys)
    assert rc == 0 and "all embeddings from the cache" in cap.out
    again = json.loads((out / "results.json").read_text())
    assert again["tasks"]["flickr30k"] == res["tasks"]["flickr30k"] and again["tasks"]["sts16"] == res["tasks"]["sts16"]
    assert "cirr-test" in again["tasks"]  # results of earlier runs with the same settings are kept


def test_interrupted_run_resumes_to_the_same_result(release, model_dir, tmp_path, monkeypatch, capsys):
    args = ["flickr30k", "i2i-coco", "--model", model_dir, "--data", str(release), "--part-size", "3"]
    assert run([*args, "--out", str(tmp_path / "whole")])[0] == 0
    real_write, writes = PartStore.write, []

    def dying_write(self, k, **arrays):
        if len(writes) == 5:
            raise KeyboardInterrupt  # as if killed after five finished parts
        writes.append(k)
        real_write(self, k, **arrays)

    monkeypatch.setattr(PartStore, "write", dying_write)
    rc, cap = run([*args, "--out", str(tmp_path / "cut")], capsys)
    assert rc == 130 and "rerun the same command to resume" in cap.err
    monkeypatch.setattr(PartStore, "write", real_write)
    rc, cap = run([*args, "--out", str(tmp_path / "cut")], capsys)
    assert rc == 0
    done = 20 + 4 + 15 + 3  # flickr captions + images, coco rendered captions + images
    assert f"embedded {done - 5 * 3} items" in cap.out  # five parts of three came from the interrupted run
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["tasks"]
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())["tasks"]
    assert cut == whole


def test_cache_is_keyed_by_model_adapter_dtype_prompt_and_inputs(engine, model_dir, tmp_path):
    from e5v.config import EngineConfig
    from e5v.eval.cache import EmbeddingCache
    from e5v.items import Item

    def settings(model_dir):  # what `e5v eval --model DIR --dtype float32` keys its cache with
        return EngineConfig(model=str(model_dir), dtype="float32", **tasks.ENGINE_OPTIONS).vector_settings()

    base = settings(model_dir)
    texts = ["a dog runs", "a red ball", "the sea"]

    def computed(settings, prompt=prompts.TEXT, texts=texts):
        cache = EmbeddingCache(tmp_path, settings, lambda: engine, part_size=2, progress=False)
        return cache.embed("d", "captions", prompt, [Item(text=t) for t in texts], texts).computed

    assert computed(base) == 3 and computed(base) == 0
    for change in ({"model": "other"}, {"adapter": "lora"}, {"dtype": "bfloat16"}):
        assert computed({**base, **change}) == 3, change
    assert computed(base, prompt=prompts.STS) == 3
    assert computed(base, texts=["a dog runs", "a red ball", "the lake"]) == 3
    assert computed(base) == 0  # each of those has its own folder: the first one is still there
    # a local checkpoint is identified by its files too: a re-trained model in the same folder is another model
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "ckpt")
    assert computed(settings(copy)) == 3 and computed(settings(copy)) == 0  # unchanged: reused
    cfg = copy / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert computed(settings(copy)) == 3


def test_adapter_is_evaluated_and_cached_apart(release, engine, model_dir, tmp_path, capsys):
    """--adapter DIR: the LoRA adapter is merged (other numbers than the base model) and its embeddings are
    cached apart from the base model's; results.json names the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    lm = AutoModelForCausalLM.from_config(engine.backbone.model.config.text_config)
    get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    common = ["sts-b", "--model", model_dir, "--data", str(release), "--out", str(tmp_path / "o")]
    spearman = []
    for extra in ([], ["--adapter", str(tmp_path / "adapter")], ["--adapter", str(tmp_path / "adapter")]):
        rc, cap = run([*common, *extra], capsys)
        res = json.loads((tmp_path / "o" / "results.json").read_text())
        assert rc == 0 and res["adapter"] == (extra[1] if extra else None)
        spearman.append((res["tasks"]["sts-b"]["metrics"]["spearman"], "all embeddings from the cache" in cap.out))
    assert spearman[0][0] != pytest.approx(spearman[1][0]) and not spearman[1][1]  # embedded anew with the adapter
    assert spearman[2] == (spearman[1][0], True)


def test_saved_layouts(tmp_path, model_dir, capsys):
    data = fx.write_saved(tmp_path / "data")
    rc, cap = run(["flickr30k", "coco", "cirr", "cirr-test", "fashioniq", "--model", model_dir, "--data", str(data),
                   "--out", str(tmp_path / "out")], capsys)
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]
    assert set(res["cirr"]["metrics"]) == {"R@1", "R@5", "R@10", "R@50"}  # no img_set in this layout
    assert "Recall_subset not computed" in res["cirr"]["notes"][0]
    assert res["fashioniq"]["counts"]["dress_queries"] == 4


def test_limit_is_a_quick_look(release, model_dir, tmp_path, capsys):
    rc, cap = run(["flickr30k", "sts-b", "--model", model_dir, "--data", str(release), "--out", str(tmp_path),
                   "--limit", "2"], capsys)
    assert rc == 0 and "not comparable with the paper" in cap.out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["limit"] == 2 and res["tasks"]["flickr30k"]["counts"] == {"images": 2, "captions": 10}
    assert res["tasks"]["sts-b"]["counts"]["pairs"] == 2


def test_bad_image_is_skipped_and_reported(tmp_path, model_dir, capsys, caplog):
    data = tmp_path / "data"
    fx.karpathy(data / "flickr30k", "flickr30k")
    (data / "flickr30k" / "flickr30k-images" / "flickr30k_1.jpg").write_bytes(b"not a jpeg")
    rc, cap = run(["flickr30k", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert rc == 3
    t = json.loads((tmp_path / "o" / "results.json").read_text())["tasks"]["flickr30k"]
    assert t["skipped"] == {"images": 1}
    assert "flickr30k image 1: " in t["details"]["skipped_examples"]["images"][0]
    assert t["metrics"]["t2i_R@10"] <= 75.0  # the captions of the broken image can never hit
    assert "1 item(s) failed to embed" in cap.out
    said = cap.err + "".join(r.getMessage() + "\n" for r in caplog.records)
    assert said.count("flickr30k image 1: ") == 1, said  # reported once, not by the engine and the cache


def test_missing_data_says_where_files_go(tmp_path, model_dir, capsys):
    rc, cap = run(["cirr", "--model", model_dir, "--data", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "captions/cap.rc2.{val,test1}.json" in cap.err and "cirr_imgs" in cap.err
    rc, cap = run(["nosuchtask", "--model", model_dir, "--data", str(tmp_path)], capsys)
    assert rc == 1 and "unknown task 'nosuchtask'" in cap.err


def test_sts_cleanup_and_fashioniq_text():
    c = tasks.clean_sts_sentence
    assert c("a dog runs") == "a dog runs."
    assert c("is it raining?") == "is it raining."
    assert c('he said "hi"') == "he said 'hi'"
    assert c('a "quoted" word') == "a 'quoted' word."
    assert c("") == ""
    assert tasks.fashioniq_query_text(["is red.", " has sleeves? "]) == "is red, has sleeves"
    assert tasks.fashioniq_query_text(["is red.", "has sleeves?"], reverse=True) == "has sleeves, is red"
    assert tasks.expand(["sts", "sts-b", "flickr30k"])[-1] == "flickr30k" and len(tasks.expand(["sts"])) == 7


def test_missing_dataset_fails_before_anything_is_embedded(tmp_path, model_dir, monkeypatch, capsys):
    """A run of several tasks reads every dataset first: the missing ones are all named, and nothing is embedded
    (the first task does not run to its end before the second one's folder turns out to be missing)."""
    data = tmp_path / "data"
    fx.karpathy(data / "flickr30k", "flickr30k")
    fx.senteval(data / "senteval")
    (data / "senteval" / "SICK" / "SICK_test_annotated.txt").unlink()
    monkeypatch.setattr(e5v.cli.common, "load_model", lambda args: pytest.fail("a model was loaded"))
    out = tmp_path / "o"
    rc, cap = run(["flickr30k", "coco", "sts-b", "sick-r", "i2i-coco", "--model", model_dir, "--data", str(data),
                   "--out", str(out)], capsys)
    assert rc == 1 and "Traceback" not in cap.err
    assert "3 task(s) cannot run, so nothing was embedded" in cap.err
    assert f"[coco, i2i-coco] coco: folder {data / 'coco'} not found" in cap.err
    assert f"[sick-r] senteval: missing file {data / 'senteval' / 'SICK' / 'SICK_test_annotated.txt'}" in cap.err
    assert "flickr30k]" not in cap.err and "sts-b]" not in cap.err
    assert not out.exists()


def test_sts_empty_sentence_is_embedded_as_the_official_code_does(tmp_path, engine):
    """eval_sts.py: mllm_template.format(' ' + template.replace('*sent 0*', s).strip()); for an empty sentence the
    strip takes the newline too, so the prompt alone is embedded. The pair counts like any other."""
    from e5v.items import Item
    from e5v.eval import readers
    from e5v.eval.cache import EmbeddingCache

    template = "*sent_0*\nSummary_above_sentence_in_one_word:".replace("_", " ")  # its default, as it uses it

    def official(s):
        return " " + template.replace("*sent 0*", s).strip()

    root = tmp_path / "senteval"
    (root / "STS" / "STSBenchmark").mkdir(parents=True)
    # (SentEval strips each STS-B row, so an empty sentence can only be the first of the pair there)
    pairs = [("", fx.sentence(1), 0.5), ("  ", fx.sentence(2), 4.0), (fx.sentence(3), fx.sentence(4), 2.0),
             (fx.sentence(5), fx.sentence(6), 3.5), (fx.sentence(7), fx.sentence(8), 1.0),
             (fx.sentence(9), fx.sentence(10), 5.0)]
    (root / "STS" / "STSBenchmark" / "sts-test.csv").write_text(
        "".join(f"g\tf\t2012\t{k}\t{s}\t{a}\t{b}\n" for k, (a, b, s) in enumerate(pairs)))
    cache = EmbeddingCache(tmp_path / "cache", {"m": 1}, lambda: engine, progress=False)
    ctx = tasks.Context(tmp_path, cache, tmp_path)
    res = tasks.sts(ctx, "sts-b")

    empty = engine.embed([Item(name="empty")], prompt=official("")).vectors[0]

    def vec(s):
        s = tasks.clean_sts_sentence(" ".join(s.split()))
        return empty if s == "" else engine.encode([s], prompt=prompts.STS)[0]

    cos = [float(vec(a) @ vec(b)) for a, b, _ in pairs]
    gold = [s for _, _, s in pairs]
    assert res.metrics["spearman"] == pytest.approx(metrics.spearman(np.array(cos), np.array(gold)) * 100, abs=1e-4)
    assert res.counts == {"pairs": 6, "sentences": 11} and not res.skipped and not res.notes
    without = metrics.spearman(np.array(cos[2:5]), np.array(gold[2:5])) * 100
    assert res.metrics["spearman"] != pytest.approx(without)  # dropping the pairs would change the number
    assert readers.read_sts(root, "sts-b").subsets["test"][0][0] == ""
    assert tasks.STS_EMPTY_PROMPT == official("") == " Summary above sentence in one word:"
    assert prompts.fill(prompts.STS, "A dog runs.") == official("A dog runs.")
