"""Training data of the E5-V recipe: (anchor, positive, hard negative) triplets, their prompts and batches.

Readers: the SimCSE NLI CSV (``sent0,sent1,hard_neg``, the official training file), JSONL and parquet with the
same fields. ``hard_neg`` may be missing or empty: such a pair adds no hard negative to the batch. A row with
an empty anchor or positive is skipped with a warning that names it; the others are kept.

How the sentences become prompts and batches: :mod:`e5v.train.embed` (the engine's code) and
:mod:`e5v.train.official` (``official_quirks``).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..readers import read_jsonl, read_lines

log = logging.getLogger(__name__)

FIELDS = ("sent0", "sent1", "hard_neg")


@dataclass(frozen=True)
class Triplet:
    anchor: str
    positive: str
    negative: str | None = None


def _row_to_triplet(row: dict, where: str) -> Triplet | None:
    vals = []
    for key in FIELDS:
        v = row.get(key)
        if v is not None and not isinstance(v, str):
            log.warning("skipped %s: field %r must be a string, got %s", where, key, type(v).__name__)
            return None
        vals.append(v if v is None or v.strip() else None)
    if vals[0] is None or vals[1] is None:
        missing = FIELDS[0] if vals[0] is None else FIELDS[1]
        log.warning("skipped %s: empty or missing %r", where, missing)
        return None
    return Triplet(*vals)


def read_triplets(path) -> list[Triplet]:
    """Triplets from ``.csv`` (header with sent0, sent1 and optionally hard_neg), ``.jsonl`` or ``.parquet``."""
    p = os.fsdecode(path)
    low = p.lower()
    rows: list[tuple[dict, str]] = []
    if low.endswith(".csv"):
        reader = csv.DictReader(io.StringIO("\n".join(read_lines(p)) + "\n", newline=""))
        cols = reader.fieldnames or []
        if "sent0" not in cols or "sent1" not in cols:
            raise InputError(p, f"CSV header needs sent0 and sent1 columns (and optionally hard_neg), has {cols}")
        rows = [(row, f"{p}:line {reader.line_num}") for row in reader]
    elif low.endswith(".jsonl"):
        rows = [(obj, where) for _, obj, where in read_jsonl(p)]
    elif low.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except FileNotFoundError:
            raise InputError(p, "file not found") from None
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise InputError(p, f"cannot read parquet ({exc})") from None
        if "sent0" not in table.column_names or "sent1" not in table.column_names:
            raise InputError(p, f"parquet needs sent0 and sent1 columns, has {table.column_names}")
        rows = [(r, f"{p}:row {i}") for i, r in enumerate(table.to_pylist())]
    else:
        raise InputError(p, "training data must be .csv, .jsonl or .parquet")
    out = [t for t in (_row_to_triplet(r, w) for r, w in rows) if t is not None]
    if not out:
        raise InputError(p, "no usable triplet (every row lacks sent0 or sent1)")
    if len(out) < len(rows):
        log.warning("%s: %d of %d rows skipped", p, len(rows) - len(out), len(rows))
    log.info("%s: %d pairs, %d with a hard negative", p, len(out), sum(t.negative is not None for t in out))
    return out


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Row indices of global batch ``step`` (0-based): a fresh seeded shuffle each epoch, the last batch of an
    epoch may be short. A function of (step, seed) alone, so a resumed run sees exactly the same batches."""
    per = steps_per_epoch(n, batch_size)
    epoch, k = divmod(step, per)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[k * batch_size:(k + 1) * batch_size].tolist()


def shard(rows: list, rank: int, world: int) -> list:
    """Contiguous slice of the global batch for ``rank`` (sizes differ by at most one)."""
    q, r = divmod(len(rows), world)
    lo = rank * q + min(rank, r)
    return rows[lo: lo + q + (rank < r)]
