"""Readers of e5v.eval on small fixture files in the real layouts, and on broken ones."""
import json

import numpy as np
import pytest

from support import eval_data as fx
from e5v.eval import readers
from e5v.eval.readers import DatasetError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return fx.write_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return fx.write_saved(tmp_path_factory.mktemp("saved"))


def test_karpathy_flickr_test_split(release):
    d = readers.read_retrieval(release / "flickr30k", "flickr30k")
    assert len(d.image_ids) == 4 and len(d.captions) == 20  # the train image is left out
    assert d.caption_image.tolist() == [i for i in range(4) for _ in range(5)]
    assert d.captions[5] == fx.caption(100)
    assert d.images[2].endswith("flickr30k-images/flickr30k_2.jpg")


def test_karpathy_coco_keeps_first_five_captions(release):
    d = readers.read_retrieval(release / "coco", "coco", max_captions=5)
    assert len(d.image_ids) == 3 and len(d.captions) == 15
    assert d.captions[:5] == [fx.caption(j) for j in range(5)]  # the 6th caption of image 0 is dropped
    assert d.images[0].endswith("val2014/coco_0.jpg")
    assert len(readers.read_retrieval(release / "coco", "coco").captions) == 16


def test_saved_retrieval(saved):
    d = readers.read_retrieval(saved / "flickr30k", "flickr30k")
    assert len(d.image_ids) == 4 and len(d.captions) == 20
    assert isinstance(d.images[1], bytes) and d.images[1][:4] == b"\x89PNG"
    lim = d.limit(2)
    assert len(lim.image_ids) == 2 and len(lim.captions) == 10 and lim.caption_image.max() == 1



def test_saved_coco_keeps_first_five_captions(tmp_path):
    import datasets

    texts = [[f"img0 cap{j}" for j in range(6)], [f"img1 cap{j}" for j in range(5)]]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(
        {"image": [fx.image(0), fx.image(1)], "text": texts}, features=features)}).save_to_disk(str(tmp_path / "coco"))
    d = readers.read_retrieval(tmp_path / "coco", "coco", max_captions=5)
    assert d.captions == texts[0][:5] + texts[1] and d.caption_image.tolist() == [0] * 5 + [1] * 5


def test_cirr_release_val_and_test(release):
    v = readers.read_cirr(release / "cirr", "val")
    assert len(v.queries) == 5 and len(v.gallery_ids) == 8
    q = v.queries[0]
    assert (q.pairid, q.reference, q.target) == ("10", "dev-0-img0", "dev-1-img0")
    assert q.members == [f"dev-{k}-img0" for k in range(6)]
    assert v.query_images[0].endswith("dev/dev-0-img0.png")
    t = readers.read_cirr(release / "cirr", "test")
    assert t.name == "cirr-test1" and all(x.target is None for x in t.queries)


def test_cirr_saved(saved):
    v = readers.read_cirr(saved / "cirr", "val")
    assert [x.target for x in v.queries][:2] == ["val-2", "val-3"] and v.queries[0].members is None
    assert isinstance(v.query_images[0], bytes)
    t = readers.read_cirr(saved / "cirr", "test")
    assert len(t.gallery_ids) == 8 and t.queries[0].target is None


def test_cirr_limit_keeps_needed_images(release):
    v = readers.read_cirr(release / "cirr", "val").limit(1)
    assert len(v.queries) == 1
    assert set(v.queries[0].members) <= set(v.gallery_ids)


def test_fashioniq_release_and_saved(release, saved):
    d = readers.read_fashioniq(release / "fashioniq", "toptee")
    assert len(d.queries) == 4 and len(d.gallery_ids) == 6
    assert d.queries[0].text == ["is dog and longer.", "has cat sleeves?"]
    assert d.queries[0].target == d.gallery_ids[3]
    s = readers.read_fashioniq(saved / "fashioniq", "shirt")
    assert len(s.queries) == 4 and s.gallery_ids == [f"shirt{i}" for i in range(6)]


