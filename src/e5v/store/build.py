"""Building an index and adding to it: partitions embedded one at a time (by one process, or shared among the
ranks of ``torchrun``), each written whole or not at all, committed to the manifest in input order.

A job (a build, or an add) is fixed by its source's content and the partition size; its fingerprint is kept in
the manifest until it is finished, so rerunning the same command after a kill resumes it and another command is
refused instead of mixing two jobs.  Partition ``j`` of a job always holds the same items, whoever embeds it, so
an index built by N processes equals one built by one.

``add`` embeds the items the index does not hold: an image whose file (or shard member) is already there is known
whatever its id, a text by its id (and its words or its source); an id that the index gives to another item is
refused.  Known items
whose file changed since (size, mtime) or whose text changed are reported, and with ``update`` re-embedded in
place: their partitions are rewritten under new file names and switched in with one manifest write.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, E5VError, IndexDamagedError
from ..parts import atomic_save, atomic_write_bytes
from .index import REPAIR_HINT
from .layout import FORMAT, PRECISIONS, VERSION, done_path, file_facts, part_file, part_name, read_index_manifest
from .layout import partition_problems, read_rows, revision
from .layout import rows_path, vectors_path, write_jsonl, write_manifest
from .sources import Entry, row_changed, row_origin, same_item

log = logging.getLogger(__name__)

#: manifest fields recorded for the vectors of an index, which every job on it must share (the vectors must live in
#: one space) except the :data:`WARNED` ones: the engine's :meth:`~e5v.config.EngineConfig.vector_settings`, the
#: prompts, and the storage precision
SETTINGS = ("model", "adapter", "weights", "dtype", "chat_format", "max_length", "anyres_max_tiles",
            "image_max_pixels", "alpha", "prompt", "precision")
#: the SETTINGS that indexes written before them do not record: compared only where recorded
RECORDED_SINCE_V2 = ("weights", "dtype", "alpha", "image_max_pixels")
#: the SETTINGS that are recorded (``index info`` shows them) but not enforced: a difference is a warning (a compute
#: dtype resolved on another machine, a checkpoint folder copied without its files' modification times)
WARNED = {"dtype": "the new vectors may differ slightly",
          "weights": "the checkpoint files changed since the index was built"}


@dataclass
class IndexJob:
    kind: str  # "build" or "add"
    source: str
    inputs: str  # fingerprint of the source's items
    first: int  # number of the job's first partition in the index
    part_size: int
    entries: list[Entry]

    @property
    def nparts(self) -> int:
        return (len(self.entries) + self.part_size - 1) // self.part_size

    def part(self, j: int) -> list[Entry]:
        return self.entries[j * self.part_size:(j + 1) * self.part_size]

    @property
    def id(self) -> str:
        """Names the job in its partitions' done markers."""
        return hashlib.sha256(f"{self.kind} {self.inputs} {self.first} {self.part_size}".encode()).hexdigest()[:16]

    def record(self) -> dict:
        return {"kind": self.kind, "source": self.source, "inputs": self.inputs, "first": self.first,
                "part_size": self.part_size, "parts": self.nparts, "items": len(self.entries)}


@dataclass
class Summary:
    manifest: dict
    items: int = 0  # items of the source this job had to index
    known: int = 0  # items of the source already in the index (add)
    embedded: int = 0  # vectors written by this process in this run
    resumed_parts: int = 0  # partitions found finished from an earlier run
    skipped: list[dict] = field(default_factory=list)  # skipped items of the whole job (and of the updates)
    changed: list = field(default_factory=list)  # known items whose source changed: (partition, row, Entry)
    updated: int = 0  # changed items re-embedded (add --update)
    seconds: float = 0.0
    finished_before: bool = False  # the same build was already complete: nothing to do
    ann: dict | None = None  # the approximate index's manifest entry when this job built or extended it
    codes: dict | None = None  # the search codes' manifest entry after this job (None: the index has none)
    rank: int = 0  # this process's rank among torchrun's (rank 0 reports)


class Ranks:
    """This process's place among ``torchrun`` / ``accelerate launch`` ranks (RANK, WORLD_SIZE, LOCAL_RANK)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.started = False

    def start(self) -> None:
        """Join the process group: nccl when every rank has a GPU, gloo on CPU."""
        if self.world <= 1:
            return
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
            self.started = True
        log.info("rank %d of %d joined (%s)", self.rank, self.world, dist.get_backend())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def device(self, requested: str | None) -> str | None:
        """Each rank's own GPU unless a device was named."""
        if requested is None and self.world > 1:
            import torch

            if torch.cuda.is_available():
                return f"cuda:{self.local_rank}"
        return requested


