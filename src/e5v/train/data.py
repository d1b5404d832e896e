"""Training data of the E5-V recipe: (anchor, positive, hard negative) triplets, their prompts and batches.

Readers: the SimCSE NLI CSV (``sent0,sent1,hard_neg``, the official training file), JSONL and parquet with the
same fields. ``hard_neg`` may be missing or empty: such a pair adds no hard negative to the batch. A row with
an empty anchor or positive is skipped with a warning that names it; the others are kept.

Sides with images: JSONL records ``{"query": {...}, "positive": {...}, "negative": {...}}`` (``negative``
optional), each side a ``text``, an ``image`` (a path, relative to the data file's folder or to ``image_root``) or
both, and an optional ``prompt`` of its own (other keys are ignored with a warning); or the MMEB-train columns
(``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``, ``neg_image_path``; jsonl, parquet or
csv), whose image-with-text sides are an image with its instruction (:data:`MMEB_PROMPT`). A text-only side without
a prompt of its own is a plain string, as in the NLI files.

Several files (``data="a.csv,b.jsonl"``) are sources of a :class:`Sampler`: per batch, rows of each source in a
ratio, or a whole batch from one source (``single_source_batches``).

How the sides become prompts and batches: :mod:`e5v.train.embed` (the engine's code) and
:mod:`e5v.train.official` (``official_quirks``, text only).
"""
from __future__ import annotations

import bisect
import csv
import io
import itertools
import logging
import math
import os
from dataclasses import dataclass

import torch

from .. import prompts
from ..errors import ConfigError, InputError
from ..prepare import check_prompt
from ..readers import read_jsonl, read_lines

log = logging.getLogger(__name__)

FIELDS = ("sent0", "sent1", "hard_neg")
SIDES = ("query", "positive", "negative")
#: MMEB-train (VLM2Vec) columns per side: (text, image path); its texts mark the image with ``<|image_1|>``.
MMEB = (("qry", "qry_image_path"), ("pos_text", "pos_image_path"), ("neg_text", "neg_image_path"))
MMEB_IMAGE_MARK = "<|image_1|>"
#: The prompt of an MMEB side with an image and a text: the text is the side's instruction ("Represent the given
#: image with the following question: ..."), put after the image in E5-V's image prompt.
MMEB_PROMPT = "<image>\n<sent>\nSummary above image in one word: "
#: The keys of a JSONL side object.
SIDE_KEYS = ("text", "image", "prompt")


@dataclass(frozen=True)
class Side:
    """One side of a training row that is not a plain text: an image, an image with text, or a text with its own
    prompt (the full inner prompt, with ``<image>`` and/or ``<sent>``; None: the default prompt of its kind)."""

    text: str | None = None
    image: str | None = None
    prompt: str | None = None
    name: str = "side"


@dataclass(frozen=True)
class Triplet:
    anchor: str | Side
    positive: str | Side
    negative: str | Side | None = None


def default_prompt(side: Side, text_prompt: str) -> str:
    """The prompt E5-V embeds such a side with at inference: composed, image or the run's text prompt."""
    if side.prompt is not None:
        return side.prompt
    if side.image is not None:
        return prompts.CIRR_QUERY if side.text is not None else prompts.IMAGE_PROMPT
    return text_prompt


def _side(text, image, prompt, where: str, folder: str) -> str | Side | None:
    """A side from its fields (None: the side is absent); InputError when a field is not usable."""
    for key, v in (("text", text), ("image", image), ("prompt", prompt)):
        if v is not None and not isinstance(v, str):
            raise InputError(where, f"{key} must be a string, got {type(v).__name__}")
    text = text if text is not None and text.strip() else None
    image = image if image else None
    if text is None and image is None:
        if prompt is not None:
            raise InputError(where, "a prompt but neither text nor image")
        return None
    if prompt is not None:
        try:
            check_prompt(prompt)
        except ConfigError as err:
            raise InputError(where, str(err)) from None
        for mark, present, what in ((prompts.SENT, text is not None, "text"),
                                    (prompts.IMAGE, image is not None, "image")):
            if (mark in prompt) != present:
                raise InputError(where, f"the prompt {'lacks' if present else 'has'} {mark} but the side "
                                        f"{'has' if present else 'has no'} {what}")
    if image is None and prompt is None:
        return text
    return Side(text, os.path.join(folder, image) if image is not None else None, prompt,
                f"{where} ({image})" if image is not None else where)


