"""Resumable toy-world experiments (:mod:`.claim2`, :mod:`.modalities`): LoRA adapters trained from one model
before stage C, every run measured on several galleries, mean ± standard deviation over seeds.

A run is ``before`` (the base model itself) or ``KIND-sSEED``. Each lives in ``OUT/runs/NAME``: its training
report (``stage-c.json``) and its figures (``figures.json``) are written atomically when complete, so a rerun
(after kill -9 too) skips what is done and starts an unfinished training again from nothing.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable

from ..parts import atomic_write_bytes
from . import measure

log = logging.getLogger(__name__)


def kind_of(name: str) -> tuple[str, int | None]:
    """("real", 3) for "real-s3"; ("before", None) for "before"."""
    if name == "before":
        return name, None
    kind, seed = name.rsplit("-s", 1)
    return kind, int(seed)


def run(out: Path, base: Path, names: list[str], fit: Callable[[str, Path], dict],
        figures: Callable[[object, dict], dict], markdown: Callable[[dict], str], gallery_seeds, label: str,
        scenes: int = 200, train_only: bool = False, compare=()) -> dict | None:
    """Train (``fit(name, work)`` → its report, the adapter in ``work/stage-c/adapter``) and measure
    (``figures(engine, galleries)``) every run of ``names``; write the summary to ``OUT/LABEL.json`` and
    ``markdown(summary)`` to ``OUT/LABEL.md``, and return the summary. ``compare``: (kind, reference kind) pairs
    for :func:`versus`. ``train_only``: train, measure nothing."""
    from ..encoder import E5V

    out, base = Path(out), Path(base)
    galleries = {s: measure.gallery(scenes, s) for s in gallery_seeds}
    todo = [n for n in names if not (out / "runs" / n / "figures.json").exists()
            and not (train_only and n == "before")]
    t0 = time.perf_counter()
    log.info("%s: %d of %d runs to do", label, len(todo), len(names))
    for k, name in enumerate(todo, 1):
        folder = out / "runs" / name
        report, adapter = ({}, None) if name == "before" else trained(folder, name, fit)
        if not train_only:
            with E5V.from_pretrained(str(base), device="cpu", dtype="float32", adapter=adapter) as engine:
                report["galleries"] = figures(engine, galleries)
            atomic_write_bytes(folder / "figures.json", (json.dumps(report, indent=2) + "\n").encode())
        spent = time.perf_counter() - t0
        log.info("%s: %d/%d done (%s), %.0f s, about %.0f s to go", label, k, len(todo), name, spent,
                 spent / k * (len(todo) - k))
    if train_only:
        return None
    summary = summarise({n: json.loads((out / "runs" / n / "figures.json").read_text()) for n in names},
                        [str(s) for s in gallery_seeds], compare)
    atomic_write_bytes(out / f"{label}.json", (json.dumps(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out / f"{label}.md", markdown(summary).encode())
    return summary


def trained(folder: Path, name: str, fit: Callable[[str, Path], dict]) -> tuple[dict, str]:
    """Train run ``name`` into ``folder/work`` unless its report is there; returns the report and the adapter's
    path. An interrupted training starts again from nothing."""
    work, done = folder / "work", folder / "stage-c.json"
    if not done.exists():
        shutil.rmtree(work, ignore_errors=True)
        atomic_write_bytes(done, (json.dumps(fit(name, work), indent=2) + "\n").encode())
        log.info("%s trained", name)
    return json.loads(done.read_text()), str(work / "stage-c" / "adapter")


def summarise(runs: dict, gallery_seeds: list[str], compare=()) -> dict:
    """Per gallery and kind (in the order of ``runs``): mean, standard deviation and the single runs of each
    figure, and each kind's final stage-C loss; with ``compare``, :func:`versus` of those pairs."""
    kinds: dict[str, list[str]] = {}
    for name in runs:
        kinds.setdefault(kind_of(name)[0], []).append(name)
    out = {"galleries": {}, "loss": {}}
    for kind, members in kinds.items():
        if kind != "before":
            losses = [runs[n]["stage_c_loss"][1] for n in members]
            out["loss"][kind] = {"mean": statistics.mean(losses), "runs": losses}
    for g in gallery_seeds:
        out["galleries"][g] = {kind: {c: spread([runs[n]["galleries"][g][c] for n in members])
                                      for c in runs[members[0]]["galleries"][g]}
                               for kind, members in kinds.items()}
    if compare:
        out["versus"] = versus(out, compare)
    return out


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


def digits(column: str) -> int:
    """Recall figures, effective dimensions and norms with 1 decimal, cosines and gaps with 3."""
    return 1 if re.search(r"_r\d", column) or column.endswith(("_dim", "_norm")) else 3


def table(summary: dict, columns, headers: dict | None = None) -> str:
    """The summary as a Markdown table, one row per gallery and kind (mean ± sd over seeds; the figures of
    ``before``, a single model, alone), then each kind's final stage-C loss. ``headers``: column titles."""
    titles = [(headers or {}).get(c, c) for c in columns]
    head = "| gallery | model | " + " | ".join(titles) + " |\n|" + "---|" * (len(columns) + 2) + "\n"
    rows = []
    for g, kinds in summary["galleries"].items():
        for kind, cols in kinds.items():
            cells = []
            for c in columns:
                v, d = cols.get(c), digits(c)
                cells.append("—" if v is None else f"{v['mean']:.{d}f}" if kind == "before" else
                             f"{v['mean']:.{d}f} ± {v['sd']:.{d}f}")
            rows.append(f"| {g} | {kind} | " + " | ".join(cells) + " |")
    losses = "".join(f"- final stage-C loss, {k}: {v['mean']:.2f} ({', '.join(f'{x:.2f}' for x in v['runs'])})\n"
                     for k, v in summary["loss"].items())
    return head + "\n".join(rows) + "\n\n" + losses


def versus(summary: dict, pairs) -> dict:
    """For each gallery and each (kind, reference kind) of ``pairs``: per figure, the difference of the means and
    its standard error (sqrt(sd1²/n1 + sd2²/n2)), the measure of whether a kind beats its control."""
    out = {}
    for g, kinds in summary["galleries"].items():
        for kind, ref in pairs:
            if kind in kinds and ref in kinds:
                a, b = kinds[kind], kinds[ref]
                out.setdefault(g, {})[f"{kind} − {ref}"] = {
                    c: {"diff": a[c]["mean"] - b[c]["mean"],
                        "se": math.sqrt(sum(x[c]["sd"] ** 2 / len(x[c]["runs"]) for x in (a, b)))}
                    for c in a if c in b}
    return out


def versus_table(diffs: dict, columns, headers: dict | None = None) -> str:
    """:func:`versus` as a Markdown table: difference ± standard error, bold where it exceeds twice the error."""
    titles = [(headers or {}).get(c, c) for c in columns]
    head = "| gallery | difference | " + " | ".join(titles) + " |\n|" + "---|" * (len(columns) + 2) + "\n"
    rows = []
    for g, pairs in diffs.items():
        for pair, cols in pairs.items():
            cells = []
            for c in columns:
                v, d = cols.get(c), digits(c)
                cell = "—" if v is None else f"{v['diff']:+.{d}f} ± {v['se']:.{d}f}"
                cells.append(f"**{cell}**" if v is not None and abs(v["diff"]) > 2 * v["se"] else cell)
            rows.append(f"| {g} | {pair} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"
