"""The benchmark's report: one row per measurement, the machine it ran on, and a summary against the speed targets
listed in BENCHMARKS.md, rewritten as JSON and a markdown table after each row (a run cut short keeps what it
measured)."""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Report:
    """Rows of measurements and the summary against the targets, rewritten to JSON and markdown after each row."""

    def __init__(self, meta: dict, json_path: Path | None, md_path: Path | None):
        self.meta, self.rows, self.json_path, self.md_path = meta, [], json_path, md_path

    def add(self, **row) -> dict:
        row = {k: (round(v, 6 if k == "min cosine" else 2) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        log.info("%s", row)
        self.write()
        return row

    def as_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "summary": summarize(self.rows)}

    def markdown(self) -> str:
        m = self.meta
        head = [f"Device: {m['device_name']}; torch {m['torch']}, transformers {m['transformers']}, {m['dtype']}, "
                f"LM attention {m['attn_implementation']}; {m['date']}; model: {m['model']}.", ""]
        cols = ["what", "path", "batch", "items", "items/s", "tokens/s", "peak GiB", "min cosine", "note"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
        summary = summarize(self.rows)
        return "\n".join(head + lines + ([""] + [f"- {line}" for line in summary] if summary else [])) + "\n"

    def write(self) -> None:
        from ..parts import atomic_write_bytes

        if self.json_path:
            atomic_write_bytes(self.json_path, (json.dumps(self.as_dict(), indent=2) + "\n").encode())
        if self.md_path:
            atomic_write_bytes(self.md_path, self.markdown().encode())


def summarize(rows: list[dict]) -> list[str]:
    """The measured rows read against the targets: best speeds, peak memory at the same batch, whether
    preprocessing keeps up, the AnyRes cap. Only what the rows so far hold."""
    def pick(what, engine):
        return [r for r in rows if r["what"] == what and r["path"].startswith("e5v") == engine
                and r.get("items/s") is not None]

    def fmt(r):
        return f"{r['items/s']} ({r['path']}, batch {r['batch']})"

    out = []
    for what, unit, target in (("images", "images/s at full AnyRes", "target >= 16 images/s, cosine >= 0.999"),
                               ("texts", "texts/s", "target >= 1,000 texts/s")):
        ours, official = pick(what, True), pick(what, False)
        if ours and official:
            best, ref = max(ours, key=lambda r: r["items/s"]), max(official, key=lambda r: r["items/s"])
            worst = min(r["min cosine"] for r in ours if r.get("min cosine") is not None)
            out.append(f"{unit}: e5v best {fmt(best)}, official recipe best {fmt(ref)}, "
                       f"x{best['items/s'] / ref['items/s']:.2f}; "
                       f"smallest cosine to the official recipe over all e5v paths {worst} ({target})")
        for b in sorted({r["batch"] for r in official if isinstance(r["batch"], int)}):
            same = [r for r in ours if r["batch"] == b]
            theirs = next(r for r in official if r["batch"] == b)
            if same and same[0].get("peak GiB") is not None and theirs.get("peak GiB") is not None:
                out.append(f"peak memory, {what} at batch {b}: e5v {same[0]['peak GiB']} GiB, official recipe "
                           f"{theirs['peak GiB']} GiB (target: no higher)")
    prep = [r for r in rows if r["what"] == "image preprocessing"]
    ours = pick("images", True)
    if prep and ours:
        used = prep[-1]  # the engine's setting: its worker processes, when it has any
        need = max(r["items/s"] for r in ours)
        out.append(f"image decoding + preprocessing: {used['items/s']} images/s ({used['path']}) against "
                   f"{need} images/s used by the fastest e5v path: "
                   f"{'keeps up' if used['items/s'] >= need else 'too slow, the model waits'}")
    for r in rows:
        if r["what"] == "images, AnyRes capped":
            out.append(f"AnyRes cap ({r['path']}): {r['items/s']} images/s; {r['note']}")
    return out


def environment(device, dtype, attn: str, model: str) -> dict:
    """The report's ``meta``: device, versions, precision, attention, model, date."""
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": name, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "dtype": str(dtype).replace("torch.", ""), "attn_implementation": attn, "model": model,
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