def _row_to_triplet(row: dict, where: str, folder: str, unknown: dict) -> Triplet | None:
    """``unknown``: side keys that are not :data:`SIDE_KEYS` -> (count, first place), filled for one warning each."""
    try:
        if any(k in row for k in SIDES):
            sides = []
            for key in SIDES:
                obj = row.get(key)
                if obj is not None and not isinstance(obj, dict):
                    raise InputError(f"{where} {key}", f"expected an object with text/image, got {type(obj).__name__}")
                obj = obj or {}
                for k in obj.keys() - set(SIDE_KEYS):
                    count, first = unknown.get(k, (0, f"{where} {key}"))
                    unknown[k] = (count + 1, first)
                sides.append(_side(obj.get("text"), obj.get("image"), obj.get("prompt"), f"{where} {key}", folder))
            keys = SIDES
        elif any(k in row for k in MMEB[0]):
            sides = []
            for key, (tk, ik) in zip(SIDES, MMEB):
                text, image = row.get(tk), row.get(ik)
                if isinstance(text, str):
                    text = text.replace(MMEB_IMAGE_MARK, "").strip()
                both = isinstance(text, str) and text and isinstance(image, str) and image
                sides.append(_side(text, image, MMEB_PROMPT if both else None, f"{where} {key}", folder))
            keys = tuple("/".join(c) for c in MMEB[:2])
        else:
            sides = []
            for key in FIELDS:
                v = row.get(key)
                if v is not None and not isinstance(v, str):
                    raise InputError(where, f"field {key!r} must be a string, got {type(v).__name__}")
                sides.append(v if v is None or v.strip() else None)
            keys = FIELDS
    except InputError as err:
        log.warning("skipped %s", err)
        return None
    if sides[0] is None or sides[1] is None:
        log.warning("skipped %s: empty or missing %r", where, keys[0] if sides[0] is None else keys[1])
        return None
    return Triplet(*sides)


def read_triplets(path, image_root: str = "") -> list[Triplet]:
    """Triplets from ``.csv`` (header with sent0, sent1 and optionally hard_neg), ``.jsonl`` or ``.parquet``; or
    records with image sides (module docstring). Relative image paths are relative to ``image_root``, by default
    the data file's folder."""
    p = os.fsdecode(path)
    low = p.lower()
    folder = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(p))
    rows: list[tuple[dict, str]] = []
    wanted = "sent0 and sent1 (or the MMEB columns qry, pos_text, pos_image_path ...)"

    def usable(cols) -> bool:
        return ("sent0" in cols and "sent1" in cols) or any(c in cols for c in MMEB[0])

    if low.endswith(".csv"):
        reader = csv.DictReader(io.StringIO("\n".join(read_lines(p)) + "\n", newline=""))
        cols = reader.fieldnames or []
        if not usable(cols):
            raise InputError(p, f"CSV header needs {wanted} columns (and optionally hard_neg), has {cols}")
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
        if not usable(table.column_names):
            raise InputError(p, f"parquet needs {wanted} columns, has {table.column_names}")
        rows = [(r, f"{p}:row {i}") for i, r in enumerate(table.to_pylist())]
    else:
        raise InputError(p, "training data must be .csv, .jsonl or .parquet")
    unknown: dict[str, tuple[int, str]] = {}
    out = [t for t in (_row_to_triplet(r, w, folder, unknown) for r, w in rows) if t is not None]
    for key, (count, first) in sorted(unknown.items()):
        log.warning("%s: %d side(s) have the unknown key %r, ignored (first: %s); a side's keys are %s", p, count,
                    key, first, ", ".join(SIDE_KEYS))
    if not out:
        raise InputError(p, "no usable triplet (every row lacks an anchor or a positive)")
    if len(out) < len(rows):
        log.warning("%s: %d of %d rows skipped", p, len(rows) - len(out), len(rows))
    images = sum(isinstance(s, Side) and s.image is not None for t in out for s in (t.anchor, t.positive, t.negative))
    log.info("%s: %d pairs, %d with a hard negative%s", p, len(out), sum(t.negative is not None for t in out),
             f", {images} image sides" if images else "")
    return out