def test_sts_years_skip_empty_gold(release):
    d = readers.read_sts(release / "senteval", "sts13")
    assert list(d.subsets) == ["FNWN", "headlines", "OnWN"]
    a, b, g = d.subsets["FNWN"]
    assert len(a) == len(b) == len(g) == 3  # one of 4 gold lines is empty
    assert b[0].endswith("?")


def test_sts_b_and_sick(release):
    a, b, g = readers.read_sts(release / "senteval", "sts-b").subsets["test"]
    assert len(a) == 6 and g[1] == pytest.approx(3.0)
    assert b[0].startswith('"')  # quotes kept by the reader; the STS clean-up changes them
    a, b, g = readers.read_sts(release / "senteval", "sick-r").subsets["test"]
    assert len(a) == 6 and g.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ malformed
def test_missing_dataset_names_the_layout(tmp_path):
    with pytest.raises(DatasetError) as e:
        readers.read_retrieval(tmp_path / "flickr30k", "flickr30k")
    assert "flickr30k" in str(e.value) and "dataset_flickr30k.json" in str(e.value)
    assert "flickr30k-images" in str(e.value)
    with pytest.raises(DatasetError, match="captions/cap.rc2"):
        readers.read_cirr(tmp_path / "cirr")
    with pytest.raises(DatasetError, match="STS.input"):
        readers.read_sts(tmp_path / "senteval", "sts12")


def test_karpathy_broken(tmp_path):
    root = fx.karpathy(tmp_path / "flickr30k", "flickr30k")
    (root / "dataset_flickr30k.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        readers.read_retrieval(root, "flickr30k")
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": [{"split": "test", "filename": "a.jpg"}]}))
    with pytest.raises(DatasetError, match=r"images\[0\]: missing field 'sentences'"):
        readers.read_retrieval(root, "flickr30k")
    fx.karpathy(root, "flickr30k")
    import shutil

    shutil.rmtree(root / "flickr30k-images")
    with pytest.raises(DatasetError, match="image folder .*flickr30k-images not found"):
        readers.read_retrieval(root, "flickr30k")


def test_cirr_target_not_in_split(tmp_path):
    root = fx.cirr_release(tmp_path / "cirr")
    path = root / "captions" / "cap.rc2.val.json"
    recs = json.loads(path.read_text())
    recs[2]["target_hard"] = "nowhere-img0"
    path.write_text(json.dumps(recs))
    with pytest.raises(DatasetError, match=r"cap.rc2.val.json \[2\]: image 'nowhere-img0' is not listed"):
        readers.read_cirr(root)


def test_fashioniq_broken_captions(tmp_path):
    root = fx.fashioniq_release(tmp_path / "fashioniq")
    path = root / "captions" / "cap.dress.val.json"
    recs = json.loads(path.read_text())
    recs[1]["captions"] = ["only one"]
    path.write_text(json.dumps(recs))
    with pytest.raises(DatasetError, match=r"\[1\]: 'captions' should be a list of 2 strings") as e:
        readers.read_fashioniq(root, "dress")
    # every error about a dataset ends with where its files belong
    assert "expected layout:" in str(e.value)
    assert "DATA/fashioniq/captions/cap.{dress,shirt,toptee}.val.json" in str(e.value)
    assert "fashioniq_val_imgs" in str(e.value)
    (root / "image_splits" / "split.shirt.val.json").unlink()
    with pytest.raises(DatasetError, match="missing file .*split.shirt.val.json"):
        readers.read_fashioniq(root, "shirt")


def test_sts_broken_files(tmp_path):
    root = fx.senteval(tmp_path / "senteval")
    gs = root / "STS" / "STS14-en-test" / "STS.gs.images.txt"
    gs.write_text("1.0\n2.0\n")
    with pytest.raises(DatasetError, match="has 4 lines but .*STS.gs.images.txt has 2"):
        readers.read_sts(root, "sts14")
    gs.write_text("1.0\nabc\n2\n3\n")
    with pytest.raises(DatasetError, match="STS.gs.images.txt:line 2: gold score 'abc' is not a number"):
        readers.read_sts(root, "sts14")
    inp = root / "STS" / "STS15-en-test" / "STS.input.belief.txt"
    inp.write_text("one sentence only\nx\ty\nz\tw\nq\tr\n")
    with pytest.raises(DatasetError, match="STS.input.belief.txt:line 1: expected 2 tab-separated"):
        readers.read_sts(root, "sts15")
    (root / "STS" / "STSBenchmark" / "sts-test.csv").write_text("a\tb\tc\n")
    with pytest.raises(DatasetError, match="sts-test.csv:line 1: expected at least 7"):
        readers.read_sts(root, "sts-b")
    (root / "SICK" / "SICK_test_annotated.txt").write_text("header\n1\tonly a\n")
    with pytest.raises(DatasetError, match="SICK_test_annotated.txt:line 2: expected at least 4") as e:
        readers.read_sts(root, "sick-r")
    assert "DATA/senteval/SICK/SICK_test_annotated.txt" in str(e.value)


def test_saved_dataset_wrong_split_or_columns(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": [1], "text": [["a"]]})}) \
        .save_to_disk(str(tmp_path / "flickr30k"))
    with pytest.raises(DatasetError, match=r"has splits \['train'\], but the benchmark needs split 'test'"):
        readers.read_retrieval(tmp_path / "flickr30k", "flickr30k")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"img": [1]})}).save_to_disk(str(tmp_path / "coco"))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['image', 'text'\]"):
        readers.read_retrieval(tmp_path / "coco", "coco")
    (tmp_path / "cirr" / "cirr_val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a `datasets` folder"):
        readers.read_cirr(tmp_path / "cirr")


