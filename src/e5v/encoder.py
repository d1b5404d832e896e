"""The E5V engine: prompts in, unit vectors out.

Faithful to the official recipe: the task prompt inside the backbone's chat format, BOS added, no EOS, left
padding, the final-layer hidden state at the last position, L2-normalised.  What it does beyond it: the base
model only (no lm_head over the sequence, no stored hidden states), items sorted by length and batched by a
token budget inside bounded windows, results returned in input order, bad items skipped and reported.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import prompts
from .backbones import Backbone, Features, select
from .errors import BatchInputError, ConfigError, InputError, ModelLoadError
from .inputs import clean_text, describe, load_image

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def pool_last(hidden: torch.Tensor) -> torch.Tensor:
    """E5-V pooling: the last position of the final layer (the last real token under left padding)."""
    return hidden[:, -1]


@dataclass
class Item:
    """One input: a text, an image (path, bytes or PIL image), or both (composed)."""

    text: str | None = None
    image: Any = None
    name: str | None = None


@dataclass
class EmbedResult:
    """Vectors of the accepted items (``indices`` into the input, ascending) and the rejected ones."""

    vectors: np.ndarray
    indices: np.ndarray
    skipped: list[tuple[int, InputError]] = field(default_factory=list)
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.indices)


def as_item(obj, index: int, prompt: str) -> Item:
    """Accept an Item, an ``(image, text)`` pair, a dict with image/text, a str, or an image.

    A str is a text when the prompt has ``<sent>``, else an image path (image-only prompts).
    """
    if isinstance(obj, Item):
        return obj if obj.name else Item(obj.text, obj.image, f"item {index}")
    if isinstance(obj, str) and (prompts.SENT in prompt or prompts.IMAGE not in prompt):
        return Item(text=obj, name=f"text {index}")
    if isinstance(obj, tuple) and len(obj) == 2:
        return Item(image=obj[0], text=obj[1], name=f"pair {index} ({describe(obj[0], index)})")
    if isinstance(obj, dict):
        return Item(text=obj.get("text"), image=obj.get("image"), name=str(obj.get("id", f"item {index}")))
    return Item(image=obj, name=describe(obj, index))


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32  # fp16: the official recipe's dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from None


class E5V:
    """A multimodal LLM used as a universal embedding model (texts, images and image+text in one space)."""

    def __init__(self, backbone: Backbone, *, max_batch_tokens: int = 16384, max_batch_size: int = 256,
                 window: int | None = None, max_length: int | None = None, max_pixels: int | None = None):
        """``window``: items prepared, sorted by length and batched together; it bounds host memory (prepared
        images hold their pixel tensors, up to ~7 MB each at full AnyRes). Default: 4096 texts, 128 images."""
        self.backbone = backbone
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.window = window
        self.max_length = int(max_length or backbone.max_length)
        self.image_options = {} if max_pixels is None else {"max_pixels": int(max_pixels)}

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None, adapter: str | None = None,
                        chat_format: str | None = None, attn_implementation: str | None = None,
                        revision: str | None = None, local_files_only: bool | None = None, **engine_options) -> "E5V":
        """Load ``royokong/e5-v`` (hub id or local copy) or any supported checkpoint.

        ``adapter``: a LoRA adapter directory, merged into the weights after loading.
        ``engine_options``: ``max_batch_tokens``, ``max_batch_size``, ``window``, ``max_length``, ``max_pixels``.
        """
        from transformers import AutoConfig

        hub = {k: v for k, v in {"revision": revision, "local_files_only": local_files_only}.items() if v is not None}
        local = os.path.isdir(name_or_path)
        if not local and (os.path.exists(name_or_path) or name_or_path.startswith(("/", ".", "~"))):
            raise ModelLoadError(f"{name_or_path}: no such checkpoint directory")
        try:
            config = AutoConfig.from_pretrained(name_or_path, **hub)
        except (OSError, ValueError) as exc:
            where = "the directory" if local else "the Hugging Face hub (not a local directory; offline?)"
            raise ModelLoadError(f"cannot load a model config for {name_or_path!r} from {where}: {exc}") from exc
        dev = resolve_device(device)
        backbone = select(config).from_checkpoint(name_or_path, config, dtype=resolve_dtype(dtype, dev), device=dev,
                                                  chat_format=chat_format, attn_implementation=attn_implementation,
                                                  **hub)
        if adapter:
            from .adapters import merge_adapter

            merge_adapter(backbone.model, adapter)
        log.info("loaded %s (%s, %s format) on %s in %s", name_or_path, type(backbone).__name__,
                 backbone.chat_format, backbone.device, backbone.dtype)
        return cls(backbone, **engine_options)

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    # --- public encoders ---------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str] | str, *, prompt: str = prompts.TEXT, **options):
        """Texts with the E5-V text prompt (or ``prompt``, which must contain ``<sent>``)."""
        return self.encode([texts] if isinstance(texts, str) else texts, prompt=prompt, **options)

    def encode_image(self, images, *, prompt: str | None = None, task: str | None = None, **options):
        """Images (paths, bytes or PIL images) with the E5-V image prompt, or the gallery prompt of ``task``."""
        if prompt is None:
            prompt = prompts.composed_prompts(task)[1] if task else prompts.IMAGE_PROMPT
        single = isinstance(images, (str, os.PathLike, bytes, Image.Image))
        return self.encode([images] if single else list(images), prompt=prompt, **options)

    def encode_composed(self, pairs, *, task: str = "cirr", prompt: str | None = None, **options):
        """``(reference image, modification text)`` pairs with the query prompt of ``task``."""
        prompt = prompt or prompts.composed_prompts(task)[0]
        return self.encode([p if isinstance(p, (Item, dict)) else tuple(p) for p in pairs], prompt=prompt, **options)

    def encode(self, items: Sequence, *, prompt: str, convert_to_tensor: bool = False, precision: str = "float32",
               show_progress_bar: bool = False):
        """Embed ``items`` with a user prompt (``<sent>`` for the text, ``<image>`` for the image).

        Returns unit rows in input order: float32 numpy by default, a torch tensor with
        ``convert_to_tensor=True``, float16 with ``precision="float16"``.  If any item is rejected, raises
        :class:`BatchInputError` naming each one, with the accepted items' vectors in ``.result``.
        """
        if precision not in ("float32", "float16"):
            raise ConfigError(f"precision must be float32 or float16, not {precision!r}")
        result = self.embed(items, prompt=prompt, show_progress_bar=show_progress_bar)
        if result.skipped:
            raise BatchInputError(result.skipped, result)
        out = torch.from_numpy(result.vectors)
        out = out.to(torch.float16) if precision == "float16" else out
        return out if convert_to_tensor else out.numpy()

    def embed(self, items: Sequence, *, prompt: str, show_progress_bar: bool = False) -> EmbedResult:
        """Embed what can be embedded; never raises for a bad item (see :class:`EmbedResult`)."""
        start = time.perf_counter()
        chunks = list(self.iter_embed(items, prompt=prompt, show_progress_bar=show_progress_bar))
        idx = np.concatenate([c.indices for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        vec = np.concatenate([c.vectors for c in chunks]) if chunks else np.zeros((0, self.dim), np.float32)
        skipped = [s for c in chunks for s in c.skipped]  # windows come in input order
        return EmbedResult(vec, idx, skipped, time.perf_counter() - start)

    def iter_embed(self, items: Iterable, *, prompt: str, show_progress_bar: bool = False) -> Iterator[EmbedResult]:
        """Stream results window by window (bounded memory): one :class:`EmbedResult` per window, rows in
        input order, indices into ``items``."""
        self.check_prompt(prompt)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items) if hasattr(items, "__len__") else None, unit="item", dynamic_ncols=True)
        size = self.window or (128 if prompts.IMAGE in prompt else 4096)
        window: list[tuple[int, Any]] = []
        try:
            for i, obj in enumerate(items):
                window.append((i, obj))
                if len(window) >= size:
                    yield self._embed_window(window, prompt, bar)
                    window = []
            if window:
                yield self._embed_window(window, prompt, bar)
        finally:
            if bar is not None:
                bar.close()

    # --- internals ---------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError("the prompt must be a non-empty string")
        if prompt.count(prompts.IMAGE) > 1:
            raise ConfigError("a prompt may hold at most one <image>")
        if prompt.count(prompts.SENT) > 1:
            raise ConfigError("a prompt may hold at most one <sent>")

    def prepare(self, item: Item, prompt: str) -> Features:
        """Validate, decode and tokenise one item; raises :class:`InputError` naming it."""
        name = item.name or "item"  # as_item names every item; a bare Item passed here may not be
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
        if text is not None and (prompts.IMAGE in text or self.backbone.image_placeholder in text):
            raise InputError(name, f"the text contains the image marker {prompts.IMAGE!r}")
        image = load_image(item.image, item=name, **self.image_options) if wants_image else None
        template = self.backbone.render(prompt)
        feats = self.backbone.prepare(prompts.fill(template, text), image)
        if len(feats) > self.max_length:
            feats = self._truncate(template, text, image, feats, name)
        return feats

    def _truncate(self, template: str, text: str | None, image, feats: Features, name: str) -> Features:
        """Cut the item's text (never the prompt) so that the whole input fits ``max_length``."""
        tok = self.backbone.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        for _ in range(4):
            keep = len(ids) - (len(feats) - self.max_length)
            if keep <= 0:
                raise InputError(name, f"the prompt{' and image' if image is not None else ''} alone take "
                                       f"{len(feats) - len(ids)} tokens, over the limit of {self.max_length}")
            ids = ids[:keep]
            feats = self.backbone.prepare(prompts.fill(template, tok.decode(ids)), image)
            if len(feats) <= self.max_length:
                log.warning("%s: text truncated to %d tokens to fit the model's limit of %d",
                            name, len(ids), self.max_length)
                return feats
        raise InputError(name, f"could not truncate the text to fit {self.max_length} tokens")

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Positions grouped into batches: longest first, each under the token budget (padded size)."""
        order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
        batches, cur = [], []
        for k in order:
            if cur and ((len(cur) + 1) * lengths[cur[0]] > self.max_batch_tokens or len(cur) >= self.max_batch_size):
                batches.append(cur)
                cur = []
            cur.append(k)
        if cur:
            batches.append(cur)
        return batches

    def _embed_window(self, window: list[tuple[int, Any]], prompt: str, bar) -> EmbedResult:
        start = time.perf_counter()
        ok_idx, names, feats, skipped = [], [], [], []
        for i, obj in window:
            item = as_item(obj, i, prompt)
            try:
                feats.append(self.prepare(item, prompt))
                ok_idx.append(i)
                names.append(item.name)
            except InputError as err:
                log.warning("skipped %s", err)
                skipped.append((i, err))
        if bar is not None and skipped:
            bar.update(len(skipped))
        vectors = np.zeros((len(feats), self.dim), dtype=np.float32)
        for batch in self.plan_batches([len(f) for f in feats]):
            vectors[batch] = self.run_batch([feats[k] for k in batch])
            if bar is not None:
                bar.update(len(batch))
        finite = np.isfinite(vectors).all(axis=1)
        for k in np.flatnonzero(~finite):
            err = InputError(names[k], "the model produced a non-finite embedding (overflow in "
                             f"{str(self.backbone.dtype).replace('torch.', '')}? try bfloat16 or float32)")
            log.warning("skipped %s", err)
            skipped.append((ok_idx[k], err))
        ok = np.asarray(ok_idx, dtype=np.int64)[finite]
        return EmbedResult(vectors[finite], ok, sorted(skipped, key=lambda s: s[0]), time.perf_counter() - start)

    @torch.inference_mode()
    def run_batch(self, feats: list[Features]) -> np.ndarray:
        """One forward pass: collate, run the base model, pool the last position, L2-normalise in fp32."""
        bb = self.backbone
        batch = {k: v.to(bb.device) for k, v in bb.collate(feats).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(bb.dtype)
        emb = pool_last(bb.forward(batch)).float()
        return F.normalize(emb, dim=-1).cpu().numpy()