def data_files(data: str) -> list[str]:
    """The files of the ``data`` setting: one path, or several separated by commas."""
    if os.path.exists(data):
        return [data]
    return [f.strip() for f in data.split(",") if f.strip()]


def has_images(rows: list[Triplet]) -> bool:
    return any(isinstance(s, Side) and s.image is not None for t in rows for s in (t.anchor, t.positive, t.negative))


def first_side(rows: list[Triplet]) -> Side | None:
    """The first side that is not a plain text (an image, or a side with its own prompt), if any."""
    return next((s for t in rows for s in (t.anchor, t.positive, t.negative) if isinstance(s, Side)), None)


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


def parse_weights(text: str, sources: int) -> list[float] | None:
    """``data_weights`` ("0.7,0.3"): one non-negative number per data file; empty: None (by size)."""
    if not text.strip():
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"data_weights must be numbers separated by commas, got {text!r}") from None
    if len(weights) != sources:
        raise ConfigError(f"data_weights has {len(weights)} numbers for {sources} data file(s)")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data_weights must be non-negative with a positive sum, got {text!r}")
    return weights


def allocate(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; ties to the earlier source)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


class Sampler:
    """The rows of global batch ``step``, as indices into the sources laid end to end; a function of
    (seed, step) alone, so a resumed run sees exactly the same batches.

    One source: :func:`batch_indices` (epochs of one seeded shuffle each; the last batch may be short). Several:
    each source is an endless stream of seeded shuffles, read in order; a batch takes from each source its share
    of ``batch_size`` (``weights``, default: the sources' sizes), shuffled together; with ``single_source`` a
    whole batch comes from one source, drawn per step with probability ``weights``. An epoch is as many rows as
    all the sources hold."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int, weights: list[float] | None = None,
                 single_source: bool = False):
        self.sizes, self.batch_size, self.seed = list(sizes), int(batch_size), int(seed)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.weights = list(weights) if weights is not None else [float(n) for n in self.sizes]
        self.single_source = single_source
        self.counts = allocate(self.batch_size, self.weights)
        self._choices: list[int] = []  # single_source: the source of each step so far
        self._starts: list[int] = []  # ... and where that step starts in its source's stream
        self._used = [0] * len(self.sizes)

    @property
    def per_epoch(self) -> int:
        return steps_per_epoch(sum(self.sizes), self.batch_size)

    def _stream(self, source: int, start: int, count: int) -> list[int]:
        n, out = self.sizes[source], []
        pos = start
        while len(out) < count:
            epoch, k = divmod(pos, n)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + source)
            order = torch.randperm(n, generator=g)[k: k + count - len(out)].tolist()
            out += [self.offsets[source] + i for i in order]
            pos += len(order)
        return out

    def _choose(self, step: int) -> tuple[int, int]:
        """(source, start in its stream) of ``step`` with ``single_source``: each step's draw is seeded by
        (seed, step); the start counts the earlier steps that drew the same source."""
        cum = list(itertools.accumulate(self.weights))
        while len(self._choices) <= step:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._choices))
            u = float(torch.rand(1, generator=g)) * cum[-1]
            s = min(bisect.bisect_right(cum, u), len(cum) - 1)
            while self.weights[s] <= 0:  # float edge: never a source of weight 0
                s -= 1
            self._starts.append(self._used[s] * self.batch_size)
            self._choices.append(s)
            self._used[s] += 1
        return self._choices[step], self._starts[step]

    def source_of(self, step: int) -> int | None:
        """The source of step ``step`` with ``single_source`` (None otherwise)."""
        return self._choose(step)[0] if self.single_source and len(self.sizes) > 1 else None

    def indices(self, step: int) -> list[int]:
        if len(self.sizes) == 1:
            return batch_indices(self.sizes[0], self.batch_size, step, self.seed)
        if self.single_source:
            source, start = self._choose(step)
            return self._stream(source, start, self.batch_size)
        rows = [i for s, c in enumerate(self.counts) for i in self._stream(s, step * c, c)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 500_009 * (step + 1))
        return [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]


def shard(rows: list, rank: int, world: int) -> list:
    """Contiguous slice of the global batch for ``rank`` (sizes differ by at most one)."""
    q, r = divmod(len(rows), world)
    lo = rank * q + min(rank, r)
    return rows[lo: lo + q + (rank < r)]
