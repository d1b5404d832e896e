"""The E5V engine: prompts in, unit vectors out.

Faithful to the official recipe: the task prompt inside the backbone's chat format, BOS added, no EOS, left
padding, the final-layer hidden state at the last position, L2-normalised.  What it does beyond it: the base
model only (no lm_head over the sequence, no stored hidden states), items sorted by length and batched by a
token budget inside bounded windows, results returned in input order, bad items skipped and reported.

Speed options (each off by default or proven equal to the default path by the tests):
- ``num_workers``: preprocessing in worker processes, the next window prepared while the model runs;
- ``packing``: the sequences of a batch in one row without padding (block-diagonal attention);
- ``anyres_max_tiles`` (LLaVA-NeXT, at load): fewer AnyRes grid tiles, a deviation from the official recipe;
- ``image_max_pixels`` (dynamic-resolution and tiling families, at load): fewer pixels or tiles, fewer image tokens.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from . import batching, prompts
from .backbones import Backbone, Features, load_backbone
from .config import EngineConfig
from .errors import BatchInputError, ConfigError, InputError
from .images import ALPHA_OPTIONS
from .items import EmbedResult, Item, windows
from .prepare import Preparer, Prepared, check_prompt

log = logging.getLogger(__name__)

_DEFAULTS = EngineConfig()  # the constructor's defaults are the configuration's


class E5V:
    """A multimodal LLM used as a universal embedding model (texts, images and image+text in one space)."""

    def __init__(self, backbone: Backbone, *, max_batch_tokens: int = _DEFAULTS.max_batch_tokens,
                 max_batch_size: int = _DEFAULTS.max_batch_size, window: int | None = _DEFAULTS.window,
                 max_length: int | None = _DEFAULTS.max_length, max_pixels: int | None = _DEFAULTS.max_pixels,
                 num_workers: int = _DEFAULTS.num_workers, packing: bool | str = _DEFAULTS.packing,
                 group_lengths: bool = _DEFAULTS.group_lengths, alpha: str = _DEFAULTS.alpha):
        """The defaults are :class:`~e5v.config.EngineConfig`'s.

        ``window``: items prepared, sorted by length and batched together; it bounds host memory (prepared
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
    def from_pretrained(cls, name_or_path: str | None = None, *, config: EngineConfig | None = None,
                        **options) -> "E5V":
        """Load ``royokong/e5-v`` (hub id or local copy) or any supported checkpoint.

        ``options``: the fields of :class:`~e5v.config.EngineConfig` (``device``, ``dtype``, ``adapter``,
        ``chat_format``, ``max_batch_tokens``, ``num_workers``, ...), over ``config`` where one is given.
        ``adapter``: a LoRA adapter directory, merged into the weights after loading.
        ``anyres_max_tiles``, ``image_max_pixels``: fewer image tokens, a deviation from the official recipe
        (see :func:`e5v.backbones.load_backbone`).
        """
        cfg = (config or EngineConfig()).replace(**options)
        if name_or_path is not None:
            cfg = cfg.replace(model=str(name_or_path))
        return cls(load_backbone(cfg), **cfg.engine_options())

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
        preparer = self.preparer()
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
        check_prompt(prompt)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items) if hasattr(items, "__len__") else None, unit="item", dynamic_ncols=True)
        size = self.window or (128 if prompts.IMAGE in prompt else 4096)
        pool = self._workers()
        pending: deque = deque()  # windows being prepared by the workers: at most two at a time
        try:
            for window in windows(items, prompt, size):
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

    # --- one window in two steps (servers overlap them on two threads) -----------------------------------
    def prepare_window(self, window: list[tuple[int, Item]], prompt: str) -> Prepared:
        """Preprocess ``(index, Item)`` pairs (in the worker processes when there are any); bad items are
        recorded with their reasons, never raised (a bad prompt raises :class:`ConfigError`)."""
        check_prompt(prompt)
        pool = self._workers()
        if pool is None:
            return self._prepare_window(window, prompt)
        return self._collect(pool, pool.submit(window, prompt))

    def run_prepared(self, prep: Prepared, *, normalize: bool = True) -> EmbedResult:
        """The model on a prepared window: what :meth:`embed` returns for it, indices as given in the window."""
        return self._run_window(prep, None, time.perf_counter(), normalize)

    # --- the steps under this engine's settings ----------------------------------------------------------
    def preparer(self) -> Preparer:
        """What prepares items under this engine's settings (the workers get a copy of it)."""
        return Preparer(self.backbone, self.max_length, self.image_options)

    def prepare(self, item: Item, prompt: str) -> Features:
        """Validate, decode and tokenise one item; raises :class:`InputError` naming it."""
        return self.preparer().prepare(item, prompt)

    def use_packing(self) -> bool:
        """Whether batches are packed (see ``packing`` in :class:`E5V`)."""
        return batching.use_packing(self.packing, self.backbone)

    def plan_batches(self, lengths: Sequence[int], *, packed: bool = False) -> list[list[int]]:
        """Positions grouped into batches under this engine's budgets (see :func:`e5v.batching.plan_batches`)."""
        return batching.plan_batches(lengths, max_tokens=self.max_batch_tokens, max_size=self.max_batch_size,
                                     group_lengths=self.group_lengths, packed=packed)

    def _prepare_window(self, window: list[tuple[int, Item]], prompt: str) -> Prepared:
        prep = Prepared()
        preparer = self.preparer()
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

    def run_batch(self, feats: list[Features], *, packed: bool = False, normalize: bool = True) -> np.ndarray:
        """One forward pass of the backbone on a batch (see :func:`e5v.batching.forward`)."""
        return batching.forward(self.backbone, feats, packed=packed, normalize=normalize)


def load_engine(config: EngineConfig, progress: bool = True) -> E5V:
    """The engine of ``config``; without ``progress`` quietly: the weight-loading bar is hidden while it loads
    (and shown again afterwards if it was)."""
    if progress:
        return E5V.from_pretrained(config=config)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return E5V.from_pretrained(config=config)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
