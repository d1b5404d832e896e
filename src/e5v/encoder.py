"""The E5V engine: prompts in, unit vectors out.

Faithful to the official recipe: the task prompt inside the backbone's chat format, BOS added, no EOS, left
padding, the final-layer hidden state at the last position, L2-normalised.  What it does beyond it: the base
model only (no lm_head over the sequence, no stored hidden states), items sorted by length and batched by a
token budget inside bounded windows, results returned in input order, bad items skipped and reported.

Speed options (each off by default or proven equal to the default path by the tests):
- ``num_workers``: preprocessing in worker processes, the next window prepared while the model runs;
- ``packing``: the sequences of a batch in one row without padding (block-diagonal attention);
- ``anyres_max_tiles`` (LLaVA-NeXT, at load): fewer AnyRes grid tiles, a deviation from the official recipe.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import prompts
from .backbones import Backbone, Features, select
from .errors import BatchInputError, ConfigError, InputError, ModelLoadError, safe_text
from .inputs import ALPHA_OPTIONS, clean_text, describe, load_image

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
    """Vectors of the accepted items (``indices`` into the input, ascending) and the rejected ones.

    ``tokens``: the input length of each accepted row in tokens (prompt, text and image tokens; usage reports)."""

    vectors: np.ndarray
    indices: np.ndarray
    skipped: list[tuple[int, InputError]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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


def resolve_dtype(dtype, device: torch.device, *, training: bool = False) -> torch.dtype:
    """``auto``: fp32 on CPU; on a GPU fp16 (the official recipe's dtype), or for ``training`` bf16 where the GPU
    has it (fp16 training needs loss scaling)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if training and torch.cuda.is_bf16_supported() else torch.float16
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from None


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
        pins = getattr(self.backbone.image_processor, "image_grid_pinpoints", None)
        return (id(self.backbone), self.backbone.chat_format, self.max_length, tuple(sorted(self.image_options.items())),
                repr(pins))

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


@dataclass
class Prepared:
    """A window after preprocessing: the good items (input index, name, features) and the rejected ones."""

    ok_idx: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    feats: list[Features] = field(default_factory=list)
    skipped: list[tuple[int, InputError]] = field(default_factory=list)


#: Attention implementations with a variable-length kernel: packing removes padding at no extra attention cost.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


class E5V:
    """A multimodal LLM used as a universal embedding model (texts, images and image+text in one space)."""

    def __init__(self, backbone: Backbone, *, max_batch_tokens: int = 16384, max_batch_size: int = 256,
                 window: int | None = None, max_length: int | None = None, max_pixels: int | None = None,
                 num_workers: int = 0, packing: bool | str = "auto", group_lengths: bool = False,
                 alpha: str = "white"):
        """``window``: items prepared, sorted by length and batched together; it bounds host memory (prepared
        images hold their pixel tensors, up to ~7 MB each at full AnyRes). Default: 4096 texts, 128 images.

        ``num_workers``: preprocess in that many spawned processes, one window ahead of the model (0: in this
        process, in turn with the model). Call :meth:`close` (or use ``with``) to stop them early.

        ``packing``: ``True`` puts each batch's sequences in one row without padding, with per-sequence
        position ids and a block-diagonal causal mask (varlen FlashAttention-2, a FlexAttention block mask, or
        a dense mask under SDPA/eager); ``False`` pads on the left as the official recipe; ``"auto"`` packs
        when the language model runs a variable-length kernel (FlashAttention-2/3, FlexAttention), where
        packing costs no extra attention work. The vectors are the same either way (tested in fp32).

        ``group_lengths``: padded batches hold inputs of one length only, so no batch has padding and SDPA
        keeps its maskless causal kernel (more, smaller batches; useful for images of a few sizes).

        ``alpha``: how transparent images become RGB: ``"white"`` composites them onto white (what a viewer shows);
        ``"official"`` is the official pipeline's plain ``convert("RGB")``, which keeps the colour stored under
        transparent pixels (the evaluation tasks use it to reproduce the paper's protocol).
        """
        if packing not in (True, False, "auto"):
            raise ConfigError(f"packing must be True, False or 'auto', not {packing!r}")
        if int(num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0, not {num_workers}")
        if alpha not in ALPHA_OPTIONS:
            raise ConfigError(f"alpha must be one of {', '.join(ALPHA_OPTIONS)}, not {alpha!r}")
        self.backbone = backbone
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.window = window
        self.max_length = int(max_length or backbone.max_length)
        self.image_options = {"alpha": alpha}
        if max_pixels is not None:
            self.image_options["max_pixels"] = int(max_pixels)
        self.num_workers = int(num_workers)
        self.packing = packing
        self.group_lengths = bool(group_lengths)
        self._pool = None
        self._pool_key = None

    # --- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device=None, dtype=None, adapter: str | None = None,
                        chat_format: str | None = None, attn_implementation: str | None = None,
                        revision: str | None = None, local_files_only: bool | None = None,
                        anyres_max_tiles: int | None = None, **engine_options) -> "E5V":
        """Load ``royokong/e5-v`` (hub id or local copy) or any supported checkpoint.

        ``adapter``: a LoRA adapter directory, merged into the weights after loading.
        ``anyres_max_tiles``: speed option for LLaVA-NeXT, a deviation from the official recipe: only AnyRes
        grids of at most that many 336-px tiles (1: the base tile plus one grid tile, about 2.2x fewer image
        tokens); see :meth:`~e5v.backbones.llava_next.LlavaNextBackbone.limit_anyres`.
        ``engine_options``: ``max_batch_tokens``, ``max_batch_size``, ``window``, ``max_length``, ``max_pixels``,
        ``num_workers``, ``packing``, ``group_lengths``, ``alpha``.
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
        if anyres_max_tiles is not None:
            backbone.limit_anyres(int(anyres_max_tiles))
        log.info("loaded %s (%s, %s format) on %s in %s", name_or_path, type(backbone).__name__,
                 backbone.chat_format, backbone.device, backbone.dtype)
        return cls(backbone, **engine_options)

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    # --- worker processes --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the preprocessing workers, if any (they are started again when needed)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "E5V":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pool's own atexit handler takes over
            pass

    def _workers(self):
        """The worker pool for the current preprocessing settings (restarted when they change), or None."""
        if self.num_workers <= 0:
            self.close()
            return None
        preparer = self._preparer()
        key = (preparer.key(), self.num_workers)
        if self._pool is None or self._pool.closed or self._pool_key != key:
            from .workers import PreparePool

            self.close()
            self._pool = PreparePool(preparer.shippable(), self.num_workers)
            self._pool_key = key
        return self._pool

    # --- public encoders ---------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str] | str, *, prompt: str = prompts.TEXT, **options):
        """Texts with the E5-V text prompt (or ``prompt``, which must contain ``<sent>``)."""
        return self.encode([texts] if isinstance(texts, str) else texts, prompt=prompt, **options)

    def encode_image(self, images, *, prompt: str | None = None, task: str | None = None, **options):
        """Images (paths, bytes or PIL images) with the E5-V image prompt, or the gallery prompt of ``task``."""
        if prompt is None:
            prompt = prompts.image_prompt(task)
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

    def embed(self, items: Sequence, *, prompt: str, show_progress_bar: bool = False,
              normalize: bool = True) -> EmbedResult:
        """Embed what can be embedded; never raises for a bad item (see :class:`EmbedResult`).
        ``normalize=False``: the raw last-token states (FashionIQ sums two of them before normalising)."""
        start = time.perf_counter()
        chunks = list(self.iter_embed(items, prompt=prompt, show_progress_bar=show_progress_bar, normalize=normalize))
        idx = np.concatenate([c.indices for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        vec = np.concatenate([c.vectors for c in chunks]) if chunks else np.zeros((0, self.dim), np.float32)
        skipped = [s for c in chunks for s in c.skipped]  # windows come in input order
        tokens = np.concatenate([c.tokens for c in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        return EmbedResult(vec, idx, skipped, time.perf_counter() - start, tokens)

    def iter_embed(self, items: Iterable, *, prompt: str, show_progress_bar: bool = False,
                   normalize: bool = True) -> Iterator[EmbedResult]:
        """Stream results window by window (bounded memory): one :class:`EmbedResult` per window, rows in
        input order, indices into ``items``."""
        self.check_prompt(prompt)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items) if hasattr(items, "__len__") else None, unit="item", dynamic_ncols=True)
        size = self.window or (128 if prompts.IMAGE in prompt else 4096)
        pool = self._workers()
        pending: deque = deque()  # windows being prepared by the workers: at most two at a time
        try:
            for window in self._windows(items, prompt, size):
                if pool is None:
                    start = time.perf_counter()
                    yield self._run_window(self._prepare_window(window, prompt), bar, start, normalize)
                    continue
                pending.append((pool.submit(window, prompt), time.perf_counter()))
                if len(pending) > 1:  # the next window is queued: run this one while it is prepared
                    handles, t0 = pending.popleft()
                    yield self._run_window(self._collect(pool, handles), bar, t0, normalize)
            while pending:
                handles, t0 = pending.popleft()
                yield self._run_window(self._collect(pool, handles), bar, t0, normalize)
        finally:
            for handles, _ in pending:  # abandoned generator: drop queued work
                pool.cancel(handles)
            if bar is not None:
                bar.close()

    @staticmethod
    def _windows(items: Iterable, prompt: str, size: int) -> Iterator[list[tuple[int, Item]]]:
        window: list[tuple[int, Item]] = []
        for i, obj in enumerate(items):
            window.append((i, as_item(obj, i, prompt)))
            if len(window) >= size:
                yield window
                window = []
        if window:
            yield window

    # --- one window in two steps (servers overlap them on two threads) -----------------------------------
    def prepare_window(self, window: list[tuple[int, Item]], prompt: str) -> Prepared:
        """Preprocess ``(index, Item)`` pairs (in the worker processes when there are any); bad items are
        recorded with their reasons, never raised (a bad prompt raises :class:`ConfigError`)."""
        self.check_prompt(prompt)
        pool = self._workers()
        if pool is None:
            return self._prepare_window(window, prompt)
        return self._collect(pool, pool.submit(window, prompt))

    def run_prepared(self, prep: Prepared, *, normalize: bool = True) -> EmbedResult:
        """The model on a prepared window: what :meth:`embed` returns for it, indices as given in the window."""
        return self._run_window(prep, None, time.perf_counter(), normalize)

    # --- internals ---------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str) -> None:
        """A bad prompt is the call's error, raised once before any item is prepared."""
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

    def _preparer(self) -> Preparer:
        return Preparer(self.backbone, self.max_length, self.image_options)

    def prepare(self, item: Item, prompt: str) -> Features:
        """Validate, decode and tokenise one item; raises :class:`InputError` naming it."""
        return self._preparer().prepare(item, prompt)

    def use_packing(self) -> bool:
        """Whether batches are packed (see ``packing`` in :class:`E5V`)."""
        if self.packing == "auto":
            return self.backbone.supports_packing and self.backbone.attn_implementation in VARLEN_ATTENTION
        if self.packing and not self.backbone.supports_packing:
            raise ConfigError(f"packing is not supported for {type(self.backbone).__name__}; use packing=False")
        return bool(self.packing)

    def plan_batches(self, lengths: Sequence[int], *, packed: bool = False) -> list[list[int]]:
        """Positions grouped into batches: longest first, each under the token budget (padded size, or the
        sum of the lengths when ``packed``), of one length each with ``group_lengths`` (padded batches)."""
        order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
        batches, cur, total = [], [], 0
        for k in order:
            size = total + lengths[k] if packed else (len(cur) + 1) * (lengths[cur[0]] if cur else lengths[k])
            new_length = self.group_lengths and not packed and cur and lengths[k] != lengths[cur[0]]
            if cur and (size > self.max_batch_tokens or len(cur) >= self.max_batch_size or new_length):
                batches.append(cur)
                cur, total = [], 0
            cur.append(k)
            total += lengths[k]
        if cur:
            batches.append(cur)
        return batches

    def _prepare_window(self, window: list[tuple[int, Item]], prompt: str) -> Prepared:
        prep = Prepared()
        preparer = self._preparer()
        for i, item in window:
            try:
                prep.feats.append(preparer.prepare(item, prompt))
                prep.ok_idx.append(i)
                prep.names.append(item.name)
            except InputError as err:
                log.warning("skipped %s", err)
                prep.skipped.append((i, err))
        return prep

    @staticmethod
    def _collect(pool, handles) -> Prepared:
        prep = Prepared()
        for i, name, feats, err in pool.collect(handles):
            if feats is None:
                log.warning("skipped %s", err)
                prep.skipped.append((i, err))
            else:
                prep.ok_idx.append(i)
                prep.names.append(name)
                prep.feats.append(feats)
        return prep

    def _run_window(self, prep: Prepared, bar, start: float, normalize: bool = True) -> EmbedResult:
        ok_idx, names, feats, skipped = prep.ok_idx, prep.names, prep.feats, prep.skipped
        if bar is not None and skipped:
            bar.update(len(skipped))
        vectors = np.zeros((len(feats), self.dim), dtype=np.float32)
        lengths = np.asarray([len(f) for f in feats], dtype=np.int64)
        packed = self.use_packing()
        for batch in self.plan_batches(lengths.tolist(), packed=packed):
            vectors[batch] = self.run_batch([feats[k] for k in batch], packed=packed, normalize=normalize)
            if bar is not None:
                bar.update(len(batch))
        finite = np.isfinite(vectors).all(axis=1)
        for k in np.flatnonzero(~finite):
            err = InputError(names[k], "the model produced a non-finite embedding (overflow in "
                             f"{str(self.backbone.dtype).replace('torch.', '')}? try bfloat16 or float32)")
            log.warning("skipped %s", err)
            skipped.append((ok_idx[k], err))
        ok = np.asarray(ok_idx, dtype=np.int64)[finite]
        return EmbedResult(vectors[finite], ok, sorted(skipped, key=lambda s: s[0]), time.perf_counter() - start,
                           lengths[finite])

    @torch.inference_mode()
    def run_batch(self, feats: list[Features], *, packed: bool = False, normalize: bool = True) -> np.ndarray:
        """One forward pass: collate (padded, or packed in one row), run the base model, pool each sequence's
        last position, L2-normalise in fp32."""
        bb = self.backbone
        if packed:
            cpu_batch, ends = bb.collate_packed(feats)
        else:
            cpu_batch, ends = bb.collate(feats), None
        batch = to_device(cpu_batch, bb.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(bb.dtype)
        hidden = bb.forward(batch)
        emb = (hidden[0, ends.to(hidden.device)] if packed else pool_last(hidden)).float()
        return (F.normalize(emb, dim=-1) if normalize else emb).cpu().numpy()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch; to a GPU through pinned host memory with asynchronous copies (the forward pass
    that follows is queued on the same stream, so it sees the data)."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
