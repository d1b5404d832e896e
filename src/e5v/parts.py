"""Resumable, atomic partitioned output for long jobs.

A job's work is cut into numbered parts; each finished part is one ``.npz`` written to a temporary name and
renamed into place, so a kill at any moment leaves either a whole part or none.  A ``job.json`` fingerprint
(model, prompt, inputs, part size) guards against resuming with different settings.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConfigError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PartStore:
    """Numbered parts under one folder, tied to a job fingerprint."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        job = self.folder / "job.json"
        if job.exists():
            old = json.loads(job.read_text())
            if old != fingerprint:
                diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise ConfigError(f"{self.folder} holds a partial job with other settings ({', '.join(diff)}); "
                                  "delete it or rerun with the same settings to resume")
        else:
            atomic_write_bytes(job, json.dumps(fingerprint, sort_keys=True).encode())

    def path(self, k: int) -> Path:
        return self.folder / f"part-{k:06d}.npz"

    def done(self, k: int) -> bool:
        return self.path(k).exists()

    def write(self, k: int, **arrays) -> None:
        def save(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

        atomic_save(self.path(k), save)

    def read(self, k: int) -> dict[str, np.ndarray]:
        with np.load(self.path(k), allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
