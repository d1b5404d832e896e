"""The paper's benchmarks with the official protocols, on the E5V engine.

Every task reads its dataset (:mod:`e5v.eval.readers`), embeds each side through the cache
(:mod:`e5v.eval.cache`) with the official prompt (:mod:`e5v.prompts`), and scores with :mod:`e5v.eval.metrics`.
Numbers are percentages.  Items that fail to embed are reported: a failed query counts as a miss, a failed
candidate can never be retrieved, a failed STS pair is left out of the correlation.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import prompts
from ..items import Item
from ..errors import ConfigError, E5VError
from ..parts import atomic_write_bytes
from . import metrics, readers, render
from .cache import EmbeddingCache, Embedded

log = logging.getLogger(__name__)

#: Engine settings the official protocols need (``e5v eval`` loads the model with them, and they key the cache):
#: transparent images converted with the official pipeline's plain ``convert("RGB")``, not composited onto white.
ENGINE_OPTIONS = {"alpha": "official"}


@dataclass
class Context:
    data: Path                      # data root: one folder per dataset (see readers.LAYOUTS)
    cache: EmbeddingCache
    out: Path                       # where task files (CIRR submission) go
    limit: int | None = None
    font: str | None = None         # font for the I2I renderer (default: Liberation Sans)
    datasets: dict = field(default_factory=dict, repr=False)  # what was read, by reader and arguments

    def read(self, reader: Callable, *args):
        """``reader(*args)`` once per run: the check before any embedding and the task itself share it."""
        key = (reader.__name__, *map(str, args))
        if key not in self.datasets:
            self.datasets[key] = reader(*args)
        return self.datasets[key]


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    computed: int = 0

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "computed"}


def _count_skips(result: TaskResult, side: str, emb: Embedded) -> Embedded:
    result.computed += emb.computed
    if emb.skipped:
        result.skipped[side] = len(emb.skipped)
        result.details.setdefault("skipped_examples", {})[side] = [f"#{i}: {r}" for i, r in emb.skipped[:5]]
    return emb


# ------------------------------------------------------------------------------------ what each task reads
def _retrieval_data(ctx: Context, dataset: str) -> readers.RetrievalData:
    coco = 5 if dataset == "coco" else None  # COCO: the first five captions of each image
    return ctx.read(readers.read_retrieval, ctx.data / dataset, dataset, coco).limit(ctx.limit)


def _cirr_data(ctx: Context, split: str) -> readers.CIRData:
    return ctx.read(readers.read_cirr, ctx.data / "cirr", split).limit(ctx.limit)


def _fashioniq_data(ctx: Context, category: str) -> readers.CIRData:
    return ctx.read(readers.read_fashioniq, ctx.data / "fashioniq", category).limit(ctx.limit)


def _sts_data(ctx: Context, task: str) -> readers.STSData:
    return ctx.read(readers.read_sts, ctx.data / "senteval", task).limit(ctx.limit)


# ------------------------------------------------------------------------------- text-image and I2I retrieval
def _embed_images(ctx: Context, res: TaskResult, dataset: str, side: str, prompt: str, images: readers.Lazy,
                  ids: list[str], label: str) -> Embedded:
    """Images (a :class:`readers.Lazy` of paths or bytes) embedded with ``prompt``; item names say ``label`` id."""
    items = readers.Lazy(images.keys, lambda k: Item(image=images[k], name=f"{label} {ids[k]}"))
    return _count_skips(res, side, ctx.cache.embed(dataset, side, prompt, items, images.keys))


def _query_scores(q: Embedded, g: Embedded) -> np.ndarray:
    s = q.vectors @ g.vectors.T
    s[~q.valid] = -np.inf
    return s


def retrieval(ctx: Context, dataset: str, *, rendered: bool) -> TaskResult:
    """Flickr30K / COCO test: t2i and i2t Recall@1/5/10.  ``rendered``: the I2I variant, where every caption is
    drawn as an image and embedded with the image prompt."""
    task = f"i2i-{dataset}" if rendered else dataset
    data = _retrieval_data(ctx, dataset)
    res = TaskResult(task, {}, counts={"images": len(data.image_ids), "captions": len(data.captions)})
    caps = data.captions
    if rendered:
        font = render.load_font(ctx.font)  # fail early (clear message) when the font is missing
        font_id = f"{Path(font.path).name}:{render.FONT_SIZE}"
        items = readers.Lazy([f"{font_id}\t{c}" for c in caps],
                             lambda k: Item(image=render.render_caption(caps[k], ctx.font), name=f"caption {k}"))
        texts = _count_skips(res, "rendered captions", ctx.cache.embed(dataset, "rendered-captions",
                                                                       prompts.IMAGE_PROMPT, items, items.keys))
        res.notes.append(f"captions rendered with {Path(font.path).name} (the official font is Arial; Liberation "
                         "Sans is metric-compatible)")
    else:
        items = [Item(text=c, name=f"caption {k}") for k, c in enumerate(caps)]
        texts = _count_skips(res, "captions", ctx.cache.embed(dataset, "captions", prompts.TEXT, items, caps))
    images = _embed_images(ctx, res, data.name, "images", prompts.IMAGE_PROMPT, data.images, data.image_ids,
                           f"{data.name} image")
    scores = _query_scores(texts, images)  # a failed query: its positives are unreachable, so it counts as a miss
    owner = data.caption_image
    t2i = metrics.recall_at_k(scores, owner, (1, 5, 10), invalid=~images.valid)
    per_image = [np.flatnonzero(owner == i) for i in range(len(data.image_ids))]
    st = scores.T.copy()
    st[~images.valid] = -np.inf
    i2t = metrics.recall_at_k(st, per_image, (1, 5, 10), invalid=~texts.valid)
    res.metrics = {**{f"t2i_R@{k}": v for k, v in t2i.items()}, **{f"i2t_R@{k}": v for k, v in i2t.items()}}
    return res


# ------------------------------------------------------------------------------------------------------ CIRR
def _gallery(ctx: Context, data: readers.CIRData, prompt: str, res: TaskResult, dataset: str) -> Embedded:
    return _embed_images(ctx, res, dataset, "gallery", prompt, data.gallery, data.gallery_ids,
                         f"{data.name} gallery")


def cirr(ctx: Context, split: str = "val") -> TaskResult:
    """CIRR val: Recall@1/5/10/50 and Recall_subset@1/2/3, reference image excluded.  CIRR test: the submission
    files of the official evaluation server (top 50, and top 3 within the image set)."""
    data = _cirr_data(ctx, split)
    task = "cirr" if split == "val" else "cirr-test"
    res = TaskResult(task, {}, counts={"queries": len(data.queries), "gallery": len(data.gallery_ids)})
    query_prompt, gallery_prompt = prompts.composed_prompts("cirr")
    g = _gallery(ctx, data, gallery_prompt, res, "cirr-" + split)
    items = readers.Lazy([f"{k}\t{x.text}" for k, x in zip(data.query_images.keys, data.queries)],
                         lambda i: Item(image=data.query_images[i], text=data.queries[i].text,
                                        name=f"cirr pair {data.queries[i].pairid}"))
    q = _count_skips(res, "queries", ctx.cache.embed("cirr-" + split, "queries", query_prompt, items, items.keys))
    scores = _query_scores(q, g)
    index = {gid: i for i, gid in enumerate(data.gallery_ids)}
    refs = [index[x.reference] for x in data.queries]
    have_sets = all(x.members for x in data.queries)
    members = [[index[m] for m in x.members] for x in data.queries] if have_sets else None
    if split == "val":
        targets = [index[x.target] for x in data.queries]
        r = metrics.recall_at_k(scores, targets, (1, 5, 10, 50), exclude=refs, invalid=~g.valid)
        res.metrics = {f"R@{k}": v for k, v in r.items()}
        if have_sets:
            sub = metrics.subset_recall(scores, targets, members, (1, 2, 3), exclude=refs, invalid=~g.valid)
            res.metrics.update({f"Rsubset@{k}": v for k, v in sub.items()})
        else:
            res.notes.append("Recall_subset not computed: this layout has no img_set (use the CIRR release files)")
        return res
    top = metrics.top_k(scores, 50, exclude=refs, invalid=~g.valid)
    recall = {"version": "rc2", "metric": "recall"}
    recall.update({x.pairid: [data.gallery_ids[j] for j in t] for x, t in zip(data.queries, top)})
    files = [("cirr_test_recall.json", recall)]
    if have_sets:
        top3 = metrics.top_k(scores, 3, exclude=refs, invalid=~g.valid, within=members)
        subset = {"version": "rc2", "metric": "recall_subset"}
        subset.update({x.pairid: [data.gallery_ids[j] for j in t] for x, t in zip(data.queries, top3)})
        files.append(("cirr_test_recall_subset.json", subset))
    else:
        res.notes.append("no recall_subset submission: this layout has no img_set (use the CIRR release files)")
    for name, obj in files:
        path = ctx.out / name
        atomic_write_bytes(path, json.dumps(obj, indent=1).encode())
        res.files.append(str(path))
    if ctx.limit:
        res.notes.append("--limit: the submission covers only some queries; the server will reject it")
    if res.skipped.get("queries"):
        res.notes.append("queries that failed to embed have empty rankings in the submission")
    res.notes.append("upload the files to the CIRR evaluation server (cirr.cecs.anu.edu.au) for test scores")
    return res


# ------------------------------------------------------------------------------------------------- FashionIQ
def fashioniq_query_text(captions, reverse: bool = False) -> str:
    """The official query text: each relative caption stripped of '.?, ' at both ends, joined with ', '."""
    caps = list(captions)[::-1] if reverse else list(captions)
    return ", ".join(c.strip(".?, ") for c in caps)


def combine_orders(a: Embedded, b: Embedded) -> Embedded:
    """The official ``fiq_two`` query: the raw last-token states of both caption orders summed, then
    L2-normalised (not the mean of two unit vectors)."""
    summed = a.vectors + b.vectors
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    valid = a.valid & b.valid & (norms[:, 0] > 0)
    return Embedded(np.where(valid[:, None], summed / np.maximum(norms, 1e-12), 0).astype(np.float32), valid, [])


def fashioniq_category(ctx: Context, category: str) -> TaskResult:
    """One FashionIQ val category: R@10 and R@50 over all val images of the category.  The query is embedded
    with both caption orders; the two raw last-token states are summed, then normalised (official ``fiq_two``)."""
    data = _fashioniq_data(ctx, category)
    task = f"fashioniq-{category}"
    res = TaskResult(task, {}, counts={"queries": len(data.queries), "gallery": len(data.gallery_ids)})
    query_prompt, gallery_prompt = prompts.composed_prompts(task)
    g = _gallery(ctx, data, gallery_prompt, res, task)
    sides = []
    for reverse in (False, True):
        texts = [fashioniq_query_text(x.text, reverse) for x in data.queries]
        keys = [f"{k}\t{t}" for k, t in zip(data.query_images.keys, texts)]
        items = readers.Lazy(keys, lambda i, texts=texts: Item(image=data.query_images[i], text=texts[i],
                                                               name=f"{task} query {i}"))
        side = "queries-reversed" if reverse else "queries"
        sides.append(_count_skips(res, side, ctx.cache.embed(task, side, query_prompt, items, keys, normalize=False)))
    scores = _query_scores(combine_orders(*sides), g)
    index = {}
    for i, gid in enumerate(data.gallery_ids):
        index.setdefault(gid, i)  # the first occurrence, as list.index in the official code
    r = metrics.recall_at_k(scores, [index[x.target] for x in data.queries], (10, 50), invalid=~g.valid)
    res.metrics = {f"R@{k}": v for k, v in r.items()}
    return res


def fashioniq(ctx: Context) -> TaskResult:
    """All three categories and their average."""
    res = TaskResult("fashioniq", {})
    for cat in readers.FASHIONIQ_CATEGORIES:
        part = fashioniq_category(ctx, cat)
        res.computed += part.computed
        res.metrics.update({f"{cat}_{k}": v for k, v in part.metrics.items()})
        res.counts.update({f"{cat}_{k}": v for k, v in part.counts.items()})
        res.skipped.update({f"{cat} {k}": v for k, v in part.skipped.items()})
    for k in (10, 50):
        res.metrics[f"avg_R@{k}"] = float(np.mean([res.metrics[f"{c}_R@{k}"] for c in readers.FASHIONIQ_CATEGORIES]))
    return res


# ------------------------------------------------------------------------------------------------------- STS
def clean_sts_sentence(s: str) -> str:
    """The official STS clean-up (eval_sts.py): end with '.' unless the last character is one of .?"' ;
    double quotes become single quotes; a final '?' becomes '.'."""
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


#: What eval_sts.py embeds for an empty sentence: it strips the filled template before adding the leading space,
#: so the newline after the (missing) sentence goes too and the prompt alone remains.
STS_EMPTY_PROMPT = " " + prompts.fill(prompts.STS, "").strip()


def sts(ctx: Context, task: str) -> TaskResult:
    """Spearman x 100 of the cosine of the two sentences' vectors against the gold scores; STS12-16 in SentEval's
    "all" aggregation (one correlation over every subset's pairs), STS-B and SICK-R on their test splits.  An empty
    sentence is embedded as the official code does (:data:`STS_EMPTY_PROMPT`), not left out."""
    data = _sts_data(ctx, task)
    cleaned = {name: ([clean_sts_sentence(s) for s in a], [clean_sts_sentence(s) for s in b], g)
               for name, (a, b, g) in data.subsets.items()}
    sentences = {s for a, b, _ in cleaned.values() for s in a + b}
    unique = sorted(sentences - {""})
    items = [Item(text=s, name=f"{task} sentence {s[:60]!r}") for s in unique]
    res = TaskResult(task, {}, counts={"pairs": sum(len(g) for _, _, g in cleaned.values()),
                                       "sentences": len(sentences)})
    emb = _count_skips(res, "sentences", ctx.cache.embed("sts", "sentences", prompts.STS, items, unique))
    if "" in sentences:  # the engine rejects an empty text: its official input is the prompt alone, with no text
        empty = _count_skips(res, "empty sentence", ctx.cache.embed(
            "sts", "empty-sentence", STS_EMPTY_PROMPT, [Item(name=f"{task} empty sentence")], [""]))
        emb = Embedded(np.concatenate([emb.vectors if unique else empty.vectors[:0], empty.vectors]),
                       np.concatenate([emb.valid, empty.valid]), [])
        unique.append("")
    where = {s: i for i, s in enumerate(unique)}
    sys_all, gold_all, per = [], [], {}
    dropped = 0
    for name, (a, b, g) in cleaned.items():
        ia, ib = np.asarray([where[s] for s in a], np.int64), np.asarray([where[s] for s in b], np.int64)
        ok = emb.valid[ia] & emb.valid[ib]
        dropped += int((~ok).sum())
        cos = np.einsum("ij,ij->i", emb.vectors[ia[ok]], emb.vectors[ib[ok]])
        per[name] = {"spearman": metrics.spearman(cos, g[ok]) * 100, "pairs": int(ok.sum())}
        sys_all.append(cos)
        gold_all.append(g[ok])
    res.metrics = {"spearman": metrics.spearman(np.concatenate(sys_all), np.concatenate(gold_all)) * 100}
    if len(per) > 1:
        res.details["subsets"] = per
        res.details["mean"] = float(np.mean([v["spearman"] for v in per.values()]))
    if dropped:
        res.notes.append(f"{dropped} pair(s) left out: a sentence failed to embed")
    return res


# --------------------------------------------------------------------------------------------------- registry
STS_TASKS = (*readers.STS_YEARS, "sts-b", "sick-r")
TASKS: dict[str, Callable[[Context], TaskResult]] = {
    "flickr30k": lambda ctx: retrieval(ctx, "flickr30k", rendered=False),
    "coco": lambda ctx: retrieval(ctx, "coco", rendered=False),
    "cirr": lambda ctx: cirr(ctx, "val"),
    "cirr-test": lambda ctx: cirr(ctx, "test1"),
    "fashioniq": fashioniq,
    **{f"fashioniq-{c}": (lambda ctx, c=c: fashioniq_category(ctx, c)) for c in readers.FASHIONIQ_CATEGORIES},
    "i2i-flickr30k": lambda ctx: retrieval(ctx, "flickr30k", rendered=True),
    "i2i-coco": lambda ctx: retrieval(ctx, "coco", rendered=True),
    **{t: (lambda ctx, t=t: sts(ctx, t)) for t in STS_TASKS},
}
#: Names that stand for several tasks.
GROUPS = {
    "sts": STS_TASKS,
    "paper": ("flickr30k", "coco", "cirr", "fashioniq", "i2i-flickr30k", "i2i-coco", *STS_TASKS),
}


#: What each task reads (its datasets, the I2I font): all of it is checked before anything is embedded.
NEEDS: dict[str, Callable[[Context], object]] = {
    "flickr30k": lambda ctx: _retrieval_data(ctx, "flickr30k"),
    "coco": lambda ctx: _retrieval_data(ctx, "coco"),
    "cirr": lambda ctx: _cirr_data(ctx, "val"),
    "cirr-test": lambda ctx: _cirr_data(ctx, "test1"),
    "fashioniq": lambda ctx: [_fashioniq_data(ctx, c) for c in readers.FASHIONIQ_CATEGORIES],
    **{f"fashioniq-{c}": (lambda ctx, c=c: _fashioniq_data(ctx, c)) for c in readers.FASHIONIQ_CATEGORIES},
    "i2i-flickr30k": lambda ctx: (_retrieval_data(ctx, "flickr30k"), render.load_font(ctx.font)),
    "i2i-coco": lambda ctx: (_retrieval_data(ctx, "coco"), render.load_font(ctx.font)),
    **{t: (lambda ctx, t=t: _sts_data(ctx, t)) for t in STS_TASKS},
}


def check(ctx: Context, names) -> None:
    """Read what every task of a run needs before anything is embedded, so that a missing or malformed dataset
    fails the run at once (naming each one), not after the tasks before it have run."""
    problems: dict[str, list[str]] = {}
    for name in names:
        try:
            NEEDS[name](ctx)
        except E5VError as err:
            problems.setdefault(str(err), []).append(name)
    if problems:
        lines = [f"[{', '.join(who)}] {message}" for message, who in problems.items()]
        raise E5VError(f"{sum(map(len, problems.values()))} task(s) cannot run, so nothing was embedded:\n"
                       + "\n".join(lines))


def expand(names) -> list[str]:
    """Task names with groups expanded, in order, without repeats; unknown names raise ConfigError."""
    out = []
    for n in names:
        n = n.lower()
        if n not in TASKS and n not in GROUPS:
            raise ConfigError(f"unknown task {n!r}; expected one of {', '.join([*TASKS, *GROUPS])}")
        for t in GROUPS.get(n, (n,)):
            if t not in out:
                out.append(t)
    return out
