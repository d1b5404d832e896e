"""Results as JSON and as a markdown table that sets each number beside the paper's (E5-V, arXiv 2407.12580
v1, Tables 1-6)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..parts import atomic_write_bytes

_R = ("R@1", "R@5", "R@10")


def _pair(t2i, i2t):
    return {**{f"t2i_{k}": v for k, v in zip(_R, t2i)}, **{f"i2t_{k}": v for k, v in zip(_R, i2t)}}


#: The paper's E5-V numbers per task and metric.  t2i = "image retrieval", i2t = "text retrieval" (Tables 1, 4).
PAPER: dict[str, dict[str, float]] = {
    "flickr30k": _pair((79.5, 95.0, 97.6), (88.2, 98.7, 99.4)),
    "coco": _pair((52.0, 76.5, 84.7), (62.0, 83.6, 89.7)),
    "i2i-flickr30k": _pair((67.8, 89.2, 93.6), (79.5, 95.2, 97.8)),
    "i2i-coco": _pair((41.2, 66.7, 76.2), (51.6, 76.8, 84.9)),
    "cirr": {"R@5": 66.6},  # val R@5, Table 6 (the paper's Table 2 is the test split, scored by the server)
    "cirr-test": {"R@1": 33.90, "R@5": 64.12, "R@10": 75.88, "R@50": 93.54},
    "fashioniq": {"shirt_R@10": 36.36, "shirt_R@50": 56.43, "dress_R@10": 23.75, "dress_R@50": 47.45,
                  "toptee_R@10": 35.29, "toptee_R@50": 57.47, "avg_R@10": 31.80, "avg_R@50": 53.78},
    "fashioniq-dress": {"R@10": 23.75, "R@50": 47.45},
    "fashioniq-shirt": {"R@10": 36.36, "R@50": 56.43},
    "fashioniq-toptee": {"R@10": 35.29, "R@50": 57.47},
    "sts12": {"spearman": 80.03}, "sts13": {"spearman": 89.94}, "sts14": {"spearman": 85.67},
    "sts15": {"spearman": 89.09}, "sts16": {"spearman": 85.89}, "sts-b": {"spearman": 87.88},
    "sick-r": {"spearman": 83.51},
}
STS_AVERAGE = ("sts12", "sts13", "sts14", "sts15", "sts16", "sts-b", "sick-r")
PAPER_STS_AVG = 86.00


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def rows(results: dict) -> list[tuple[str, str, float | None, float | None]]:
    """(task, metric, ours, paper) for every metric, plus the paper's STS average when all seven are there."""
    out = []
    tasks = results.get("tasks", {})
    for task, res in tasks.items():
        paper = PAPER.get(task, {})
        for metric, value in res.get("metrics", {}).items():
            out.append((task, metric, value, paper.get(metric)))
        if task == "cirr-test":
            out += [(task, m, None, v) for m, v in paper.items()]
    if all(t in tasks and "spearman" in tasks[t].get("metrics", {}) for t in STS_AVERAGE):
        avg = sum(tasks[t]["metrics"]["spearman"] for t in STS_AVERAGE) / len(STS_AVERAGE)
        out.append(("sts (avg of 7)", "spearman", avg, PAPER_STS_AVG))
    return out


def markdown(results: dict) -> str:
    head = [f"# e5v eval: {results.get('model')}" + (f" + {results['adapter']}" if results.get("adapter") else ""),
            "", f"dtype {results.get('dtype')}; numbers in percent; paper = E5-V (arXiv 2407.12580) Tables 1-5 "
            "(cirr: val R@5 of Table 6; the test split is scored by the CIRR server, see cirr-test)."]
    if results.get("limit"):
        head.append(f"**--limit {results['limit']}: a quick look on part of each set, not comparable with the paper.**")
    lines = head + ["", "| task | metric | e5v | paper | Δ |", "|---|---|---:|---:|---:|"]
    for task, metric, ours, paper in rows(results):
        delta = _fmt(ours - paper) if ours is not None and paper is not None and not math.isnan(ours) else "–"
        lines.append(f"| {task} | {metric} | {_fmt(ours)} | {_fmt(paper)} | {delta} |")
    notes = [f"- {task}: {n}" for task, res in results.get("tasks", {}).items() for n in res.get("notes", [])]
    skipped = [f"- {task}: {side}: {n} item(s) failed to embed" for task, res in results.get("tasks", {}).items()
               for side, n in res.get("skipped", {}).items()]
    if notes or skipped:
        lines += ["", "Notes:"] + skipped + notes
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> tuple[Path, Path]:
    """``out/results.json`` and ``out/results.md``, written atomically."""
    out = Path(out)
    js, md = out / "results.json", out / "results.md"
    atomic_write_bytes(js, (json.dumps(results, indent=2, sort_keys=False) + "\n").encode())
    atomic_write_bytes(md, markdown(results).encode())
    return js, md
