"""Training data of the E5-V recipe: (anchor, positive, hard negative) triplets, their prompts and batches.

Readers: the SimCSE NLI CSV (``sent0,sent1,hard_neg``, the official training file), JSONL and parquet with the
same fields. ``hard_neg`` may be missing or empty: such a pair adds no hard negative to the batch. A row with
an empty anchor or positive is skipped with a warning that names it; the others are kept.

Prompts: each sentence is cut to ``cutoff_len`` tokens (tokenised without special tokens, cut, decoded back:
what the official code does), then put in the text prompt inside the chat format with its real special
tokens, exactly as inference renders it (BOS added by the tokenizer, no EOS). ``official_quirks=True``
instead rebuilds the released training code's string: underscores replaced by spaces across the whole
chat-wrapped template (so ``<|start_header_id|>`` becomes the plain text ``<|start header id|>``) and the
result stripped; and its collator attends to the padding (see :func:`collate`).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass

import torch

from .. import prompts
from ..errors import ConfigError, InputError
from ..inputs import _read_jsonl, _read_lines

log = logging.getLogger(__name__)

FIELDS = ("sent0", "sent1", "hard_neg")
#: The inner template of the official ``run.sh`` after its ``_`` -> space replacement (no trailing space).
OFFICIAL_TRAIN_PROMPT = "<sent>\nSummary above sentence in one word:"


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
        reader = csv.DictReader(io.StringIO("\n".join(_read_lines(p)) + "\n", newline=""))
        cols = reader.fieldnames or []
        if "sent0" not in cols or "sent1" not in cols:
            raise InputError(p, f"CSV header needs sent0 and sent1 columns (and optionally hard_neg), has {cols}")
        rows = [(row, f"{p}:line {reader.line_num}") for row in reader]
    elif low.endswith(".jsonl"):
        rows = [(obj, where) for _, obj, where in _read_jsonl(p)]
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


class PromptBuilder:
    """Sentence -> token ids of the full training prompt."""

    def __init__(self, tokenizer, chat_format: str, prompt: str | None = None, *, cutoff_len: int = 32,
                 official_quirks: bool = False):
        self.tokenizer = tokenizer
        self.cutoff_len = int(cutoff_len)
        self.official_quirks = official_quirks
        inner = prompt or (OFFICIAL_TRAIN_PROMPT if official_quirks else prompts.TEXT)
        if prompts.SENT not in inner:
            raise ConfigError(f"the training prompt must contain {prompts.SENT}: {inner!r}")
        template = prompts.CHAT_FORMATS[chat_format].format(inner)
        if official_quirks:  # ft_llm.py: generate_sentemb_prompt does template.replace('_', ' ') ... .strip()
            template = template.replace("_", " ").strip()
        self.template = template

    def cut(self, sentence: str) -> str:
        ids = self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[: self.cutoff_len]) if len(ids) > self.cutoff_len else sentence

    def text(self, sentence: str) -> str:
        return prompts.fill(self.template, self.cut(sentence))

    def __call__(self, sentences: list[str]) -> list[list[int]]:
        if not sentences:  # e.g. the hard negatives of a batch of pairs only (tokenizers fail on an empty list)
            return []
        return self.tokenizer([self.text(s) for s in sentences])["input_ids"]


def collate(seqs: list[list[int]], pad_id: int, *, official_quirks: bool = False) -> dict[str, torch.Tensor]:
    """Left-pad to the longest sequence. With ``official_quirks`` the released code's collator: padded to a
    multiple of 8 and the attention mask rebuilt as ``input_ids > 0``, which attends to the padding (the pad id
    is the EOS id there, not 0) and masks real tokens of id 0."""
    width = max(len(s) for s in seqs)
    if official_quirks:
        width = 8 * math.ceil(width / 8)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    if official_quirks:
        mask = (ids > 0).long()
    return {"input_ids": ids, "attention_mask": mask}


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
