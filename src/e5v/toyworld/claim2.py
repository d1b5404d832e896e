"""The paper's claim 2 measured on the toy world: stage C (text only) from one model before stage C, run with
several seeds on the real toy NLI triplets and on the shuffled control, each evaluated on several galleries.

``python -m e5v.toyworld.claim2 OUT --base DIR --seeds 0 1 2 3 4 --galleries 0 7 23``

- ``before``: the base model itself; ``real-sK``: stage C with ``c_seed=K``; ``shuffled-sK``: the same with the
  positives and hard negatives shuffled across rows (``Recipe.c_shuffle``): as much contrastive training on the
  same sentences, with no meaning in the pairs. If the shuffled runs gain as much, the gain is not meaning.
- Every run gets ``measure.evaluate`` and ``measure.geometry`` on every gallery.
- Resumable (:mod:`.experiment`): each run's stage-C report and figures are written atomically
  (``OUT/runs/NAME/stage-c.json``, ``figures.json``) when complete, with the settings they depend on; a rerun
  (after kill -9 too) skips what is done and redoes unfinished steps, and refuses runs made with other settings.
  Seeds or galleries other than the defaults write ``OUT/claim2_seeds=...`` (:func:`experiment.label`).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from . import experiment, measure, recipe

#: the figures the summary reports, in its column order
COLUMNS = ("t2i_r1_plain", "i2t_r1_plain", "composed_r1", "t2i_r1_rich", "t2t_r1", "gap_plain",
           "text_mean_cos", "image_mean_cos", "text_eff_dim", "text_norm", "match_cos", "other_cos",
           "t2i_r1_centred", "i2t_r1_centred")
SEEDS, GALLERIES = (0, 1, 2, 3, 4), (0, 7, 23)


def run(out: Path, base: Path, seeds, gallery_seeds, setup: recipe.Recipe | None = None, scenes: int = 200,
        train_base: Path | None = None, train_only: bool = False) -> dict | None:
    """Measure ``before`` and the real and shuffled stage C of every seed (``setup``: the stage-C settings, by
    default the recipe's); return (and write) the summary.

    ``train_base``: the model whose language model stage C trains (default ``base``). Stages V and B leave the
    language model as stage A made it, so stage C can start from the stage-A checkpoint while they run.
    ``train_only``: train the adapters and stop (the figures come from a later run)."""
    setup, trains_from = setup or recipe.Recipe(), Path(train_base or base)

    def settings(name: str) -> dict:
        kind, seed = experiment.kind_of(name)
        return {"recipe": asdict(replace(setup, c_seed=seed, c_shuffle=kind == "shuffled"))}

    def fit(name: str, work: Path, wanted: dict) -> dict:
        return recipe.stage_c(recipe.Recipe(**wanted["recipe"]), trains_from, work)

    names = ["before"] + [f"{kind}-s{s}" for s in seeds for kind in ("real", "shuffled")]
    return experiment.run(out, base, names, settings=settings, fit=fit, measures=(measure.evaluate, measure.geometry),
                          markdown=table, gallery_seeds=gallery_seeds, stem="claim2",
                          selection={"seeds": list(seeds), "galleries": list(gallery_seeds)},
                          default={"seeds": list(SEEDS), "galleries": list(GALLERIES)}, scenes=scenes,
                          train_base=trains_from, train_only=train_only)


def table(summary: dict) -> str:
    """The summary as a Markdown table: one row per gallery and kind, mean ± sd over stage-C seeds."""
    return experiment.table(summary, COLUMNS)


def main(argv=None) -> None:
    """``python -m e5v.toyworld.claim2 OUT --base DIR``: measure claim 2 with the shuffled control."""
    parser = experiment.arguments("python -m e5v.toyworld.claim2", main.__doc__, SEEDS, GALLERIES, "stage-C seeds")
    parser.add_argument("--train-base", type=Path, help="train stage C on this model's language model (default: "
                                                        "--base; the stage-A checkpoint has the same one)")
    parser.add_argument("--train-only", action="store_true", help="train the adapters, measure nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = experiment.settings(recipe.Recipe(), args.set)
    try:
        summary = run(args.out, args.base, args.seeds, args.galleries, setup, args.scenes, args.train_base,
                      args.train_only)
    except ValueError as e:                         # settings that differ from stored runs'
        parser.exit(2, f"{parser.prog}: {e}\n")
    if summary:
        print(table(summary), end="")


if __name__ == "__main__":
    main()
