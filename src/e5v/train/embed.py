"""What a training step embeds, and how: the inference engine's own code.

Each sentence is cut to ``cutoff_len`` tokens (tokenised without special tokens, cut, decoded back; only when it
is longer), then prepared by the engine's :class:`~e5v.prepare.Preparer` (the backbone's chat format, rendering
and tokenisation), collated by the backbone (left padding, masked), run through :meth:`Backbone.forward` with the
LoRA-wrapped language model, and pooled by the engine's :func:`~e5v.batching.pool_last`. So the trained model is
used at inference exactly as it was trained (tests: training's vectors equal ``E5V.encode_text``'s).

The one other way, ``official_quirks``, lives apart in :mod:`e5v.train.official`. Both modes offer the same
three calls to the trainer: :meth:`shard` (this process's rows), :meth:`inputs` (anchors, positives, negatives and
the GradCache chunk plan) and :meth:`encoder` (chunk of items -> last-token states).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .. import batching, prompts
from ..errors import ConfigError
from ..items import Item
from ..prepare import Preparer
from .data import Triplet, shard


def autocast_context(device: torch.device, dtype):
    """Mixed precision: the base LM is stored in ``dtype``; LoRA weights stay fp32 (peft) under autocast."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class EngineSentences:
    """The default mode: the engine's preparation, collation, forward and pooling (see the module docstring)."""

    def __init__(self, backbone, *, prompt: str = "", cutoff_len: int = 32, max_length: int):
        self.backbone = backbone
        self.prompt = prompt or prompts.TEXT
        if prompts.SENT not in self.prompt:
            raise ConfigError(f"the training prompt must contain {prompts.SENT}: {self.prompt!r}")
        self.cutoff_len = int(cutoff_len)
        self.preparer = Preparer(backbone, max_length, {})

    def cut(self, sentence: str) -> str:
        tok = self.backbone.tokenizer
        ids = tok(sentence, add_special_tokens=False)["input_ids"]
        return tok.decode(ids[: self.cutoff_len]) if len(ids) > self.cutoff_len else sentence

    def prepare(self, sentences: list[str]) -> list:
        return [self.preparer.prepare(Item(text=self.cut(s), name=f"training sentence {s[:60]!r}"),
                                      self.prompt) for s in sentences]

    def shard(self, rows: list[Triplet], rank: int, size: int) -> list[Triplet]:
        return shard(rows, rank, size)

    def inputs(self, rows: list[Triplet]):
        """(anchors, positives, hard negatives, chunk plan): None lets GradCache plan the chunks."""
        return (self.prepare([t.anchor for t in rows]), self.prepare([t.positive for t in rows]),
                self.prepare([t.negative for t in rows if t.negative is not None]), None)

    def encoder(self, runner, device: torch.device, autocast=None):
        """Features of one chunk -> last-token final hidden states (fp32), through ``runner`` (the LoRA LM)."""
        return last_token_encoder(self.backbone, self.backbone.collate, runner, device, autocast)


def last_token_encoder(backbone, collate, runner, device: torch.device, autocast=None):
    """Chunk -> ``collate`` -> ``runner`` (the LoRA LM, through :meth:`Backbone.forward`) -> the engine's pooling:
    last-token final hidden states (fp32). Both modes' encoder; they differ only in ``collate``."""

    def encode(chunk) -> torch.Tensor:
        batch = batching.to_device(collate(chunk), device)
        with autocast_context(device, autocast):
            hidden = backbone.forward(batch, language_model=runner)
        return batching.pool_last(hidden).float()

    return encode


def make_sentences(cfg, backbone, max_length: int):
    """The mode the settings ask for: the engine's (default) or the released code's (``official_quirks``)."""
    if cfg.official_quirks:
        from .official import OfficialQuirks

        return OfficialQuirks(backbone, prompt=cfg.prompt, cutoff_len=cfg.cutoff_len,
                              group_size=-(-cfg.batch_size // cfg.official_world_size))
    return EngineSentences(backbone, prompt=cfg.prompt, cutoff_len=cfg.cutoff_len, max_length=max_length)
