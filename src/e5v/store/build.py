"""Building an index and adding to it: partitions embedded one at a time (by one process, or shared among the
ranks of ``torchrun``), each written whole or not at all, committed to the manifest in input order.

A job (a build, or an add) is fixed by its source's content and the partition size; its fingerprint is kept in
the manifest until it is finished, so rerunning the same command after a kill resumes it and another command is
refused instead of mixing two jobs.  Partition ``j`` of a job always holds the same items, whoever embeds it, so
an index built by N processes equals one built by one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, E5VError
from ..parts import atomic_save, atomic_write_bytes
from .layout import FORMAT, VERSION, done_path, part_name, read_jsonl, read_manifest, rows_path, vectors_path
from .layout import write_jsonl, write_manifest
from .sources import Entry

log = logging.getLogger(__name__)

#: manifest fields that every job on an index must share (the vectors must live in one space)
SETTINGS = ("model", "adapter", "chat_format", "max_length", "anyres_max_tiles", "prompt", "dtype")
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Job:
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
    skipped: list[dict] = field(default_factory=list)  # skipped items of the whole job
    seconds: float = 0.0
    finished_before: bool = False  # the same build was already complete: nothing to do


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
        h.update(json.dumps(e.key(), ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def new_manifest(settings: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, **{k: settings.get(k) for k in SETTINGS}, "dim": None, "count": 0,
            "counts": {"image": 0, "text": 0}, "skipped": 0, "partitions": [], "sources": [], "job": None,
            "ann": None}


def check_settings(folder: Path, manifest: dict, settings: dict) -> None:
    diff = [k for k in SETTINGS if manifest.get(k) != settings.get(k)]
    if diff:
        detail = "; ".join(f"{k}: index has {manifest.get(k)!r}, asked {settings.get(k)!r}" for k in diff)
        raise ConfigError(f"{folder} was built with other settings ({detail}); vectors of one index must come "
                          "from one model and prompt")


def committed_ids(folder: Path, manifest: dict, upto: int) -> set[str]:
    return {r["id"] for p in manifest["partitions"][:upto] for r in read_jsonl(rows_path(folder, p["name"]))}


def plan(folder: Path, entries: list[Entry], settings: dict, *, add: bool, part_size: int, source: str):
    """(manifest, job, known): the job to run (None when this build is already complete), and how many items of
    the source the index already holds."""
    if part_size < 1:
        raise ConfigError(f"--part-size must be at least 1, not {part_size}")
    manifest = read_manifest(folder)
    inputs = fingerprint(entries)
    kind = "add" if add else "build"
    if manifest is None:
        if add:
            raise ConfigError(f"{folder}: no index there (no manifest.json); create one with `e5v index build`")
        if folder.exists() and any(folder.iterdir()):
            raise ConfigError(f"{folder} exists and is not an e5v index; choose a new or empty --out folder")
        manifest = new_manifest(settings)
    check_settings(folder, manifest, settings)
    pending = manifest.get("job")
    if pending is not None:
        if (pending["kind"], pending["inputs"], pending["part_size"]) != (kind, inputs, part_size):
            raise ConfigError(f"{folder} holds an unfinished {pending['kind']} of {pending['source']} (part size "
                              f"{pending['part_size']}); rerun that command to finish it first")
        first = pending["first"]
    elif not add and manifest["partitions"]:
        if any(s["inputs"] == inputs for s in manifest["sources"]):
            return manifest, None, len(entries)
        raise ConfigError(f"{folder} already holds an index of another source; add to it with "
                          f"`e5v index add {folder} SOURCE`, or build into a new --out folder")
    else:
        first = len(manifest["partitions"])
    known = 0
    if add:
        ids = committed_ids(folder, manifest, first)
        todo = [e for e in entries if e.id not in ids]
        known, entries = len(entries) - len(todo), todo
    return manifest, Job(kind, source, inputs, first, part_size, entries), known


def part_done(folder: Path, job: Job, j: int) -> dict | None:
    """The done marker of the job's partition ``j`` when that partition is finished."""
    path = done_path(folder, part_name(job.first + j))
    if not path.exists():
        return None
    marker = json.loads(path.read_text())
    return marker if marker.get("job") == job.id else None


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
        res = model.embed(items, prompt=prompt[kind])
        for k, vec in zip(res.indices, res.vectors):
            vectors[pos[k]] = vec
        skipped.extend((pos[k], err.reason) for k, err in res.skipped)
    order = sorted(vectors)
    mat = np.stack([vectors[i] for i in order]) if order else np.zeros((0, model.dim), np.float32)
    reasons = [{"id": entries[i].id, "item": entries[i].label, "reason": r} for i, r in sorted(skipped)]
    return mat, [entries[i].row() for i in order], reasons