def test_lazy_take_and_slice():
    lz = readers.Lazy(["a", "b", "c"], lambda k: k * 10)
    assert lz[1:3] == [10, 20] and lz.take([2, 0])[0] == 20 and lz.take([2, 0]).keys == ["c", "a"]
    assert np.asarray(lz[:]).tolist() == [0, 10, 20]


@pytest.mark.parametrize("sep", ["\x85", "\u2028", "\x0b", "\x0c"], ids=["NEL", "LS", "VT", "FF"])
def test_sts_b_and_sick_rows_keep_line_separators(tmp_path, sep):
    """SentEval reads STS-B and SICK line by line (text mode: on "\\n", "\\r\\n", "\\r"); U+0085, U+2028, \\x0b and
    \\x0c inside a row are whitespace in a sentence there (its split() breaks words on them), not row ends."""
    root = tmp_path / "senteval"
    (root / "STS" / "STSBenchmark").mkdir(parents=True)
    (root / "SICK").mkdir()
    rows = [f"main-news\tfile\t2012\t000{k}\t{k}.5\tA dog{sep}runs {k}\tA cat{sep * 2}sleeps" for k in range(3)]
    (root / "STS" / "STSBenchmark" / "sts-test.csv").write_bytes(("\r\n".join(rows) + "\n").encode())
    sick = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    sick += [f"{k}\tA man{sep}plays {k}\tA{sep}guitar\t{k + 1}.0\tNEUTRAL" for k in range(3)]
    (root / "SICK" / "SICK_test_annotated.txt").write_bytes(("\n".join(sick) + "\n").encode())

    a, b, g = readers.read_sts(root, "sts-b").subsets["test"]
    assert a == [f"A dog runs {k}" for k in range(3)] and b == ["A cat sleeps"] * 3
    assert g.tolist() == [0.5, 1.5, 2.5]
    a, b, g = readers.read_sts(root, "sick-r").subsets["test"]
    assert a == [f"A man plays {k}" for k in range(3)] and b == ["A guitar"] * 3 and g.tolist() == [1.0, 2.0, 3.0]
