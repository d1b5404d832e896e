"""``e5v index verify`` and ``e5v index repair``: check every file of an index folder against its manifest
(checksums included), and re-embed only the damaged partitions.

A damaged partition is re-embedded from its own rows when they are intact (only the vectors were hurt), else from
the source that built it (the partition's item ids are in its done marker). Each repaired partition is switched
in with one manifest write (:func:`e5v.store.build.rewrite_partition`), so a killed repair resumes by running it
again. A manifest that disagrees with files that still match their checksums is damage of the manifest itself:
reported, not repaired (rebuild the index).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import EngineConfig
from ..errors import ConfigError, E5VError, IndexDamagedError
from .ann import build_ann
from .build import check_settings, embed_part, fingerprint, index_root, progress_bar, read_marker, rewrite_partition
from .codes import code_problems, update_codes
from .indexing import index_config, index_settings
from .layout import MANIFEST, digest, file_facts, open_ann, part_file, partition_problems, read_index_manifest
from .layout import read_rows, rows_path, vectors_path, write_manifest
from .sources import Entry, read_source

log = logging.getLogger(__name__)

_PART_FILE = re.compile(r"(part-(\d{6})(?:\.r\d+)?)\.(npy|rows\.jsonl)")


@dataclass
class Report:
    """What ``verify`` found. ``partitions``: damaged partition -> problems; ``records``: partitions whose files
    match their checksums but not their manifest record (not repairable); ``unchecked``: partitions without
    recorded checksums (written by an older e5v)."""

    count: int = 0
    partitions: dict[str, list[str]] = field(default_factory=dict)
    records: list[str] = field(default_factory=list)
    ann: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    stray: list[Path] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.partitions or self.ann or self.codes or self.stray)

    def lines(self) -> list[str]:
        out = [f"{name}: {problem}" for name, problems in self.partitions.items() for problem in problems]
        out += [f"{name}: the manifest's record disagrees with files that match their checksums (the manifest "
                "was edited); rebuild the index" for name in self.records]
        out += [f"approximate index: {a}" for a in self.ann]
        out += [f"search codes: {c}" for c in self.codes]
        out += [f"stray file {p.name}: not part of the index (`e5v index repair` removes it)" for p in self.stray]
        return out


def _open(folder) -> tuple[Path, dict]:
    folder = Path(folder).resolve()
    manifest = read_index_manifest(folder)
    if manifest is None:
        raise ConfigError(f"{folder}: not an e5v index (no {MANIFEST})")
    return folder, manifest


def verify(folder, *, progress: bool = False) -> Report:
    """Check every partition (shape, sizes, checksums, rows), the approximate index, and look for stray files.
    A manifest that cannot be read raises :class:`e5v.errors.IndexDamagedError`."""
    folder, manifest = _open(folder)
    report = Report(count=manifest["count"])
    seen: dict[str, str] = {}
    with progress_bar(len(manifest["partitions"]), f"verify {folder.name}", progress, unit="part") as bar:
        for i, p in enumerate(manifest["partitions"]):
            problems = partition_problems(folder, manifest, i, checksums=True)
            if not problems:
                try:
                    for r in read_rows(folder, manifest, i):
                        if r["id"] in seen:
                            problems.append(f"id {r['id']!r} is also in {seen[r['id']]}")
                            break
                        seen[r["id"]] = p["name"]
                except IndexDamagedError as exc:
                    problems.append(str(exc))
            if "sha256" not in p:
                report.unchecked.append(p["name"])
            if problems:
                report.partitions[p["name"]] = problems
                if _files_intact(folder, p):
                    report.records.append(p["name"])
            bar.update(1)
    report.ann = _ann_problems(folder, manifest)
    report.codes = code_problems(folder, manifest, checksums=True)
    report.stray = _stray(folder, manifest)
    return report


def _files_intact(folder: Path, p: dict) -> bool:
    """Whether both files of a partition still match their recorded checksums."""
    if "sha256" not in p:
        return False
    stem = part_file(p)
    try:
        return (digest(vectors_path(folder, stem)) == p["sha256"]["vectors"]
                and digest(rows_path(folder, stem)) == p["sha256"]["rows"])
    except OSError:
        return False


def _ann_problems(folder: Path, manifest: dict) -> list[str]:
    ann = manifest.get("ann")
    if not ann:
        return []
    try:
        open_ann(folder, ann, manifest["dim"])
    except E5VError as exc:
        return [str(exc)]
    return []


def _stray(folder: Path, manifest: dict) -> list[Path]:
    """Partition and approximate-index files the manifest does not list (a pending job's own files aside)."""
    listed = {part_file(p) for p in manifest["partitions"]}
    job = manifest.get("job")
    pending_from = len(manifest["partitions"]) if job is not None else None
    out = []
    for path in sorted(folder.iterdir()):
        m = _PART_FILE.fullmatch(path.name)
        if m:
            own = pending_from is not None and int(m.group(2)) >= pending_from and m.group(1) == f"part-{m.group(2)}"
            if m.group(1) not in listed and not own:
                out.append(path)
        elif path.name.startswith("ann-") and path.suffix == ".faiss" and \
                path.name != (manifest.get("ann") or {}).get("file"):
            out.append(path)
    return out


def write_checksums(folder) -> int:
    """Record the checksums of partitions that have none (an index written by an older e5v), after checking
    their shape, sizes and rows; returns how many were recorded."""
    folder, manifest = _open(folder)
    done = 0
    for i, p in enumerate(manifest["partitions"]):
        if "sha256" in p or partition_problems(folder, manifest, i):
            continue
        read_rows(folder, manifest, i)
        p.update(file_facts(folder, part_file(p)))
        done += 1
    ann = manifest.get("ann")
    if ann and "sha256" not in ann and not _ann_problems(folder, manifest):
        ann["sha256"] = digest(folder / ann["file"])
    write_manifest(folder, manifest)
    return done


def partition_entries(folder: Path, manifest: dict, i: int) -> list[Entry]:
    """The items to embed again for partition ``i``: its rows when they are intact, else its items read again
    from the source that built it."""
    p = manifest["partitions"][i]
    try:
        return [Entry.from_row(r) for r in read_rows(folder, manifest, i)]
    except IndexDamagedError as exc:
        damage = exc
    ids = (read_marker(folder, p["name"]) or {}).get("ids")
    source = next((s for s in manifest.get("sources", []) if s["partitions"][0] <= i < s["partitions"][1]), None)
    if source is None:
        raise IndexDamagedError(f"{folder}: {p['name']} cannot be repaired: its rows are damaged ({damage}) and "
                                "no recorded source covers it; rebuild the index") from None
    entries = read_source(source["source"], rebase=source["kind"] == "add", root=index_root(manifest))
    if ids is None:  # no list of its items (an index of an older e5v): the build's items, if the source is the same
        if source["kind"] != "build" or fingerprint(entries) != source["inputs"]:
            raise IndexDamagedError(f"{folder}: {p['name']} cannot be repaired: its rows are damaged ({damage}), "
                                    f"its done marker does not list its items and {source['source']} changed since; "
                                    "rebuild the index") from None
        start = sum(q["items"] for q in manifest["partitions"][source["partitions"][0]:i])
        return entries[start:start + p["items"]]
    by_id = {e.id: e for e in entries if e.problem is None}
    missing = [x for x in ids if x not in by_id]
    if missing:
        raise IndexDamagedError(f"{folder}: {p['name']} cannot be repaired: {len(missing)} of its items (e.g. "
                                f"{missing[0]!r}) are no longer in {source['source']}; rebuild the index")
    return [by_id[x] for x in ids]


def repair(folder, config: EngineConfig | None = None, *, progress: bool = True) -> tuple[Report, list[dict]]:
    """Re-embed the damaged partitions (one manifest write each), remove stray files, rebuild a damaged or
    outdated approximate index, encode damaged or outdated search codes again. ``config``: engine options; the
    vector options it leaves open are the index's (:func:`~e5v.store.indexing.index_config`), and one that
    differs from the index's is refused (a compute dtype or checkpoint files other than the recorded ones: a
    warning). Returns what ``verify`` found before, and the items that failed now."""
    report = verify(folder)
    folder, manifest = _open(folder)
    if report.records:
        raise IndexDamagedError(f"{folder}: the manifest disagrees with files that match their checksums "
                                f"({', '.join(report.records[:5])}): the manifest itself was edited; rebuild the index")
    if manifest.get("job") is not None and report.partitions:
        raise ConfigError(f"{folder} has an unfinished {manifest['job']['kind']}; rerun it before repairing")
    names = [p["name"] for p in manifest["partitions"]]
    todo = [(names.index(n), partition_entries(folder, manifest, names.index(n))) for n in report.partitions]
    if todo:
        config = index_config(manifest, config)
        check_settings(folder, manifest, index_settings(manifest, config))
    ann = manifest.get("ann")
    skipped = []
    for path in report.stray:  # first: a killed repair's new files are stray, and may be written again below
        path.unlink(missing_ok=True)
    if todo:
        manifest, skipped = _reembed(folder, manifest, todo, config, progress)
    if ann and report.ann and not todo:  # damaged, the partitions fine: set it aside, then build it again
        manifest["ann"] = {**ann, "stale": True}
        write_manifest(folder, manifest)
    if ann:
        build_ann(folder, update=True)
    if manifest.get("codes"):  # the codes of re-embedded partitions, and damaged ones (verify hashed them all)
        update_codes(folder, checksums=bool(report.codes))
    return report, skipped


def _reembed(folder: Path, manifest: dict, todo: list[tuple[int, list[Entry]]], config: EngineConfig,
             progress: bool) -> tuple[dict, list[dict]]:
    """Re-embed and switch in each partition of ``todo`` ((number, items)); the manifest, and the items that
    failed."""
    from ..encoder import load_engine

    skipped = []
    with load_engine(config, progress) as model, \
            progress_bar(sum(len(e) for _, e in todo), f"repair {folder.name}", progress) as bar:
        for i, entries in todo:
            vectors, rows, failed = embed_part(model, entries, manifest["prompt"])
            manifest = rewrite_partition(folder, manifest, i, vectors, rows, failed)
            skipped += failed
            bar.update(len(entries))
            log.info("repaired %s (%d items)", manifest["partitions"][i]["name"], len(rows))
    return manifest, skipped
