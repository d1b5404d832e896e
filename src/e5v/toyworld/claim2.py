"""The paper's claim 2 measured on the toy world: stage C (text only) from one model before stage C, run with
several seeds on the real toy NLI triplets and on the shuffled control, each evaluated on several galleries.

``python -m e5v.toyworld.claim2 OUT --base DIR --seeds 0 1 2 3 4 --galleries 0 7 23``

- ``before``: the base model itself; ``real-sK``: stage C with ``c_seed=K``; ``shuffled-sK``: the same with the
  positives and hard negatives shuffled across rows (``Recipe.c_shuffle``): as much contrastive training on the
  same sentences, with no meaning in the pairs. If the shuffled runs gain as much, the gain is not meaning.
- Every run gets ``measure.evaluate`` and ``measure.geometry`` on every gallery.
- Resumable: each run's stage-C report and figures are written atomically (``OUT/runs/NAME/stage-c.json``,
  ``figures.json``) when complete; a rerun (after kill -9 too) skips what is done and redoes unfinished steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..parts import atomic_write_bytes
from . import measure, recipe

log = logging.getLogger(__name__)

#: the figures the summary reports, in its column order
COLUMNS = ("t2i_r1_plain", "i2t_r1_plain", "composed_r1", "t2i_r1_rich", "t2t_r1", "gap_plain",
           "text_mean_cos", "image_mean_cos", "text_eff_dim", "text_norm", "match_cos", "other_cos",
           "t2i_r1_centred", "i2t_r1_centred")


def figures(engine, galleries: dict) -> dict:
    """``evaluate`` and ``geometry`` of one model on each gallery, keyed by the gallery's seed."""
    return {str(seed): {**measure.evaluate(engine, g), **measure.geometry(engine, g)} for seed, g in galleries.items()}


def run(out: Path, base: Path, seeds, gallery_seeds, setup: recipe.Recipe | None = None, scenes: int = 200,
        train_base: Path | None = None, train_only: bool = False) -> dict | None:
    """Measure ``before`` and the real and shuffled stage C of every seed (``setup``: the stage-C settings, by
    default the recipe's); return (and write) the summary.

    ``train_base``: the model whose language model stage C trains (default ``base``). Stages V and B leave the
    language model as stage A made it, so stage C can start from the stage-A checkpoint while they run.
    ``train_only``: train the adapters and stop (the figures come from a later run)."""
    from ..encoder import E5V

    out, base, setup = Path(out), Path(base), setup or recipe.Recipe()
    galleries = {s: measure.gallery(scenes, s) for s in gallery_seeds}
    names = ["before"] + [f"{kind}-s{s}" for s in seeds for kind in ("real", "shuffled")]
    t0 = time.perf_counter()
    for k, name in enumerate(names, 1):
        folder = out / "runs" / name
        if (folder / "figures.json").exists() or (train_only and name == "before"):
            continue
        report, adapter = {}, None
        if name != "before":
            report, adapter = train(folder, setup, name, Path(train_base or base))
        if train_only:
            continue
        with E5V.from_pretrained(str(base), device="cpu", dtype="float32", adapter=adapter) as engine:
            report["galleries"] = figures(engine, galleries)
        atomic_write_bytes(folder / "figures.json", (json.dumps(report, indent=2) + "\n").encode())
        log.info("claim 2: %d/%d runs (%s) measured (%.0f s)", k, len(names), name, time.perf_counter() - t0)
    if train_only:
        return None
    summary = summarise({n: json.loads((out / "runs" / n / "figures.json").read_text()) for n in names},
                        [str(s) for s in gallery_seeds])
    atomic_write_bytes(out / "claim2.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out / "claim2.md", table(summary).encode())
    return summary


def train(folder: Path, setup: recipe.Recipe, name: str, base: Path) -> tuple[dict, str]:
    """Stage C of run ``name`` ("real-sK" or "shuffled-sK") into ``folder/work`` unless its report is there;
    returns the report and the adapter's path. An interrupted run starts again from nothing."""
    kind, seed = name.rsplit("-s", 1)
    work, done = folder / "work", folder / "stage-c.json"
    if not done.exists():
        shutil.rmtree(work, ignore_errors=True)
        settings = replace(setup, c_seed=int(seed), c_shuffle=kind == "shuffled")
        report = {"recipe": asdict(settings), "trained_from": str(base), **recipe.stage_c(settings, base, work)}
        atomic_write_bytes(done, (json.dumps(report, indent=2) + "\n").encode())
        log.info("claim 2: stage C of %s trained", name)
    return json.loads(done.read_text()), str(work / "stage-c" / "adapter")


def summarise(runs: dict, gallery_seeds: list[str]) -> dict:
    """Per gallery and kind (before, real, shuffled): mean, standard deviation and the single runs of each figure,
    and each kind's final stage-C loss."""
    kinds = {"before": ["before"]}
    for name in runs:
        if name != "before":
            kinds.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    out = {"galleries": {}, "loss": {}}
    for kind, members in kinds.items():
        if kind != "before":
            losses = [runs[n]["stage_c_loss"][1] for n in members]
            out["loss"][kind] = {"mean": statistics.mean(losses), "runs": losses}
    for g in gallery_seeds:
        out["galleries"][g] = {kind: {c: spread([runs[n]["galleries"][g][c] for n in members])
                                      for c in COLUMNS if c in runs[members[0]]["galleries"][g]}
                               for kind, members in kinds.items()}
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def table(summary: dict) -> str:
    """The summary as a Markdown table: one row per gallery and kind, mean ± sd over stage-C seeds."""
    head = "| gallery | model | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 2) + "\n"
    rows = []
    for g, kinds in summary["galleries"].items():
        for kind, cols in kinds.items():
            cells = []
            for c in COLUMNS:
                v, digits = cols.get(c), 1 if "r1" in c or c.endswith(("_dim", "_norm")) else 3
                cells.append("—" if v is None else f"{v['mean']:.{digits}f}" if kind == "before" else
                             f"{v['mean']:.{digits}f} ± {v['sd']:.{digits}f}")
            rows.append(f"| {g} | {kind} | " + " | ".join(cells) + " |")
    losses = "".join(f"- final stage-C loss, {k}: {v['mean']:.2f} ({', '.join(f'{x:.2f}' for x in v['runs'])})\n"
                     for k, v in summary["loss"].items())
    return head + "\n".join(rows) + "\n\n" + losses


def main(argv=None) -> None:
    """``python -m e5v.toyworld.claim2 OUT --base DIR``: measure claim 2 with the shuffled control."""
    from .. import toyworld

    parser = argparse.ArgumentParser(prog="python -m e5v.toyworld.claim2", description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, default=toyworld.MINI_BEFORE_C, help="the model before stage C")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="stage-C seeds")
    parser.add_argument("--galleries", type=int, nargs="+", default=[0, 7, 23], help="gallery seeds")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--train-base", type=Path, help="train stage C on this model's language model (default: "
                                                        "--base; the stage-A checkpoint has the same one)")
    parser.add_argument("--train-only", action="store_true", help="train the adapters, measure nothing")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a stage-C setting")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    setup = recipe.Recipe()
    for kv in args.set:
        setup = recipe.setting(setup, kv)
    summary = run(args.out, args.base, args.seeds, args.galleries, setup, args.scenes, args.train_base,
                  args.train_only)
    if summary:
        print(table(summary), end="")


if __name__ == "__main__":
    main()
