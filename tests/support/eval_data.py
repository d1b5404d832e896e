"""Writers of tiny benchmark datasets in their real on-disk layouts (and broken variants), for the eval tests.

``write_release(root)`` writes the original release layouts (Karpathy JSON + images, CIRR and FashionIQ
captions/ + image_splits/, SentEval folders); ``write_saved(root)`` writes `datasets` folders with
``save_to_disk`` in the layouts of the official mirrors (royokong/flickr30k_test, cirr_val, ...).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["dog", "cat", "red", "ball", "park", "sea", "house", "tree", "car", "city", "man", "woman", "guitar"]


def image(seed: int, size=(32, 32)) -> Image.Image:
    """A distinct random RGB image per seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    image(seed).save(buf, format="PNG")
    return buf.getvalue()


def caption(seed: int, n: int = 5) -> str:
    rng = np.random.default_rng(1000 + seed)
    return "A " + " ".join(rng.choice(WORDS, n)) + "."


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------- Karpathy
def karpathy(root: Path, dataset: str, n_test: int = 4, extra_caption: bool = True) -> Path:
    """dataset_{flickr30k,coco}.json + images; one train image (ignored); COCO's first test image has 6 captions."""
    root = Path(root)
    entries = []
    for i in range(n_test + 1):
        split = "train" if i == n_test else "test"
        name = f"{dataset}_{i}.jpg"
        n_caps = 6 if (dataset == "coco" and i == 0 and extra_caption) else 5
        sents = [{"raw": caption(100 * i + j), "tokens": [], "imgid": i, "sentid": 5 * i + j} for j in range(n_caps)]
        e = {"filename": name, "imgid": i, "split": split, "sentids": [s["sentid"] for s in sents], "sentences": sents}
        if dataset == "coco":
            e.update(filepath="val2014", cocoid=1000 + i)
            folder = root / "val2014"
        else:
            folder = root / "flickr30k-images"
        folder.mkdir(parents=True, exist_ok=True)
        image(i).save(folder / name, format="JPEG", quality=95)
        entries.append(e)
    _json(root / f"dataset_{dataset}.json", {"images": entries, "dataset": dataset})
    return root


def saved_retrieval(root: Path, n: int = 4) -> Path:
    """save_to_disk of a DatasetDict like royokong/flickr30k_test: split 'test', columns image, text."""
    import datasets

    ds = datasets.Dataset.from_dict({"image": [image(i) for i in range(n)],
                                     "text": [[caption(100 * i + j) for j in range(5)] for i in range(n)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Sequence(datasets.Value("string"))}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root))
    return Path(root)


# ------------------------------------------------------------------------------------------------- CIRR
def cirr_release(root: Path, n_gallery: int = 8, n_queries: int = 5) -> Path:
    """captions/cap.rc2.{val,test1}.json, image_splits/split.rc2.{val,test1}.json, dev/ and test1/ images."""
    root = Path(root)
    for split, folder in (("val", "dev"), ("test1", "test1")):
        names = [f"{folder}-{i}-img0" for i in range(n_gallery)]
        _json(root / "image_splits" / f"split.rc2.{split}.json", {n: f"./{folder}/{n}.png" for n in names})
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(names):
            image(200 + i + (50 if split == "test1" else 0)).save(root / folder / f"{n}.png")
        recs = []
        for q in range(n_queries):
            ref, tgt = names[q], names[(q + 1) % n_gallery]
            members = [names[(q + k) % n_gallery] for k in range(6)]
            r = {"pairid": 10 + q, "reference": ref, "caption": caption(300 + q, 4),
                 "img_set": {"id": q, "members": members}}
            if split == "val":
                r.update(target_hard=tgt, target_soft={tgt: 1.0})
            recs.append(r)
        _json(root / "captions" / f"cap.rc2.{split}.json", recs)
    return root


def cirr_saved(root: Path, n_gallery: int = 8, n_queries: int = 5) -> Path:
    """cirr_val, cirr_test and cirr_imgs as save_to_disk folders, columns as the royokong mirrors."""
    import datasets

    root = Path(root)
    img = datasets.Image()
    imgs = {}
    for split in ("val", "test"):
        ids = [f"{split}-{i}" for i in range(n_gallery)]
        feats = datasets.Features({"id": datasets.Value("string"), "img": img})
        imgs[split] = datasets.Dataset.from_dict({"id": ids, "img": [image(400 + i) for i in range(n_gallery)]},
                                                 features=feats)
        cols = {"pairid": list(range(n_queries)), "caption": [caption(500 + q) for q in range(n_queries)],
                "candidate_id": ids[:n_queries], "candidate": [image(400 + q) for q in range(n_queries)]}
        feats = {"pairid": datasets.Value("int64"), "caption": datasets.Value("string"),
                 "candidate_id": datasets.Value("string"), "candidate": img}
        if split == "val":
            cols["target_id"] = [ids[(q + 2) % n_gallery] for q in range(n_queries)]
            feats["target_id"] = datasets.Value("string")
        datasets.DatasetDict({split: datasets.Dataset.from_dict(cols, features=datasets.Features(feats))}) \
            .save_to_disk(str(root / ("cirr_val" if split == "val" else "cirr_test")))
    datasets.DatasetDict(imgs).save_to_disk(str(root / "cirr_imgs"))
    return root


