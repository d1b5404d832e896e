"""Which training data helps across modalities (issue #17), measured on the toy world. Every condition trains a
LoRA on the language model (tower and projector frozen, as stage C) from the same model before stage C, with the
same optimiser steps and batch (:data:`SETTINGS`), three seeds each:

- ``text``: stage C's toy NLI triplets (E5-V: anchor caption, paraphrase, the anchor with one attribute changed);
- ``pairs``: caption → picture; hard negative, the picture of the scene with one attribute changed;
- ``composed``: picture + edit words → the edited picture; hard negative, the picture of another edit;
- ``text+pairs``, ``text+composed``, ``text+pairs+composed``: mixtures, every source an equal share;
- ``text-shuffled``, ``pairs-shuffled``, ``composed-shuffled``: the controls, the positives and the hard
  negatives permuted across rows (:func:`recipe.shuffle_pairs`): the same items and as much contrastive training,
  with no meaning in the pairs. A gain counts only if it beats its control.

All three sources draw the same training scenes for a seed (those of the NLI triplets) and their edits from
:func:`world.changed`, so no held-out triple occurs in any of them. Captions are plain or rich at random, as the
triplets' anchors. Pictures take the E5-V image prompt, composed queries and their candidates the CIRR prompts
that ``measure.evaluate`` scores composed retrieval with.

``python -m e5v.toyworld.modalities OUT --seeds 0 1 2 --galleries 31 47`` (resumable, :mod:`.experiment`) writes
``OUT/modalities.json`` and ``OUT/modalities.md``: mean ± sd per gallery and condition, each source against its
control and each mixture against each of its sources. A selection other than the defaults (fewer conditions, seeds
or galleries) writes ``OUT/modalities_conditions=...`` instead (:func:`experiment.label`).
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import prompts
from ..parts import atomic_save
from . import experiment, measure, recipe, world

SOURCES = ("text", "pairs", "composed")
CONDITIONS = ("text", "pairs", "composed", "text+pairs", "text+composed", "text+pairs+composed",
              "text-shuffled", "pairs-shuffled", "composed-shuffled")
SEEDS, GALLERIES = (0, 1, 2), (31, 47)
#: (condition, reference) pairs the summary compares: each source against its control, each mixture against
#: each of its sources
COMPARE = tuple((s, f"{s}-shuffled") for s in SOURCES) + \
    tuple((c, s) for c in CONDITIONS if "+" in c for s in c.split("+"))
COLUMNS = ("t2i_r1_plain", "i2t_r1_plain", "t2i_r1_rich", "composed_r1", "composed_r5", "t2t_r1", "gap_plain")
HEADERS = {"t2i_r1_plain": "text→image R@1", "i2t_r1_plain": "image→text R@1",
           "t2i_r1_rich": "rich-words text→image R@1", "composed_r1": "composed R@1", "composed_r5": "composed R@5",
           "t2t_r1": "rich→plain text R@1", "gap_plain": "modality gap"}
#: the settings of every condition: stage C's (LoRA r 8, lr 4e-4) with 40 steps of 32 rows instead of 60 of 64,
#: so that the whole experiment (27 trainings) fits in about an hour on 2 shared CPU cores (docs/toyworld.md)
SETTINGS = replace(recipe.Recipe(), c_steps=40, c_batch=32, c_warmup=4)


@dataclass(frozen=True)
class Side:
    """One side of a training row: words, a picture (a scene), or both, and its own prompt if not the default."""
    text: str | None = None
    scene: world.Scene | None = None
    prompt: str | None = None


def rows(source: str, n: int, seed: int, shuffled: bool = False) -> list[tuple]:
    """``n`` training rows (query, positive, hard negative) of ``source``: strings for "text" (the NLI
    triplets), :class:`Side` for "pairs" and "composed"; ``shuffled``: the control."""
    if source == "text":
        return recipe.triplets(n, seed, shuffled)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    rng, out = random.Random(f"{source}:{seed}"), []
    for scene in world.scenes("train", n, seed=seed + 1):          # the scenes of recipe.triplets(n, seed)
        if source == "pairs":
            caption = world.caption(scene, rng, rich=rng.random() < 0.5)
            other, _ = world.changed(scene, rng)
            out.append((Side(text=caption), Side(scene=scene), Side(scene=other)))
        else:
            (target, words), *rest = world.changed(scene, rng, k=2)
            candidate = prompts.CIRR_CANDIDATE
            out.append((Side(text=words, scene=scene), Side(scene=target, prompt=candidate),
                        Side(scene=rest[0][0], prompt=candidate) if rest else None))
    return recipe.shuffle_pairs(out, seed) if shuffled else out


def write(source: str, data: list[tuple], folder: Path, images: Path | None = None) -> Path:
    """``data`` (:func:`rows`) as a training file in ``folder``: the NLI CSV for text, else JSONL records
    ``{"query": {"text", "image", "prompt"}, "positive": ..., "negative": ...}`` with the pictures as PNG files
    (paths relative to the file) in ``images`` (default ``folder/images``; a picture already there is reused,
    each one is written atomically, so runs may share the folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    if source == "text":
        return recipe.write_triplets(folder / "text.csv", data)
    images = images or folder / "images"

    def record(side: Side) -> dict:
        out = {}
        if side.text is not None:
            out["text"] = side.text
        if side.scene is not None:
            png = images / f"{side.scene.id}-{side.scene.seed}.png"
            if not png.exists():
                atomic_save(png, lambda tmp: world.render(side.scene).save(tmp))
            out["image"] = os.path.relpath(png, folder)
        if side.prompt:
            out["prompt"] = side.prompt
        return out

    path = folder / f"{source}.jsonl"
    with path.open("w") as f:
        for row in data:
            sides = dict(zip(("query", "positive", "negative"), row))
            f.write(json.dumps({k: record(v) for k, v in sides.items() if v is not None}) + "\n")
    return path


def sources_of(condition: str) -> tuple[list[str], bool]:
    """(["text", "pairs"], False) for "text+pairs"; (["pairs"], True) for "pairs-shuffled"."""
    shuffled = condition.endswith("-shuffled")
    sources = condition.removesuffix("-shuffled").split("+")
    if not set(sources) <= set(SOURCES) or len(set(sources)) < len(sources):
        raise ValueError(f"unknown condition {condition!r}: sources joined by '+' (of {', '.join(SOURCES)}), "
                         f"optionally '-shuffled'")
    return sources, shuffled


def markdown(summary: dict) -> str:
    """The summary's table, then the comparisons (if any)."""
    text = experiment.table(summary, COLUMNS, HEADERS)
    if summary.get("versus"):
        text += ("\nDifferences of the means ± their standard error (bold: beyond both the two-sided 95 % Welch t "
                 "threshold and one query's worth of recall):\n\n" +
                 experiment.versus_table(summary["versus"], COLUMNS, HEADERS))
    return text


def run(out: Path, base: Path, seeds, gallery_seeds, setup: recipe.Recipe = SETTINGS, scenes: int = 200,
        conditions=CONDITIONS, single_source: bool = False) -> dict:
    """Measure ``before`` and every condition with every seed; return (and write) the summary.
    ``single_source``: each batch of a mixture from one source, drawn by the ratio (VLM2Vec), not shares of all."""
    for c in conditions:
        sources_of(c)                                   # an unknown condition fails before any training

    def settings(name: str) -> dict:
        condition, seed = experiment.kind_of(name)
        n = len(sources_of(condition)[0])
        mixing = {"data_weights": ",".join("1" * n), "single_source_batches": single_source} if n > 1 else {}
        return {"recipe": asdict(replace(setup, c_seed=seed)), "condition": condition, **mixing}

    def fit(name: str, work: Path, wanted: dict) -> dict:
        stage, (sources, shuffled) = recipe.Recipe(**wanted["recipe"]), sources_of(wanted["condition"])
        files = [write(s, rows(s, stage.c_triplets, stage.c_seed, shuffled), work / "data",
                       Path(out) / f"images-r{world.RENDER}") for s in sources]
        mixing = {k: wanted[k] for k in ("data_weights", "single_source_batches") if k in wanted}
        return recipe.stage_c(stage, Path(base), work, data=",".join(map(str, files)), **mixing)

    names = ["before"] + [f"{c}-s{s}" for s in seeds for c in conditions]
    compare = [p for p in COMPARE if set(p) <= set(conditions)]
    selection = {"conditions": list(conditions), "seeds": list(seeds), "galleries": list(gallery_seeds)}
    default = {"conditions": list(CONDITIONS), "seeds": list(SEEDS), "galleries": list(GALLERIES)}
    with recipe.fixed_threads(setup.threads):      # measuring too: one thread is faster on a busy machine
        return experiment.run(out, base, names, settings=settings, fit=fit, measures=(measure.evaluate,),
                              markdown=markdown, gallery_seeds=gallery_seeds, stem="modalities",
                              selection=selection, default=default, scenes=scenes, compare=compare)


def main(argv=None) -> None:
    """``python -m e5v.toyworld.modalities OUT``: which training data helps across modalities, with controls."""
    parser = experiment.arguments("python -m e5v.toyworld.modalities", main.__doc__, SEEDS, GALLERIES,
                                  "training seeds")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), metavar="CONDITION",
                        help=f"(default: all: {' '.join(CONDITIONS)})")
    parser.add_argument("--single-source", action="store_true", help="each batch of a mixture from one source")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = experiment.settings(SETTINGS, args.set)
    try:
        summary = run(args.out, args.base, args.seeds, args.galleries, setup, args.scenes, args.conditions,
                      args.single_source)
    except ValueError as e:                         # settings that differ from stored runs', an unknown condition
        parser.exit(2, f"{parser.prog}: {e}\n")
    print(markdown(summary), end="")


if __name__ == "__main__":
    main()
