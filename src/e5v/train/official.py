"""``official_quirks``: the released training code's step (its training and launch scripts), quirks included.

The only place where training embeds differently from the engine (:mod:`e5v.train.embed`). What it reproduces:

- **prompt**: the chat-wrapped template with every ``_`` replaced by a space (``<|start_header_id|>`` becomes the
  plain text ``<|start header id|>``), the sentence put in, the whole string stripped; BOS added, no EOS;
- **decode round trip**: every sentence is tokenised (no special tokens), cut to ``cutoff_len`` tokens, decoded
  and cleaned up as transformers 4.41.2 did for the Llama-3 tokenizer (``clean_up_tokenization_spaces=True``:
  no space before ``. , ? !`` and inside ``n't 's 'm 've 're``; current transformers skips it for BPE);
- **three paddings** (pad token = EOS, left side): anchors and hard negatives padded to their field's longest
  rounded up to a multiple of 8 with the pad token, positives with -100 which becomes token 0; then all three
  fields to the common width with the pad token; attention mask ``input_ids > 0``: the pad token is attended,
  token 0 (the positives' own padding, and any real token of id 0) is masked;
- **layout**: since padding is attended, a vector depends on the sentences padded with it. The released run
  padded one group per GPU: ``batch_size / official_world_size`` triplets (24 of 768 on 32 GPUs) in sampler
  order, all three fields in one forward pass. Here the global batch is cut into those groups in e5v's sampler
  order, whatever ``micro_batch_size`` and the process count: processes take whole groups, and one group is one
  GradCache chunk. (At the end of an epoch the released sampler refilled a short batch with rows from the start;
  e5v's last batch is short and its last group smaller.)

The gradient is e5v's: summed over processes (exact). DeepSpeed averaged it over the GPUs before clipping and
Adam; for the same update clip at ``world x 1.0`` and use Adam eps ``world x 1e-8`` (configs/train/e5v.yaml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import prompts
from ..errors import ConfigError
from .data import Triplet, shard
from .embed import last_token_encoder

#: The inner template of the official launch script after its ``_`` -> space replacement (no trailing space).
OFFICIAL_TRAIN_PROMPT = "<sent>\nSummary above sentence in one word:"

#: transformers 4.41.2's ``clean_up_tokenization``, applied in this order on decoding.
CLEAN_UP_4_41 = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_4_41(text: str) -> str:
    for old, new in CLEAN_UP_4_41:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class QuirkSeq:
    """One tokenised sentence of a padded group: its field (0 anchor, 1 positive, 2 hard negative)."""

    field: int
    ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)


class OfficialQuirks:
    """Sentences, groups and padded batches as the released training code makes them (module docstring)."""

    def __init__(self, backbone, *, prompt: str = "", cutoff_len: int = 32, group_size: int = 24):
        self.backbone, self.tokenizer = backbone, backbone.tokenizer
        inner = prompt or OFFICIAL_TRAIN_PROMPT
        if prompts.SENT not in inner:
            raise ConfigError(f"the training prompt must contain {prompts.SENT}: {inner!r}")
        # the official training script: llama3_template.format(TEMPLATE), then generate_sentemb_prompt's
        # template.replace('_', ' ')
        if backbone.chat_format not in prompts.CHAT_FORMATS:
            raise ConfigError(f"official_quirks reproduces E5-V's own chat formats "
                              f"({', '.join(prompts.CHAT_FORMATS)}), not {backbone.chat_format!r}: train this "
                              "backbone without official_quirks")
        self.template = prompts.CHAT_FORMATS[backbone.chat_format].format(inner).replace("_", " ")
        self.cutoff_len = int(cutoff_len)
        self.group_size = max(1, int(group_size))
        self.pad_id = self.tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("official_quirks pads with the EOS token, and this tokenizer has none")

    def text(self, sentence: str) -> str:
        ids = self.tokenizer(sentence, add_special_tokens=False)["input_ids"][: self.cutoff_len]
        cut = clean_up_4_41(self.tokenizer.decode(ids, clean_up_tokenization_spaces=False))
        return prompts.fill(self.template, cut).strip()

    def tokens(self, field: int, sentences: list[str]) -> list[QuirkSeq]:
        if not sentences:
            return []
        ids = self.tokenizer([self.text(s) for s in sentences])["input_ids"]
        return [QuirkSeq(field, tuple(x)) for x in ids]

    def groups(self, rows: list[Triplet]) -> list[list[Triplet]]:
        return [rows[i: i + self.group_size] for i in range(0, len(rows), self.group_size)]

    def shard(self, rows: list[Triplet], rank: int, size: int) -> list[Triplet]:
        """Whole groups per process (only the batch's last group may be short, and it stays last)."""
        return [t for g in shard(self.groups(rows), rank, size) for t in g]

    def inputs(self, rows: list[Triplet]):
        """(anchors, positives, hard negatives, chunk plan): one chunk per group, all its sequences together."""
        fields: list[list[QuirkSeq]] = [[], [], []]
        members: list[list[tuple[int, int]]] = []
        for group in self.groups(rows):
            mine = []
            for f, sentences in enumerate(([t.anchor for t in group], [t.positive for t in group],
                                           [t.negative for t in group if t.negative is not None])):
                seqs = self.tokens(f, sentences)
                mine += [(f, len(fields[f]) + k) for k in range(len(seqs))]
                fields[f] += seqs
            members.append(mine)
        offset = (0, len(fields[0]), len(fields[0]) + len(fields[1]))
        plan = [[offset[f] + k for f, k in mine] for mine in members]
        return fields[0], fields[1], fields[2], plan

    def collate(self, seqs: list[QuirkSeq]) -> dict[str, torch.Tensor]:
        """The released collator and ``compute_loss`` on one group (the three paddings of the module docstring)."""
        widths = {}
        for f in (0, 1, 2):
            lengths = [len(s) for s in seqs if s.field == f]
            if lengths:
                widths[f] = 8 * math.ceil(max(lengths) / 8)
        width = max(widths.values())
        rows = []
        for s in seqs:
            own = 0 if s.field == 1 else self.pad_id  # positives: -100 -> 0 up to their field's width
            inner = widths[s.field] - len(s)
            rows.append([self.pad_id] * (width - widths[s.field]) + [own] * inner + list(s.ids))
        ids = torch.tensor(rows, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}

    def encoder(self, runner, device: torch.device, autocast=None):
        """One group's sequences -> last-position final hidden states (fp32), through ``runner`` (the LoRA LM)."""
        return last_token_encoder(self.backbone, self.collate, runner, device, autocast)
