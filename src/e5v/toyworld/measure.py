"""Retrieval figures of a model on the toy world's held-out scenes: the numbers docs/toyworld.md's table, the tests and
``e5v demo`` report.

The gallery is ``n`` held-out scenes (distinct contents, every one with a colour-shape-position combination that
training never showed). Each scene has one query caption, fixed by its index, in the plain or the rich register.
"""
from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np

from .. import prompts
from . import world


@dataclass
class Gallery:
    scenes: list[world.Scene]
    images: list                  # the scenes rendered (PIL images), in order
    plain: list[str]              # one plain-register caption per scene
    rich: list[str]               # one rich-register caption per scene
    composed: list[tuple[int, str, int]]   # (reference index, modification words, target index)


def gallery(n: int = 200, seed: int = 0) -> Gallery:
    scenes = world.scenes("held-out", n, seed=seed)
    plain = [world.caption(s, random.Random(f"plain:{seed}:{i}")) for i, s in enumerate(scenes)]
    rich = [world.caption(s, random.Random(f"rich:{seed}:{i}"), rich=True) for i, s in enumerate(scenes)]
    where = {s.content: i for i, s in enumerate(scenes)}
    composed = [(i, words, where[t.content]) for i, s in enumerate(scenes) for t, words in world.edits(s)
                if t.content in where]
    return Gallery(scenes, [world.render(s) for s in scenes], plain, rich, composed)


def recall_at(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Percentage of rows whose target column is among the k highest scores (ties count against)."""
    target = scores[np.arange(len(targets)), targets][:, None]
    rank = (scores >= target).sum(1) - 1      # others scoring at least as high as the target
    return float((rank < k).mean() * 100)


def modality_gap(images: np.ndarray, texts: np.ndarray) -> float:
    """Distance between the mean image and the mean text embedding (0: the two clouds share a centre)."""
    return float(np.linalg.norm(images.mean(0) - texts.mean(0)))


@contextmanager
def raw_input(engine):
    """Embed without the chat turn while inside (the chat format "raw")."""
    old, engine.backbone.chat_format = engine.backbone.chat_format, "raw"
    try:
        yield
    finally:
        engine.backbone.chat_format = old


def evaluate(engine, g: Gallery, *, prompted: bool = True) -> dict:
    """t2i / i2t R@1 for plain and rich queries, the modality gap, t2t R@1 (a rich caption finds the plain caption
    of its scene: the text side's own skill), and composed-query recall (prompted only).

    ``prompted=False`` embeds the raw input, no prompt and no chat turn (the last token of the caption, the last
    image token): the paper's "Last"."""
    text_prompt, image_prompt = (prompts.TEXT, prompts.IMAGE_PROMPT) if prompted else \
        (prompts.TEXT_LAST, prompts.IMAGE_LAST)
    images = g.images
    ids = np.arange(len(g.scenes))
    out, txt = {}, {}
    with nullcontext() if prompted else raw_input(engine):
        img = engine.encode_image(images, prompt=image_prompt)
        for register, captions in (("plain", g.plain), ("rich", g.rich)):
            txt[register] = engine.encode_text(captions, prompt=text_prompt)
    for register in ("plain", "rich"):
        sim = txt[register] @ img.T
        out[f"t2i_r1_{register}"] = recall_at(sim, ids, 1)
        out[f"i2t_r1_{register}"] = recall_at(sim.T, ids, 1)
        out[f"gap_{register}"] = modality_gap(img, txt[register])
    out["t2t_r1"] = recall_at(txt["rich"] @ txt["plain"].T, ids, 1)     # rich wording finds the plain one
    if prompted and g.composed:
        ref, words, target = zip(*g.composed)
        gal = engine.encode_image(images, task="cirr")
        q = engine.encode_composed([(images[r], w) for r, w in zip(ref, words)], task="cirr")
        sim = q @ gal.T
        sim[np.arange(len(ref)), list(ref)] = -np.inf          # the reference itself is not an answer (CIRR)
        out["composed_r1"] = recall_at(sim, np.array(target), 1)
        out["composed_r5"] = recall_at(sim, np.array(target), 5)
        out["composed_queries"] = len(ref)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def queries(g: Gallery) -> dict:
    """How many queries each recall figure of :func:`evaluate` and :func:`geometry` averages over on ``g``: one
    query's worth of recall is 100 / that many points."""
    n = len(g.scenes)
    return {**{f: n for f in ("t2i_r1_plain", "i2t_r1_plain", "t2i_r1_rich", "i2t_r1_rich", "t2t_r1",
                              "t2i_r1_centred", "i2t_r1_centred")},
            **({"composed_r1": len(g.composed), "composed_r5": len(g.composed)} if g.composed else {})}


def geometry(engine, g: Gallery) -> dict:
    """How the prompted plain-caption and image embeddings lie: what stage C may change besides meaning.

    - ``*_norm``: mean length of the raw last-token state, before normalising;
    - ``*_mean_cos``: mean cosine between two different items of one modality (0: spread over every direction,
      near 1: all in one narrow cone), and ``*_eff_dim``, the participation ratio of the centred vectors'
      covariance (how many directions they really use);
    - ``match_cos`` / ``other_cos``: mean cosine of a caption with its own picture and with the other pictures;
    - ``t2i_r1_centred`` / ``i2t_r1_centred``: retrieval after removing each modality's mean vector, which
      closes the gap without learning anything: if that alone gives stage C's gain, the gain is not meaning."""
    raw = {"text": engine.embed(g.plain, prompt=prompts.TEXT, normalize=False).vectors,
           "image": engine.embed(g.images, prompt=prompts.IMAGE_PROMPT, normalize=False).vectors}
    out, unit = {}, {}
    for side, v in raw.items():
        n = len(v)
        unit[side] = u = v / np.linalg.norm(v, axis=1, keepdims=True)
        out[f"{side}_norm"] = float(np.linalg.norm(v, axis=1).mean())
        out[f"{side}_mean_cos"] = float((np.square(u.sum(0)).sum() - n) / (n * (n - 1)))
        eig = np.linalg.eigvalsh(np.cov(u, rowvar=False))
        out[f"{side}_eff_dim"] = float(eig.sum() ** 2 / np.square(eig).sum())
    sim = unit["text"] @ unit["image"].T
    ids = np.arange(len(sim))
    out["match_cos"] = float(np.diag(sim).mean())
    out["other_cos"] = float(sim[~np.eye(len(sim), dtype=bool)].mean())
    centred = [u - u.mean(0) for u in (unit["text"], unit["image"])]
    t, i = (c / np.linalg.norm(c, axis=1, keepdims=True) for c in centred)
    out["t2i_r1_centred"] = recall_at(t @ i.T, ids, 1)
    out["i2t_r1_centred"] = recall_at(i @ t.T, ids, 1)
    return {k: round(v, 4) for k, v in out.items()}
