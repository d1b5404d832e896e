"""Resumable toy-world experiments (:mod:`.claim2`, :mod:`.modalities`): LoRA adapters trained from one model
before stage C, every run measured on several galleries, mean ± standard deviation over seeds.

A run is ``before`` (the base model itself) or ``KIND-sSEED``. Each lives in ``OUT/runs/NAME``: its training
report (``stage-c.json``) and its figures (``figures.json``, one entry per gallery) are written atomically when
complete, so a rerun (after kill -9 too) skips what is done, measures the galleries a run lacks and starts an
unfinished training again from nothing.

Both files record the settings the run depends on: what the experiment gives (the stage-C recipe with its seed,
the condition, the mixing), the fingerprint of the model it trained from and the picture version
(``world.RENDER``); ``figures.json`` adds the model measured on and the gallery size. A rerun whose settings
differ from a stored run's is refused before anything runs, naming the folders and the keys. Files written before
settings were recorded are adopted once (:func:`reconstruct`).
"""
from __future__ import annotations

import argparse
import hashlib
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
from . import measure, recipe, world

log = logging.getLogger(__name__)


def kind_of(name: str) -> tuple[str, int | None]:
    """("real", 3) for "real-s3"; ("before", None) for "before"."""
    if name == "before":
        return name, None
    kind, seed = name.rsplit("-s", 1)
    return kind, int(seed)


def fingerprint(folder: Path) -> str:
    """A checkpoint folder's identity, wherever it lies: the sha256 of its files' names and bytes."""
    folder, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        h.update(f"{f.relative_to(folder).as_posix()}\0{len(data)}\0".encode() + data)
    return "sha256:" + h.hexdigest()[:16]


def label(stem: str, selection: dict, default: dict) -> str:
    """The summary's file stem: ``stem`` for the command's default selection, else ``stem_KEY=A,B_...`` for each
    key that differs from it, so that a run of a part never overwrites the whole table."""
    return "_".join([stem, *(f"{k}={','.join(map(str, v))}" for k, v in selection.items()
                             if list(v) != list(default[k]))])


def run(out: Path, base: Path, names: list[str], *, settings: Callable[[str], dict],
        fit: Callable[[str, Path, dict], dict], measures, markdown: Callable[[dict], str], gallery_seeds,
        stem: str, selection: dict, default: dict, scenes: int = 200, train_base: Path | None = None,
        train_only: bool = False, compare=()) -> dict | None:
    """Train every run of ``names`` from ``train_base`` (default ``base``): ``fit(name, work, settings)`` trains
    by ``settings(name)`` and returns its report, the adapter in ``work/stage-c/adapter``; measure each on every
    gallery, ``base`` with the adapter, with each of ``measures`` (``measure(engine, gallery)`` → figures). Write
    the summary (the runs of ``selection``; ``compare``: (kind, reference kind) pairs for :func:`versus`) to
    ``OUT/LABEL.json`` and ``markdown(summary)`` to ``OUT/LABEL.md`` (:func:`label`) and return it.
    ``train_only``: train, measure nothing."""
    from ..encoder import E5V

    out, base = Path(out), Path(base)
    galleries = {str(s): measure.gallery(scenes, s) for s in gallery_seeds}
    trains = {"trained_from": fingerprint(train_base or base), "render": world.RENDER}
    measures_on = {"base": fingerprint(base), "scenes": scenes, "render": world.RENDER}
    wanted = {n: (None if n == "before" else {**settings(n), **trains}) for n in names}
    stored, refused, adopted = {}, [], []
    for n in names:
        stored[n] = resumed(out / "runs" / n, wanted[n], {**(wanted[n] or {}), **measures_on}, galleries,
                            refused, adopted)
    if refused:
        raise ValueError(f"{len(refused)} stored files in {out} were made with other settings than asked (use "
                         "another OUT, or remove those runs to redo them):\n  " + "\n  ".join(refused))
    for path, data in adopted:                      # files of before the settings were recorded
        write(path, data)
        log.info("adopted %s (its settings recorded)", path)

    def missing(n: str) -> list[str]:
        return [] if train_only else [g for g in galleries if g not in (stored[n][1] or {}).get("galleries", {})]

    todo = [n for n in names if (n != "before" and stored[n][0] is None) or missing(n)]
    t0 = time.perf_counter()
    log.info("%s: %d of %d runs to do", stem, len(todo), len(names))
    for k, name in enumerate(todo, 1):
        folder = out / "runs" / name
        report, figures = stored[name]
        if name != "before" and report is None:
            report, figures = trained(folder, name, fit, wanted[name]), None
            stored[name] = report, figures
        if gals := missing(name):
            adapter = None if name == "before" else str(folder / "work" / "stage-c" / "adapter")
            with E5V.from_pretrained(str(base), device="cpu", dtype="float32", adapter=adapter) as engine:
                new = {g: {f: v for m in measures for f, v in m(engine, galleries[g]).items()} for g in gals}
            figures = {"settings": {**(wanted[name] or {}), **measures_on},
                       "galleries": {**(figures or {}).get("galleries", {}), **new}}
            write(folder / "figures.json", figures)
        stored[name] = report, figures
        spent = time.perf_counter() - t0
        log.info("%s: %d/%d done (%s), %.0f s, about %.0f s to go", stem, k, len(todo), name, spent,
                 spent / k * (len(todo) - k))
    if train_only:
        return None
    runs = {n: {**figures, **(report or {})} for n, (report, figures) in stored.items()}
    summary = {"selection": selection, **summarise(runs, galleries, compare)}
    name = label(stem, selection, default)
    write(out / f"{name}.json", summary)
    atomic_write_bytes(out / f"{name}.md", markdown(summary).encode())
    log.info("%s: wrote %s.json and .md (%s)", stem, out / name,
             "; ".join(f"{k} {' '.join(map(str, v))}" for k, v in selection.items()))
    return summary


