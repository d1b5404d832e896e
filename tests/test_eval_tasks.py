"""End-to-end `e5v eval` on a tiny model and tiny fixture datasets: every task, both layouts, the cache, a
resumed run, --limit, bad data.  Numbers mean nothing (random weights); what is checked is that each task
scores exactly what the engine gives with the official prompt and protocol."""
import json

import numpy as np
import pytest

import e5v.cli
import eval_fixtures as fx
from e5v import E5V, prompts
from e5v.eval import metrics, tasks
from e5v.parts import PartStore


@pytest.fixture(autouse=True)
def only_eval_verb(monkeypatch):
    monkeypatch.setattr(e5v.cli, "VERB_MODULES", ("e5v.eval.cli",))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return fx.write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return str(tiny_dirs["e5v-like"])


@pytest.fixture(scope="module")
def model(model_dir):
    return E5V.from_pretrained(model_dir, device="cpu", dtype="float32")


def run(argv, capsys=None):
    rc = e5v.cli.main(["eval", *argv, "--no-progress"])
    out = capsys.readouterr() if capsys else None
    return rc, out


@pytest.fixture(scope="module")
def full_run(release, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    import e5v.cli as c

    saved, c.VERB_MODULES = c.VERB_MODULES, ("e5v.eval.cli",)
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


def test_retrieval_scores_the_engine_vectors(full_run, release, model):
    _, _, res = full_run
    from e5v.eval import readers

    d = readers.read_retrieval(release / "flickr30k", "flickr30k")
    t = model.encode_text(d.captions)  # the README text prompt
    i = model.encode_image(list(d.images[:]))  # the README image prompt
    s = t @ i.T
    t2i = metrics.recall_at_k(s, d.caption_image, (1, 5, 10))
    i2t = metrics.recall_at_k(s.T, [np.flatnonzero(d.caption_image == k) for k in range(4)], (1, 5, 10))
    got = res["tasks"]["flickr30k"]["metrics"]
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i[k]) and got[f"i2t_R@{k}"] == pytest.approx(i2t[k])


def test_sts_uses_prompt_and_cleanup(full_run, release, model):
    _, _, res = full_run
    from e5v.eval import readers

    a, b, g = readers.read_sts(release / "senteval", "sts-b").subsets["test"]
    ea = model.encode([tasks.clean_sts_sentence(s) for s in a], prompt=prompts.STS)
    eb = model.encode([tasks.clean_sts_sentence(s) for s in b], prompt=prompts.STS)
    expected = metrics.spearman((ea * eb).sum(1), g) * 100
    assert res["tasks"]["sts-b"]["metrics"]["spearman"] == pytest.approx(expected, abs=1e-4)
    # STS12-16: one correlation over every subset's pairs ("all"), the per-subset values in the details
    assert set(res["tasks"]["sts12"]["details"]["subsets"]) == {"MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN",
                                                                 "surprise.SMTnews"}
    assert res["tasks"]["sts12"]["counts"]["pairs"] == 15


def test_fashioniq_sums_both_orders_before_normalising(release, model, tmp_path):
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
    ctx = tasks.Context(release, EmbeddingCache(tmp_path, {"m": 1}, lambda: model, progress=False), tmp_path)
    res = tasks.fashioniq_category(ctx, "toptee")
    assert res.computed == 6 + 4 + 4
    raw = model.embed([(d.query_images[k], tasks.fashioniq_query_text(q.text)) for k, q in enumerate(d.queries)],
                      prompt=qp, normalize=False).vectors
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    folder = next(f for f in (tmp_path / "fashioniq-toptee").glob("queries-*") if "reversed" not in f.name)
    part = np.load(folder / "part-000000.npz")
    assert part["vectors"] == pytest.approx(raw, abs=1e-5)


def test_cirr_test_submission_files(full_run, release):
    _, out, res = full_run
    from e5v.eval import readers

    d = readers.read_cirr(release / "cirr", "test")
    rec = json.loads((out / "cirr_test_recall.json").read_text())
    sub = json.loads((out / "cirr_test_recall_subset.json").read_text())
    assert rec["version"] == "rc2" and rec["metric"] == "recall" and sub["metric"] == "recall_subset"
    for q in d.queries:
        assert len(rec[q.pairid]) == 7 and q.reference not in rec[q.pairid]  # 8 images less the reference
        assert len(sub[q.pairid]) == 3 and set(sub[q.pairid]) <= set(q.members) - {q.reference}
        assert [x for x in rec[q.pairid] if x in sub[q.pairid]] == sub[q.pairid]  # same order as the full ranking
    names = ("cirr_test_recall.json", "cirr_test_recall_subset.json")
    assert sorted(res["tasks"]["cirr-test"]["files"]) == sorted(str(out / n) for n in names)


def test_second_run_reads_the_cache(full_run, release, model_dir, monkeypatch, capsys):
    _, out, res = full_run
    monkeypatch.setattr(e5v.cli, "load_model", lambda args: pytest.fail("the model was loaded"))
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


def test_bad_image_is_skipped_and_reported(tmp_path, model_dir, capsys):
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