def write_part(folder: Path, job: Job, j: int, vectors: np.ndarray, rows: list[dict], skipped: list[dict],
               dtype: str) -> None:
    """Vectors, rows, then the done marker: a partition without its marker is redone."""
    name = part_name(job.first + j)
    stored = np.ascontiguousarray(vectors, dtype=STORAGE_DTYPES[dtype])
    atomic_save(vectors_path(folder, name), lambda tmp: np.save(tmp, stored))
    write_jsonl(rows_path(folder, name), rows)
    counts = {"image": sum(r["kind"] == "image" for r in rows), "text": sum(r["kind"] == "text" for r in rows)}
    marker = {"job": job.id, "count": len(rows), "items": len(job.part(j)), "counts": counts, "skipped": skipped}
    atomic_write_bytes(done_path(folder, name), json.dumps(marker).encode())


def commit(folder: Path, manifest: dict, job: Job) -> dict:
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
                                       "skipped": len(marker["skipped"])})
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
            marker = json.loads(done_path(folder, p["name"]).read_text())
            rows.extend({**s, "partition": p["name"]} for s in marker["skipped"])
    write_jsonl(folder / "skipped.jsonl", rows)


def job_skipped(folder: Path, job: Job) -> list[dict]:
    return [s for j in range(job.nparts) for s in (part_done(folder, job, j) or {"skipped": []})["skipped"]]


def run_job(folder, entries: list[Entry], settings: dict, *, add: bool, part_size: int, source: str, load_model,
            progress: bool = True, ranks: Ranks | None = None) -> Summary:
    """Build (``add=False``) or extend an index at ``folder`` with ``entries``; resumes an interrupted run of the
    same job. ``load_model()`` is called only when there is something to embed. Under several ranks, every rank
    calls this with the same arguments; rank 0 writes the manifest."""
    folder = Path(folder).resolve()
    ranks = ranks or Ranks()
    manifest, job, known = plan(folder, entries, settings, add=add, part_size=part_size, source=source)
    if job is None:
        return Summary(manifest, items=len(entries), known=known, finished_before=True)
    todo = [j for j in range(job.nparts) if part_done(folder, job, j) is None]
    ranks.barrier()  # every rank has read the folder before rank 0 changes it
    if ranks.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        manifest = commit(folder, manifest, job)  # records the job (and closes an empty one)
    mine = todo[ranks.rank::ranks.world]
    summary = Summary(manifest, items=len(job.entries), known=known, resumed_parts=job.nparts - len(todo))
    if mine:
        model = load_model()
        started = time.perf_counter()
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(job.part(j)) for j in mine), unit="item", dynamic_ncols=True, file=sys.stderr,
                   disable=not progress or ranks.rank != 0, desc=f"{job.kind} {folder.name}")
        with model, bar:
            for j in mine:
                vectors, rows, skipped = embed_part(model, job.part(j), settings["prompt"])
                write_part(folder, job, j, vectors, rows, skipped, settings["dtype"])
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
    summary.manifest = manifest
    summary.skipped = job_skipped(folder, job)
    return summary