def write(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def resumed(folder: Path, train: dict | None, measured: dict, galleries: dict, refused: list,
            adopted: list) -> tuple[dict | None, dict | None]:
    """The stored report and figures of one run (None where absent). Appends to ``refused`` a line naming each
    stored file whose settings differ from those wanted (``train`` for the report, ``measured`` for the figures)
    and the keys, and to ``adopted`` (path, data with settings) each file without settings that
    :func:`reconstruct` finds matching (a report also gets its final loss from the run's log)."""
    stored = []
    for file, wanted in (("stage-c.json", train), ("figures.json", measured)):
        path = folder / file
        data = json.loads(path.read_text()) if wanted is not None and path.exists() else None
        if data is not None and "settings" not in data:
            data = {**data, "settings": reconstruct(data, wanted, galleries)}
            if file == "stage-c.json" and (loss := final_loss(folder)) is not None:
                data["stage_c_final_loss"] = loss
            adopted.append((path, data))
        if data is not None and (keys := differing(data["settings"], wanted)):
            refused.append(f"{path}: " + "; ".join(f"{k}: {a} there, {b} asked" for k, a, b in keys))
        stored.append(data)
    return stored[0], stored[1]


def reconstruct(old: dict, wanted: dict, galleries: dict) -> dict:
    """The settings of a file written before they were recorded (before 2026-12-01's review), for the keys it
    records: the recipe, the condition, the mixing, the path of the model it trained from (its fingerprint if it
    is still there). Of the keys it does not record, it takes the wanted picture version and measured model, and
    the wanted gallery size if every stored gallery that is asked has the composed-query count of the gallery of
    that size; any other key stays unrecorded (and so differs)."""
    got = {k: old[k] for k in wanted if k in old and k != "trained_from"}
    if "trained_from" in old:
        got["trained_from"] = fingerprint(old["trained_from"]) if Path(old["trained_from"]).is_dir() else \
            old["trained_from"]
    got.update({k: wanted[k] for k in ("render", "base") if k in wanted})
    shared = [g for g in old.get("galleries", {}) if g in galleries]
    if "scenes" in wanted and shared and all(old["galleries"][g].get("composed_queries", 0) ==
                                             len(galleries[g].composed) for g in shared):
        got["scenes"] = wanted["scenes"]
    return got


def differing(stored: dict, wanted: dict) -> list[tuple[str, object, object]]:
    """(dotted key, stored value, wanted value) for each setting that differs ("not recorded" where absent)."""
    a, b = flat(stored), flat(wanted)
    return [(k, a.get(k, "not recorded"), b.get(k, "not recorded")) for k in sorted(a.keys() | b.keys())
            if a.get(k, "not recorded") != b.get(k, "not recorded")]


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def final_loss(folder: Path) -> float | None:
    """The final stage-C loss of a stored run (:func:`recipe.final_loss` of its log), None without a log."""
    logged = folder / "work" / "stage-c" / "log.jsonl"
    return recipe.final_loss(recipe.logged_losses(logged)) if logged.exists() else None


def trained(folder: Path, name: str, fit: Callable[[str, Path, dict], dict], settings: dict) -> dict:
    """Train run ``name`` into ``folder/work`` (starting again from nothing: the figures of an older adapter go)
    and write its report with ``settings``; returns the report."""
    work = folder / "work"
    shutil.rmtree(work, ignore_errors=True)
    (folder / "figures.json").unlink(missing_ok=True)
    report = {"settings": settings, **fit(name, work, settings)}
    write(folder / "stage-c.json", report)
    log.info("%s trained", name)
    return report


def summarise(runs: dict, galleries: dict, compare=()) -> dict:
    """Per gallery and kind (in the order of ``runs``): mean, standard deviation and the single runs of each
    figure, and each kind's final stage-C loss; each gallery's query counts (:func:`measure.queries`); with
    ``compare``, :func:`versus` of those pairs."""
    kinds: dict[str, list[str]] = {}
    for name in runs:
        kinds.setdefault(kind_of(name)[0], []).append(name)
    out = {"galleries": {}, "queries": {g: measure.queries(x) for g, x in galleries.items()}, "loss": {}}
    for kind, members in kinds.items():
        if kind != "before":
            losses = [x for n in members if (x := runs[n].get("stage_c_final_loss")) is not None]
            if losses:
                out["loss"][kind] = {"mean": statistics.mean(losses), "runs": losses}
    for g in galleries:
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


def grid(what: str, rows, columns, headers: dict | None, cell: Callable[[dict, int], str]) -> str:
    """A Markdown table: gallery, ``what``, then ``columns`` (titled by ``headers``); ``rows``: (gallery, name,
    {column: value}), each value written by ``cell(value, decimals)``, — where missing."""
    titles = [(headers or {}).get(c, c) for c in columns]
    head = f"| gallery | {what} | " + " | ".join(titles) + " |\n|" + "---|" * (len(columns) + 2) + "\n"
    return head + "\n".join(f"| {g} | {name} | " + " | ".join("—" if v.get(c) is None else cell(v[c], digits(c))
                                                               for c in columns) + " |"
                            for g, name, v in rows) + "\n"


def table(summary: dict, columns, headers: dict | None = None) -> str:
    """The summary as a Markdown table, one row per gallery and kind (mean ± sd over seeds; a kind of one run,
    such as ``before``, alone), then each kind's final stage-C loss. ``headers``: column titles."""
    rows = [(g, kind, cols) for g, kinds in summary["galleries"].items() for kind, cols in kinds.items()]
    losses = "".join(f"- final stage-C loss (mean of the last 5 steps), {k}: {v['mean']:.2f} "
                     f"({', '.join(f'{x:.2f}' for x in v['runs'])})\n" for k, v in summary["loss"].items())
    return grid("model", rows, columns, headers, lambda v, d: f"{v['mean']:.{d}f}" if len(v["runs"]) == 1 else
                f"{v['mean']:.{d}f} ± {v['sd']:.{d}f}") + "\n" + losses


def versus(summary: dict, pairs, level: float = 0.95) -> dict:
    """For each gallery and each (kind, reference kind) of ``pairs``: per figure, the difference of the means, its
    standard error ``se`` (sqrt(sd1²/n1 + sd2²/n2)), Welch's degrees of freedom ``df`` and ``marked``: whether
    it exceeds both the two-sided Welch t threshold at ``level`` (the t quantile for ``df`` times ``se``; 0 where
    both kinds vary not at all) and ``floor``, one query's worth of recall (100 / the gallery's queries of
    that figure; 0 for figures that are not recall)."""
    from scipy import stats

    out = {}
    for g, kinds in summary["galleries"].items():
        queries = summary["queries"][g]
        for kind, ref in pairs:
            if kind in kinds and ref in kinds:
                a, b = kinds[kind], kinds[ref]
                cells = out.setdefault(g, {})[f"{kind} − {ref}"] = {}
                for c in (c for c in a if c in b):
                    parts = [(x[c]["sd"] ** 2 / len(x[c]["runs"]), len(x[c]["runs"])) for x in (a, b)]
                    var = sum(v for v, _ in parts)
                    df = var ** 2 / sum(v ** 2 / (n - 1) for v, n in parts if v) if var else None
                    threshold = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(var) if var else 0.0
                    floor = 100 / queries[c] if c in queries else 0.0
                    diff = a[c]["mean"] - b[c]["mean"]
                    cells[c] = {"diff": diff, "se": math.sqrt(var), "df": df, "threshold": threshold,
                                "floor": floor, "marked": abs(diff) > max(threshold, floor)}
    return out


def versus_table(diffs: dict, columns, headers: dict | None = None) -> str:
    """:func:`versus` as a Markdown table: difference ± standard error, bold where marked."""
    rows = [(g, pair, cols) for g, pairs in diffs.items() for pair, cols in pairs.items()]

    def cell(v: dict, d: int) -> str:
        text = f"{v['diff']:+.{d}f} ± {v['se']:.{d}f}"
        return f"**{text}**" if v["marked"] else text
    return grid("difference", rows, columns, headers, cell)


# --- the commands -----------------------------------------------------------------------------------------------
def arguments(prog: str, doc: str, seeds, galleries, seed_help: str) -> argparse.ArgumentParser:
    """The arguments every experiment command takes: OUT, the base model, the seeds, the galleries and their size,
    and stage-C settings (``--set KEY=VALUE``); a command adds its own."""
    from . import MINI_BEFORE_C

    parser = argparse.ArgumentParser(prog=prog, description=doc)
    parser.add_argument("out", type=Path)
    parser.add_argument("--base", type=Path, default=MINI_BEFORE_C, help="the model before stage C")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds), help=seed_help)
    parser.add_argument("--galleries", type=int, nargs="+", default=list(galleries), help="gallery seeds")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change a stage-C setting")
    return parser


def settings(setup: recipe.Recipe, changes: list[str]) -> recipe.Recipe:
    """``setup`` with the ``--set KEY=VALUE`` changes applied."""
    for kv in changes:
        setup = recipe.setting(setup, kv)
    return setup