# -------------------------------------------------------------------------------------------- FashionIQ
def fashioniq_release(root: Path, n_gallery: int = 6, n_queries: int = 4) -> Path:
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for c, cat in enumerate(("dress", "shirt", "toptee")):
        names = [f"B{cat[:2].upper()}{i:04d}" for i in range(n_gallery)]
        for i, n in enumerate(names):
            image(600 + 10 * c + i).save(root / "images" / f"{n}.png")
        _json(root / "image_splits" / f"split.{cat}.val.json", names)
        recs = [{"candidate": names[q], "target": names[(q + 3) % n_gallery],
                 "captions": [f"is {WORDS[q]} and longer.", f"has {WORDS[q + 1]} sleeves?"]} for q in range(n_queries)]
        _json(root / "captions" / f"cap.{cat}.val.json", recs)
    return root


def fashioniq_saved(root: Path, n_gallery: int = 6, n_queries: int = 4) -> Path:
    import datasets

    root = Path(root)
    q = {"category": [], "candidate": [], "caption": [], "target_id": [], "candidate_id": []}
    g = {"category": [], "id": [], "img": []}
    for c, cat in enumerate(("dress", "shirt", "toptee")):
        ids = [f"{cat}{i}" for i in range(n_gallery)]
        g["category"] += [cat] * n_gallery
        g["id"] += ids
        g["img"] += [image(700 + 10 * c + i) for i in range(n_gallery)]
        for k in range(n_queries):
            q["category"].append(cat)
            q["candidate"].append(image(700 + 10 * c + k))
            q["candidate_id"].append(ids[k])
            q["caption"].append([f"is {WORDS[k]}.", f"more {WORDS[k + 2]}"])
            q["target_id"].append(ids[(k + 1) % n_gallery])
    img = datasets.Image()
    qf = datasets.Features({"category": datasets.Value("string"), "candidate": img,
                            "caption": datasets.Sequence(datasets.Value("string")),
                            "target_id": datasets.Value("string"), "candidate_id": datasets.Value("string")})
    gf = datasets.Features({"category": datasets.Value("string"), "id": datasets.Value("string"), "img": img})
    datasets.DatasetDict({"val": datasets.Dataset.from_dict(q, features=qf)}).save_to_disk(str(root / "fashioniq_val"))
    datasets.DatasetDict({"val": datasets.Dataset.from_dict(g, features=gf)}) \
        .save_to_disk(str(root / "fashioniq_val_imgs"))
    return root


# ------------------------------------------------------------------------------------------------- SentEval
STS_SUBSETS = {
    "STS12-en-test": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13-en-test": ["FNWN", "headlines", "OnWN"],
    "STS14-en-test": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15-en-test": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16-en-test": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}


def sentence(seed: int) -> str:
    rng = np.random.default_rng(2000 + seed)
    return " ".join(rng.choice(WORDS, int(rng.integers(2, 6))))


def senteval(root: Path, pairs: int = 4) -> Path:
    """SentEval's data/downstream: STS12-16 (one gold line left empty per subset), STS-B test, SICK test."""
    root = Path(root)
    n = 0
    for folder, subsets in STS_SUBSETS.items():
        d = root / "STS" / folder
        d.mkdir(parents=True, exist_ok=True)
        for sub in subsets:
            lines, gold = [], []
            for k in range(pairs):
                n += 1
                lines.append(f"{sentence(n)}\t{sentence(n + 7)}?")
                gold.append("" if k == 1 else f"{(n * 7) % 6:.1f}")
            (d / f"STS.input.{sub}.txt").write_text("\n".join(lines) + "\n")
            (d / f"STS.gs.{sub}.txt").write_text("\n".join(gold) + "\n")
    b = root / "STS" / "STSBenchmark"
    b.mkdir(parents=True, exist_ok=True)
    rows = [f"main-news\tfile\t2012\t{k:04d}\t{(k * 3) % 6:.3f}\t{sentence(900 + k)}\t\"{sentence(950 + k)}\""
            + ("\textra\tcolumns" if k == 0 else "") for k in range(6)]
    (b / "sts-test.csv").write_text("\n".join(rows) + "\n")
    s = root / "SICK"
    s.mkdir(parents=True, exist_ok=True)
    rows = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    rows += [f"{k}\t{sentence(1000 + k)}\t{sentence(1050 + k)}\t{1 + (k * 5) % 4:.1f}\tNEUTRAL" for k in range(6)]
    (s / "SICK_test_annotated.txt").write_text("\n".join(rows) + "\n")
    return root


def write_release(root: Path) -> Path:
    """Every benchmark in its release layout under ``root`` (the --data folder)."""
    root = Path(root)
    karpathy(root / "flickr30k", "flickr30k")
    karpathy(root / "coco", "coco", n_test=3)
    cirr_release(root / "cirr")
    fashioniq_release(root / "fashioniq")
    senteval(root / "senteval")
    return root


def write_saved(root: Path) -> Path:
    """Flickr30K, COCO, CIRR and FashionIQ as `datasets` folders under ``root``."""
    root = Path(root)
    saved_retrieval(root / "flickr30k")
    saved_retrieval(root / "coco", n=3)
    cirr_saved(root / "cirr")
    fashioniq_saved(root / "fashioniq")
    return root
