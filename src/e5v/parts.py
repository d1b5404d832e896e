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

from .errors import ConfigError, E5VError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: mkstemp creates files 0600; finished outputs get the usual permissions (0666 less the umask) instead.
FILE_MODE = 0o666 & ~_umask()


def atomic_save(path: Path, writer) -> None:
    """Call ``writer(tmp_path)`` on a temporary file beside ``path`` (same suffix), sync it to disk and
    rename it onto ``path``: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))


class PartStore:
    """Numbered parts under one folder, tied to a job fingerprint."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        job = self.folder / "job.json"
        old = json.loads(job.read_text()) if job.exists() else None
        if old is not None and old != fingerprint and any(self.folder.glob("part-*.npz")):
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise ConfigError(f"{self.folder} holds a partial job with other settings ({', '.join(diff)}); "
                              "delete it or rerun with the same settings to resume")
        if old != fingerprint:  # a new job, or a leftover without any finished part (say the model failed to load)
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
        try:
            with np.load(self.path(k), allow_pickle=False) as z:
                return {name: z[name] for name in z.files}
        except Exception as e:  # a damaged file (disk fault, hand edit): np.load raises many kinds
            raise E5VError(f"{self.path(k)} is damaged ({type(e).__name__}: {e}); delete it and rerun the same "
                           "command to redo that part") from e
