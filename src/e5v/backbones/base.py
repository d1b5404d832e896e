"""What every backbone module provides: load a checkpoint, build the chat string, turn one item into token
ids and image tensors, collate a left-padded batch, and run the base model to the last hidden state.

A backbone family is one subclass in its own module, registered with :func:`register`; the registry picks
it from the checkpoint's ``config.model_type`` (see ``backbones/__init__.py``). A family whose HF processor loads
without torchvision subclasses :class:`ProcessorBackbone`; the others load the tokenizer with :func:`load_tokenizer`.

Resolution options (``anyres_max_tiles``, ``image_max_pixels``) only ever lower the checkpoint's own budget; a
request at or above it changes nothing (logged). Tiling families count a budget in whole grid tiles
(:func:`whole_tiles`): the base tile or thumbnail, a downscaled copy of the whole image, comes on top of them.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import prompts
from ..errors import ConfigError

log = logging.getLogger(__name__)

_REGISTRY: list[type["Backbone"]] = []


def register(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: make a backbone family known to :func:`e5v.backbones.select`."""
    _REGISTRY.append(cls)
    return cls


def registered() -> list[type["Backbone"]]:
    return list(_REGISTRY)


@dataclass
class Features:
    """One prepared item: its token ids (1-D) and its image tensors, before batching."""

    input_ids: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class Backbone:
    """A loaded multimodal LLM seen as an embedding model."""

    #: ``config.model_type`` values this family handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The string the family's processor expects where an image goes.
    image_placeholder: ClassVar[str] = prompts.IMAGE
    #: The family's tokens that stand for (part of) an image: an item's text may not hold them (nor ``<image>``),
    #: or the processor or the model would count an image that is not there.
    reserved_tokens: ClassVar[tuple[str, ...]] = ()
    #: Chat formats (keys of :data:`e5v.prompts.CHAT_FORMATS`) this family can use, its default first; "raw" (no
    #: chat turn) fits all, and "template" (the checkpoint's own chat template) every checkpoint that has one.
    chat_formats: ClassVar[tuple[str, ...]] = ()

    #: Which side batches are padded on. Last-token pooling needs "left"; only tests change it.
    padding_side: str = "left"
    #: Whether :meth:`collate_packed` is valid for this family (1-D position ids, restarting per sequence).
    supports_packing: ClassVar[bool] = True

    def __init__(self, model, tokenizer, image_processor, *, chat_format: str | None = None, path: str = ""):
        tokenizer.padding_side = "left"
        chat_format = chat_format or self.detect_chat_format(tokenizer)
        if chat_format not in (*self.chat_formats, prompts.TEMPLATE, "raw"):
            raise ConfigError(f"chat format {chat_format!r} does not fit {type(self).__name__}; "
                              f"expected one of {', '.join(self.chat_formats)}")
        if chat_format == prompts.TEMPLATE and not tokenizer.chat_template:
            raise ConfigError(f"{path or type(self).__name__}: the checkpoint has no chat template; choose a "
                              f"chat format ({', '.join((*self.chat_formats, 'raw'))})")
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_format = chat_format
        self.path = path
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ConfigError(f"{path}: the tokenizer has neither a pad nor an eos token")

    # --- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, config, *, dtype, device, chat_format: str | None = None,
                        attn_implementation: str | None = None, **hub_kwargs) -> "Backbone":
        """Load model and pre-processing from a local directory or hub id. Subclasses fill :meth:`_load_parts`."""
        from transformers import AutoModelForImageTextToText

        cls.check_load(dtype, attn_implementation)
        kwargs = dict(dtype=dtype, **hub_kwargs)
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if torch.device(device).type != "cpu":
            kwargs["device_map"] = str(device)  # load straight onto the accelerator, not through host memory
        model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
        model.to(device).eval()
        model.requires_grad_(False)
        parts = cls.load_preprocessing(path, model, **hub_kwargs)
        return cls(model, **parts, chat_format=chat_format, path=str(path))

    @classmethod
    def check_load(cls, dtype: torch.dtype, attn_implementation: str | None) -> None:
        """Refuse a compute dtype or attention implementation under which the family's vectors would be wrong
        (:class:`ConfigError`, before anything is loaded); the engine's loading and training both ask."""

    @classmethod
    def for_text(cls, path: str, *, chat_format: str | None = None, **hub_kwargs) -> "Backbone":
        """Prompt rendering, tokenisation and collation without a model: text-only training loads the language
        model alone and runs it through :meth:`forward` with ``language_model``."""
        return cls(None, **cls.load_preprocessing(path, None, **hub_kwargs), chat_format=chat_format, path=str(path))

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs) -> dict:
        """Tokenizer and image processing of a checkpoint, as keyword arguments of the constructor (``model``
        None: for texts only, see :meth:`for_text`)."""
        raise NotImplementedError

    @classmethod
    def detect_chat_format(cls, tokenizer) -> str:
        return cls.chat_formats[0]

    def without_model(self) -> "Backbone":
        """A copy that shares the tokenizer and image processing but holds no model (for worker processes)."""
        clone = copy.copy(self)
        clone.model = None
        return clone

    def limit_anyres(self, max_tiles: int) -> None:
        """Speed option of tiled-image families (see LLaVA-NeXT); others have no AnyRes grid to cap."""
        raise ConfigError(f"{type(self).__name__} has no AnyRes tiles to cap")

    def limit_pixels(self, max_pixels: int) -> None:
        """Dynamic-resolution families: resize each image to at most ``max_pixels`` pixels before the vision tower
        (fewer image tokens, less detail); tiling families: at most ``max_pixels`` in the grid's whole tiles (see
        :func:`whole_tiles`). Fixed-resolution families have nothing to limit."""
        raise ConfigError(f"{type(self).__name__} sees images at a fixed resolution: there is no pixel budget "
                          "to set")

    def limit_images(self, cfg) -> None:
        """The image budgets of an :class:`~e5v.config.EngineConfig` (``anyres_max_tiles``, ``image_max_pixels``),
        where set: what the engine's loading and training with images both apply."""
        if cfg.anyres_max_tiles is not None:
            self.limit_anyres(int(cfg.anyres_max_tiles))
        if cfg.image_max_pixels is not None:
            self.limit_pixels(int(cfg.image_max_pixels))

    def preprocessing_key(self) -> tuple:
        """What the image preprocessing depends on beyond the checkpoint, for :meth:`e5v.prepare.Preparer.key`
        (the limits above may be set on a loaded backbone)."""
        ip = self.image_processor
        return (repr(getattr(ip, "image_grid_pinpoints", None)), repr(getattr(ip, "size", None)))

    # --- prompts -------------------------------------------------------------------------------------
    def render(self, inner_prompt: str) -> str:
        """Wrap a task prompt, its ``<sent>`` already filled, in the chat format, and swap ``<image>`` for this
        family's image marker. (Filled first: a template may transform the text, e.g. Gemma's trims it.)"""
        if self.chat_format == prompts.TEMPLATE:
            return self.render_template(inner_prompt)
        text = prompts.CHAT_FORMATS[self.chat_format].format(inner_prompt)
        return text.replace(prompts.IMAGE, self.image_placeholder)

    def render_template(self, inner_prompt: str) -> str:
        """The checkpoint's chat template on one user message: the prompt's text around ``<image>`` as text
        parts (verbatim), ``<image>`` as an image part, then the generation prompt. A BOS the template writes is
        dropped, because the tokenizer adds its own (what ``apply_chat_template(tokenize=True)`` yields)."""
        before, image, after = inner_prompt.partition(prompts.IMAGE)
        parts = [{"type": "text", "text": before}] if before else []
        if image:
            parts.append({"type": "image"})
        if after:
            parts.append({"type": "text", "text": after})
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": parts}], tokenize=False,
                                                  add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and text.startswith(bos) and self.adds_bos():
            text = text[len(bos):]
        return text

    def adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS in front of a text by itself."""
        ids = self.tokenizer("a")["input_ids"]
        return bool(ids) and ids[0] == self.tokenizer.bos_token_id

    # --- per item and per batch ------------------------------------------------------------------------
    def prepare(self, text: str, image=None) -> Features:
        """Tokenise one rendered prompt (BOS added by the tokenizer, no EOS) with its image, if any."""
        raise NotImplementedError

    def collate(self, items: list[Features]) -> dict[str, torch.Tensor]:
        """Pad token ids on :attr:`padding_side` and stack the image tensors in item order."""
        width = max(len(f) for f in items)
        ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, f in enumerate(items):
            n = len(f)
            sl = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, sl] = f.input_ids
            mask[row, sl] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        with_images = [f.images for f in items if f.images]
        if with_images:
            batch.update(self.stack_images(with_images))
        return batch

    def collate_packed(self, items: list[Features]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All sequences in one row, no padding, and the position of each one's last token.

        Position ids restart at 0 for each sequence and no attention mask is passed: transformers then builds
        a block-diagonal causal mask from the position ids (varlen for FlashAttention-2, a block mask for
        FlexAttention, a dense boolean mask for SDPA and eager). Each sequence sees exactly what it sees alone,
        at the same positions, so the vectors equal the padded path's.
        """
        lengths = torch.tensor([len(f) for f in items])
        batch = {"input_ids": torch.cat([f.input_ids for f in items])[None],
                 "position_ids": torch.cat([torch.arange(n) for n in lengths.tolist()])[None]}
        with_images = [f.images for f in items if f.images]
        if with_images:
            batch.update(self.stack_images(with_images))
        return batch, lengths.cumsum(0) - 1

    def stack_images(self, images: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([im[k] for im in images]) for k in images[0]}

    def forward(self, batch: dict[str, torch.Tensor], language_model=None) -> torch.Tensor:
        """Final-layer hidden states of the base model (no lm_head), shape (batch, seq, hidden).

        ``language_model``: run a text batch through that module instead, the base language model alone (what
        training loads, LoRA-wrapped); for texts the multimodal model does exactly this."""
        if language_model is not None:
            return language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        return self.model.model(**batch, use_cache=False).last_hidden_state

    # --- facts ---------------------------------------------------------------------------------------
    @property
    def attn_implementation(self) -> str | None:
        """The language model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
        return getattr(self.model.config.text_config, "_attn_implementation", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 0) or 1 << 30)


class ProcessorBackbone(Backbone):
    """A family whose HF processor loads without torchvision (its PIL backend): the processor tokenises a rendered
    prompt and expands its image marker. The processor's chat template, where it has one, is the one rendered, not
    the tokenizer's (a tokenizer config may keep its text model's), as :func:`load_tokenizer` does."""

    @classmethod
    def load_preprocessing(cls, path, model, **hub_kwargs):
        from transformers import AutoProcessor

        # The PIL backend is the one the official recipes ran (the "slow" processor), and the one that works
        # without torchvision on every transformers >= 5.17.
        return {"processor": AutoProcessor.from_pretrained(path, backend="pil", **hub_kwargs)}

    def __init__(self, model, processor, *, chat_format: str | None = None, path: str = ""):
        if getattr(processor, "chat_template", None):
            processor.tokenizer.chat_template = processor.chat_template
        super().__init__(model, processor.tokenizer, processor.image_processor, chat_format=chat_format, path=path)
        self.processor = processor

    def prepare(self, text: str, image=None) -> Features:
        enc = self.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        return Features(enc["input_ids"][0], {k: enc[k] for k in ("pixel_values", "image_sizes") if k in enc})


def load_tokenizer(path, **hub_kwargs):
    """(tokenizer, processor settings) of a checkpoint whose processor e5v does not build (it needs torchvision):
    the settings of its ``processor_config.json``, and the tokenizer with the processor's chat template where there
    is one (``chat_template.jinja``, the older ``chat_template.json``, or a ``chat_template`` in
    ``processor_config.json``): that is the template the model's processor renders; a tokenizer config may hold
    another (llava-hf's OneVision keeps its text model's, Qwen2-Instruct's) or none."""
    from transformers import AutoTokenizer, ProcessorMixin

    tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    settings, _ = ProcessorMixin.get_processor_dict(path, **hub_kwargs)
    if settings.get("chat_template"):
        tokenizer.chat_template = settings["chat_template"]
    return tokenizer, settings


def lowers(option: str, asked: int, own: int) -> bool:
    """Whether a resolution option asks for less than the checkpoint's ``own`` budget; if not, it is left as it is
    (the options only ever lower it), and the log says so."""
    if asked < own:
        return True
    log.warning("%s %d is not below the checkpoint's own %d: left unchanged (it only lowers the budget)",
                option, asked, own)
    return False


def whole_tiles(max_pixels: int, tile: int) -> int:
    """A pixel budget as a tiling family's tile cap: the whole ``tile`` x ``tile`` grid tiles within ``max_pixels``.
    The base tile (LLaVA-NeXT, OneVision) or thumbnail (InternVL), a downscaled copy of the whole image, comes on top
    and is not counted, as with ``anyres_max_tiles``."""
    if max_pixels < tile * tile:
        raise ConfigError(f"image_max_pixels {max_pixels} is below one {tile}x{tile} tile")
    return max_pixels // (tile * tile)
