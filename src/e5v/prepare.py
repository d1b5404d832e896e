"""Preparation: one item becomes the backbone's :class:`~e5v.backbones.Features` (validated, decoded, the prompt
rendered in the chat format, tokenised, the image preprocessed; a text too long for the model is truncated).

A :class:`Preparer` holds what this needs and nothing more, so that the engine's worker processes get a copy
(:mod:`e5v.workers`); a :class:`Prepared` window is what the model then runs on.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from . import prompts
from .backbones import Backbone, Features
from .errors import ConfigError, InputError, safe_text
from .images import load_image
from .items import Item, clean_text

log = logging.getLogger(__name__)


def check_prompt(prompt: str) -> None:
    """A bad prompt is the call's error (:class:`ConfigError`), raised once before any item is prepared."""
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("the prompt must be a non-empty string")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"the prompt {prompt[:80]!r} cannot be encoded as UTF-8 ({e.reason} at position "
                          f"{e.start}, {prompt[e.start]!r})") from None
    if prompt.count(prompts.IMAGE) > 1:
        raise ConfigError("a prompt may hold at most one <image>")
    if prompt.count(prompts.SENT) > 1:
        raise ConfigError("a prompt may hold at most one <sent>")


class Preparer:
    """Turns one item into :class:`Features`: validate, decode, render the prompt, tokenise, preprocess the image.

    It holds what preprocessing needs and nothing more, so that it can be sent to worker processes
    (:meth:`shippable` drops the model)."""

    def __init__(self, backbone: Backbone, max_length: int, image_options: dict):
        self.backbone = backbone
        self.max_length = max_length
        self.image_options = image_options

    def shippable(self) -> "Preparer":
        return Preparer(self.backbone.without_model(), self.max_length, dict(self.image_options))

    def key(self) -> tuple:
        """What a worker's copy depends on: a change means the workers must be restarted (the AnyRes grid and the
        chat format too: ``limit_anyres`` may be called on a loaded backbone, and its chat format changed)."""
        return (id(self.backbone), self.backbone.chat_format, self.max_length,
                tuple(sorted(self.image_options.items())), self.backbone.preprocessing_key())

    def prepare(self, item: Item, prompt: str) -> Features:
        """Validate, decode and tokenise one item; raises :class:`InputError` naming it, whatever went wrong with
        it (a text the tokenizer refuses, a processor error), so that one bad item never sinks its batch.
        A :class:`ConfigError` is about the call, not the item, and is raised as it is."""
        name = item.name or "item"  # as_item names every item; a bare Item passed here may not be
        try:
            return self._prepare(item, prompt, name)
        except (InputError, ConfigError, KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # tokenizers' PanicException is a BaseException
            log.debug("%s: preparing failed", safe_text(name), exc_info=True)
            kind = type(exc).__name__
            raise InputError(name, f"cannot be prepared ({kind}: {str(exc)[:300]})",
                             public_reason=f"cannot be prepared ({kind})") from None

    def _prepare(self, item: Item, prompt: str, name: str) -> Features:
        wants_text, wants_image = prompts.SENT in prompt, prompts.IMAGE in prompt
        if wants_text != (item.text is not None):
            if wants_text:
                raise InputError(name, "the prompt needs a text (<sent>) but the item has none")
            raise InputError(name, "the item has a text but the prompt has no <sent> to put it in")
        if wants_image != (item.image is not None):
            if wants_image:
                raise InputError(name, "the prompt needs an image (<image>) but the item has none")
            raise InputError(name, "the item has an image but the prompt has no <image> to put it in")
        text = clean_text(item.text, item=name) if wants_text else None
        reserved = next((t for t in (prompts.IMAGE, *self.backbone.reserved_tokens) if text and t in text), None)
        if reserved:
            raise InputError(name, f"the text contains the image marker {reserved!r}, a token reserved for images")
        image = load_image(item.image, item=name, **self.image_options) if wants_image else None
        feats = self.backbone.prepare(self.backbone.render(prompts.fill(prompt, text)), image)
        if len(feats) > self.max_length:
            feats = self._truncate(prompt, text, image, feats, name)
        return feats

    def _truncate(self, prompt: str, text: str | None, image, feats: Features, name: str) -> Features:
        """Cut the item's text (never the prompt) so that the whole input fits ``max_length``."""
        tok = self.backbone.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        for _ in range(4):
            keep = len(ids) - (len(feats) - self.max_length)
            if keep <= 0:
                raise InputError(name, f"the prompt{' and image' if image is not None else ''} alone take "
                                       f"{len(feats) - len(ids)} tokens, over the limit of {self.max_length}")
            ids = ids[:keep]
            feats = self.backbone.prepare(self.backbone.render(prompts.fill(prompt, tok.decode(ids))), image)
            if len(feats) <= self.max_length:
                log.warning("%s: text truncated to %d tokens to fit the model's limit of %d",
                            name, len(ids), self.max_length)
                return feats
        raise InputError(name, f"could not truncate the text to fit {self.max_length} tokens")


@dataclass
class Prepared:
    """A window after preprocessing: the good items (input index, name, features) and the rejected ones."""

    ok_idx: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    feats: list[Features] = field(default_factory=list)
    skipped: list[tuple[int, InputError]] = field(default_factory=list)