def fingerprint(entries: list[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e.key(), ensure_ascii=False).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()


def new_manifest(settings: dict, root: str | None = None) -> dict:
    """An empty manifest; ``root`` is the folder the index is built from (files added later get ids relative
    to it)."""
    return {"format": FORMAT, "version": VERSION, **{k: settings.get(k) for k in SETTINGS}, "dim": None, "count": 0,
            "counts": {"image": 0, "text": 0}, "skipped": 0, "partitions": [], "sources": [], "job": None,
            "ann": None, "codes": None, "root": root}


def index_root(manifest: dict) -> str | None:
    """The folder ids of added files are relative to (for an index written before roots were recorded: its
    first source when that is an absolute folder)."""
    if manifest.get("root"):
        return manifest["root"]
    first = (manifest.get("sources") or [{}])[0].get("source")
    return first if isinstance(first, str) and os.path.isabs(first) and os.path.isdir(first) else None


def check_settings(folder: Path, manifest: dict, settings: dict) -> None:
    """Refuse ``settings`` that would make vectors of another space than the index's; log one warning when only
    the :data:`WARNED` ones differ from the recorded ones."""
    differ = [k for k in SETTINGS
              if (k in manifest or k not in RECORDED_SINCE_V2) and manifest.get(k) != settings.get(k)]
    diff = [k for k in differ if k not in WARNED]
    warned = [k for k in differ if k in WARNED]
    if warned and not diff:
        log.warning("%s: %s", folder, "; ".join(f"{k}: index has {manifest.get(k)!r}, this run {settings.get(k)!r} "
                                                f"({WARNED[k]})" for k in warned))
    if diff:
        detail = "; ".join(f"{k}: index has {manifest.get(k)!r}, asked {settings.get(k)!r}" for k in diff)
        raise ConfigError(f"{folder} was built with other settings ({detail}); vectors of one index must come "
                          "from one model and prompt")


def classify(folder: Path, manifest: dict, entries: list[Entry], upto: int, source: str):
    """(known, changed, new) items of ``entries`` against the first ``upto`` partitions; ``changed`` holds
    (partition, row, Entry). An id that the index gives to another item is an error, never a skip."""
    by_id, by_origin = {}, {}
    for i in range(upto):
        for j, r in enumerate(read_rows(folder, manifest, i)):
            by_id[r["id"]] = (i, j, r)
            if (o := row_origin(r)) is not None:
                by_origin[o] = (i, j, r)
    known, changed, new, clashes = 0, [], [], []
    for e in entries:
        hit = by_origin.get(e.origin())  # None for a text: by_origin holds images only
        if hit is None and e.id in by_id:
            hit = by_id[e.id]
            if not same_item(hit[2], e) and e.problem is None:
                clashes.append((e, hit[2]))
                continue
        if hit is None:
            new.append(e)
            continue
        known += 1
        if e.problem is None and row_changed(hit[2], e):
            changed.append((hit[0], hit[1], e))
    if clashes:
        e, r = clashes[0]
        held = r.get("image") or (f"{r['tar'][0]}:{r['tar'][3]}" if r.get("tar") else
                                  f"a text of {r.get('source') or 'another source'}")
        raise ConfigError(f"{len(clashes)} item(s) of {source} have ids that {folder} gives to other items, e.g. "
                          f"{e.id!r}: the index holds {held}, the source has {e.label}; give them other ids")
    return known, changed, new


def plan(folder: Path, entries: list[Entry], settings: dict, *, add: bool, part_size: int, source: str,
         root: str | None = None):
    """(manifest, job, known, changed): the job to run (None when this build is already complete), how many items
    of the source the index already holds, and which of those changed (see :func:`classify`)."""
    if part_size < 1:
        raise ConfigError(f"--part-size must be at least 1, not {part_size}")
    manifest = read_index_manifest(folder)
    inputs = fingerprint(entries)
    kind = "add" if add else "build"
    if manifest is None:
        if add:
            raise ConfigError(f"{folder}: no index there (no manifest.json); create one with `e5v index build`")
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists and is not an e5v index; choose a new or empty --out folder")
        manifest = new_manifest(settings, root)
    check_settings(folder, manifest, settings)
    pending = manifest.get("job")
    if pending is not None:
        if (pending["kind"], pending["inputs"], pending["part_size"]) != (kind, inputs, part_size):
            raise ConfigError(f"{folder} holds an unfinished {pending['kind']} of {pending['source']} (part size "
                              f"{pending['part_size']}); rerun that command to finish it first")
        first = pending["first"]
    elif not add and manifest["partitions"]:
        if any(s["inputs"] == inputs for s in manifest["sources"]):
            return manifest, None, len(entries), []
        raise ConfigError(f"{folder} already holds an index of another source; add to it with "
                          f"`e5v index add {folder} SOURCE`, or build into a new --out folder")
    else:
        first = len(manifest["partitions"])
    known, changed = 0, []
    if add:
        known, changed, entries = classify(folder, manifest, entries, first, source)
    return manifest, IndexJob(kind, source, inputs, first, part_size, entries), known, changed


def part_done(folder: Path, job: IndexJob, j: int) -> dict | None:
    """The done marker of the job's partition ``j`` when that partition is finished."""
    path = done_path(folder, part_name(job.first + j))
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("job") == job.id else None


def _embed(model, items: list, prompt: str):
    """(vectors by item number, [(item number, reason)]). Should the engine raise for a whole batch, its items
    are embedded one at a time, so that an item it cannot take fails alone (skipped, with the reason)."""
    try:
        res = model.embed(items, prompt=prompt)
        return dict(zip(res.indices, res.vectors)), [(k, err.reason) for k, err in res.skipped]
    except Exception as exc:  # noqa: BLE001 - any failure while preparing one item is that item's failure
        if len(items) == 1:
            return {}, [(0, f"cannot be embedded ({type(exc).__name__}: {exc})")]
        log.warning("the engine failed on a batch of %d items (%s); embedding them one at a time", len(items), exc)
    vectors, skipped = {}, []
    for k, item in enumerate(items):
        one, bad = _embed(model, [item], prompt)
        if one:
            vectors[k] = one[0]
        skipped.extend((k, reason) for _, reason in bad)
    return vectors, skipped


def embed_part(model, entries: list[Entry], prompt: dict):
    """Vectors (input order) and rows of the items of one partition that embed, and the skipped ones."""
    vectors, skipped = {}, []
    for kind in ("image", "text"):
        pos, items = [], []
        for i, e in enumerate(entries):
            if e.kind != kind:
                continue
            if e.problem is not None:
                skipped.append((i, e.problem))
                continue
            try:
                items.append(e.item())
                pos.append(i)
            except OSError as exc:  # a tar shard that went away since it was listed
                skipped.append((i, f"cannot read the image from its shard ({exc.strerror or exc})"))
        if not items:
            continue
        done, bad = _embed(model, items, prompt[kind])
        for k, vec in done.items():
            vectors[pos[k]] = vec
        skipped.extend((pos[k], reason) for k, reason in bad)
    order = sorted(vectors)
    mat = np.stack([vectors[i] for i in order]) if order else np.zeros((0, model.dim), np.float32)
    reasons = [{"id": entries[i].id, "item": entries[i].label, "reason": r} for i, r in sorted(skipped)]
    return mat, [entries[i].row() for i in order], reasons


def write_part(folder: Path, job: IndexJob, j: int, vectors: np.ndarray, rows: list[dict], skipped: list[dict],
               precision: str) -> None:
    """Vectors, rows, then the done marker: a partition without its marker is redone."""
    name = part_name(job.first + j)
    facts = write_files(folder, name, vectors, rows, precision)
    marker = {"job": job.id, "count": len(rows), "items": len(job.part(j)), "counts": kind_counts(rows),
              "skipped": skipped, "ids": [e.id for e in job.part(j)], **facts}
    atomic_write_bytes(done_path(folder, name), json.dumps(marker).encode())


def write_files(folder: Path, stem: str, vectors: np.ndarray, rows: list[dict], precision: str) -> dict:
    """A partition's vectors and rows files (each atomically); their sizes and checksums."""
    stored = np.ascontiguousarray(vectors, dtype=PRECISIONS[precision])
    atomic_save(vectors_path(folder, stem), lambda tmp: np.save(tmp, stored))
    write_jsonl(rows_path(folder, stem), rows)
    return file_facts(folder, stem)


def kind_counts(rows: list[dict]) -> dict:
    return {"image": sum(r["kind"] == "image" for r in rows), "text": sum(r["kind"] == "text" for r in rows)}


def commit(folder: Path, manifest: dict, job: IndexJob) -> dict:
    """List the job's finished partitions that follow the committed ones, in order; close the job when all are."""
    changed = manifest.get("job") is None and job.nparts > 0 and len(manifest["partitions"]) == job.first
    if changed:
        manifest["job"] = job.record()
    k = len(manifest["partitions"])
    while k < job.first + job.nparts and (marker := part_done(folder, job, k - job.first)) is not None:
        name = part_name(k)
        if manifest["dim"] is None:
            manifest["dim"] = int(np.load(vectors_path(folder, name), mmap_mode="r").shape[1])
        manifest["partitions"].append({"name": name, "count": marker["count"], "items": marker["items"],
                                       "skipped": len(marker["skipped"]),
                                       **{f: marker[f] for f in ("counts", "bytes", "sha256") if f in marker}})
        manifest["count"] += marker["count"]
        manifest["skipped"] += len(marker["skipped"])
        for kind, n in marker["counts"].items():
            manifest["counts"][kind] += n
        k, changed = k + 1, True
    if k == job.first + job.nparts and (manifest.get("job") is not None or job.nparts == 0):
        manifest["job"] = None
        manifest["sources"].append({"kind": job.kind, "source": job.source, "inputs": job.inputs,
                                    "items": len(job.entries), "partitions": [job.first, k],
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_skipped(folder, manifest)
        changed = True
    if changed:
        write_manifest(folder, manifest)
    return manifest


def write_skipped(folder: Path, manifest: dict) -> None:
    """skipped.jsonl: every skipped item of every committed partition, with its reason."""
    rows = []
    for p in manifest["partitions"]:
        if p["skipped"]:
            marker = read_marker(folder, p["name"])
            if marker is None:
                log.warning("%s: the done marker of %s is unreadable; its skipped items are not listed", folder,
                            p["name"])
                continue
            rows.extend({**s, "partition": p["name"]} for s in marker["skipped"])
    write_jsonl(folder / "skipped.jsonl", rows)


def read_marker(folder: Path, name: str) -> dict | None:
    """A partition's done marker, or None when it is missing or unreadable."""
    try:
        marker = json.loads(done_path(folder, name).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("skipped"), list) else None


def job_skipped(folder: Path, job: IndexJob) -> list[dict]:
    return [s for j in range(job.nparts) for s in (part_done(folder, job, j) or {"skipped": []})["skipped"]]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "item"):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, file=sys.stderr, disable=not enabled, desc=desc)


def run_job(folder, entries: list[Entry], settings: dict, *, add: bool, part_size: int, source: str, load_model,
            progress: bool = True, ranks: Ranks | None = None, root: str | None = None,
            update: bool = False) -> Summary:
    """Build (``add=False``) or extend an index at ``folder`` with ``entries``; resumes an interrupted run of the
    same job. ``load_model()`` is called only when there is something to embed. Under several ranks, every rank
    calls this with the same arguments; rank 0 writes the manifest. ``root``: the folder a new index is built
    from. ``update`` (add): re-embed the known items whose source changed, on rank 0."""
    folder = Path(folder).resolve()
    ranks = ranks or Ranks()
    manifest, job, known, changed = plan(folder, entries, settings, add=add, part_size=part_size, source=source,
                                         root=root)
    if job is None:
        return Summary(manifest, items=len(entries), known=known, finished_before=True, rank=ranks.rank)
    todo = [j for j in range(job.nparts) if part_done(folder, job, j) is None]
    ranks.barrier()  # every rank has read the folder before rank 0 changes it
    if ranks.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = commit(folder, manifest, job)  # records the job (and closes an empty one)
    mine = todo[ranks.rank::ranks.world]
    summary = Summary(manifest, items=len(job.entries), known=known, resumed_parts=job.nparts - len(todo),
                      changed=changed, rank=ranks.rank)
    with contextlib.ExitStack() as stack:
        model = None
        if mine:
            model = stack.enter_context(load_model())
            started = time.perf_counter()
            bar = stack.enter_context(progress_bar(sum(len(job.part(j)) for j in mine), f"{job.kind} {folder.name}",
                                                   progress and ranks.rank == 0))
            for j in mine:
                vectors, rows, skipped = embed_part(model, job.part(j), settings["prompt"])
                write_part(folder, job, j, vectors, rows, skipped, settings["precision"])
                summary.embedded += len(rows)
                bar.update(len(job.part(j)))
                if ranks.rank == 0:
                    manifest = commit(folder, manifest, job)
            summary.seconds = time.perf_counter() - started
        ranks.barrier()  # every rank's partitions are written
        if ranks.rank == 0:
            manifest = commit(folder, manifest, job)
            if manifest.get("job") is not None:
                missing = [part_name(job.first + j) for j in range(job.nparts) if part_done(folder, job, j) is None]
                raise E5VError(f"{folder}: partitions {', '.join(missing[:5])} were not written; rerun to finish")
        summary.skipped = job_skipped(folder, job)
        if update and changed and ranks.rank == 0:
            model = model or stack.enter_context(load_model())
            manifest, skipped, summary.updated = update_items(folder, manifest, changed, model, settings["prompt"],
                                                              progress)
            summary.skipped += skipped
    summary.manifest = manifest
    return summary


def update_items(folder: Path, manifest: dict, changed: list, model, prompt: dict, progress: bool = True):
    """Re-embed changed items in place: each partition holding some is rewritten (see :func:`rewrite_partition`).
    Returns the manifest, the items that failed now (dropped from the index, with their reasons) and how many
    were re-embedded."""
    by_part: dict[int, dict[int, Entry]] = {}
    for i, j, e in changed:
        by_part.setdefault(i, {})[j] = e
    for i in sorted(by_part):  # the kept vectors are copied: damage would get fresh checksums and pass verify
        problems = partition_problems(folder, manifest, i, checksums=True)
        if problems:
            raise IndexDamagedError(f"{folder}: {part_name(i)} is damaged: {problems[0]}; {REPAIR_HINT}, then "
                                    "run the update again")
    skipped_all, updated = [], 0
    with progress_bar(len(changed), f"update {folder.name}", progress) as bar:
        for i, items in sorted(by_part.items()):
            rows = read_rows(folder, manifest, i)
            old = np.load(vectors_path(folder, part_file(manifest["partitions"][i])))
            order = sorted(items)
            vectors, new_rows, skipped = embed_part(model, [items[j] for j in order], prompt)
            fresh = dict(zip((r["id"] for r in new_rows), zip(vectors, new_rows)))
            keep_v, keep_r = [], []
            for j, (vec, row) in enumerate(zip(old, rows)):
                if j in items:
                    if items[j].id not in fresh:
                        continue  # it fails now: dropped, and reported
                    vec, row = fresh[items[j].id]
                    row = {**row, "id": rows[j]["id"]}  # an item found by its file keeps its id
                keep_v.append(np.asarray(vec, np.float32))
                keep_r.append(row)
            mat = np.stack(keep_v) if keep_v else np.zeros((0, manifest["dim"]), np.float32)
            manifest = rewrite_partition(folder, manifest, i, mat, keep_r, skipped)
            skipped_all += skipped
            updated += len(new_rows)
            bar.update(len(items))
    return manifest, skipped_all, updated


def rewrite_partition(folder: Path, manifest: dict, i: int, vectors: np.ndarray, rows: list[dict],
                      skipped: list[dict]) -> dict:
    """Replace partition ``i`` with ``vectors`` and ``rows``: new files under the next revision name, then one
    manifest write switches to them (totals recounted, the approximate index marked stale: its row numbers
    may no longer hold), then the old files go. A kill at any point leaves the old partition or the new one."""
    p = manifest["partitions"][i]
    stem = f"{p['name']}.r{revision(p) + 1}"
    facts = write_files(folder, stem, vectors, rows, manifest["precision"])
    marker = read_marker(folder, p["name"]) or {"job": None, "items": len(rows), "ids": [r["id"] for r in rows],
                                                 "skipped": []}
    failed = {s["id"] for s in skipped}
    marker.update(count=len(rows), counts=kind_counts(rows), **facts,
                  skipped=[s for s in marker["skipped"] if s["id"] not in failed] + skipped)
    atomic_write_bytes(done_path(folder, p["name"]), json.dumps(marker).encode())
    old_files = [vectors_path(folder, part_file(p)), rows_path(folder, part_file(p))]
    manifest["partitions"][i] = {**p, "file": stem, "count": len(rows), "counts": marker["counts"],
                                 "skipped": len(marker["skipped"]), **facts}
    for k, q in enumerate(manifest["partitions"]):
        if "counts" not in q:  # written before partitions recorded their counts
            q["counts"] = (read_marker(folder, q["name"]) or {}).get("counts") or \
                kind_counts(read_rows(folder, manifest, k))
    manifest["count"] = sum(q["count"] for q in manifest["partitions"])
    manifest["counts"] = {k: sum(q["counts"][k] for q in manifest["partitions"]) for k in ("image", "text")}
    manifest["skipped"] = sum(q["skipped"] for q in manifest["partitions"])
    if manifest.get("ann"):  # exact search until it is rebuilt (its row numbers may no longer hold)
        manifest["ann"] = {**manifest["ann"], "stale": True}
    write_manifest(folder, manifest)
    write_skipped(folder, manifest)
    for path in old_files:
        path.unlink(missing_ok=True)
    return manifest

