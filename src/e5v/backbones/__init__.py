"""Backbone families behind one registry. Adding a family is adding one module and importing it here."""
from __future__ import annotations

import logging
import os

from ..config import EngineConfig, resolve_device, resolve_dtype
from ..errors import ConfigError, ModelLoadError
from .base import Backbone, Features, register, registered
from . import llava, llava_next, qwen2_vl  # noqa: F401  (registration)

log = logging.getLogger(__name__)


def select(config) -> type[Backbone]:
    """The backbone class for a checkpoint's config (by ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    for cls in registered():
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in registered() for t in cls.model_types)
    raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(known)}")


def load_backbone(cfg: EngineConfig) -> Backbone:
    """The backbone of ``cfg.model`` (a hub id or a local checkpoint directory) on ``cfg.device`` in the compute
    ``cfg.dtype``, with the LoRA adapter ``cfg.adapter`` merged into its weights.

    ``cfg.anyres_max_tiles``: speed option for LLaVA-NeXT, a deviation from the official recipe: only AnyRes
    grids of at most that many 336-px tiles (1: the base tile plus one grid tile, about 2.2x fewer image
    tokens); see :meth:`~e5v.backbones.llava_next.LlavaNextBackbone.limit_anyres`. ``cfg.image_max_pixels``: the
    same for dynamic-resolution families: images resized to at most that many pixels (:meth:`Backbone.limit_pixels`).
    """
    from transformers import AutoConfig

    if not cfg.model:
        raise ConfigError("no model: give a hub id or a checkpoint directory")
    name_or_path = cfg.model
    hub = {k: v for k, v in {"revision": cfg.revision, "local_files_only": cfg.local_files_only}.items()
           if v is not None}
    local = os.path.isdir(name_or_path)
    if not local and (os.path.exists(name_or_path) or name_or_path.startswith(("/", ".", "~"))):
        raise ModelLoadError(f"{name_or_path}: no such checkpoint directory")
    try:
        model_config = AutoConfig.from_pretrained(name_or_path, **hub)
    except (OSError, ValueError) as exc:
        where = "the directory" if local else "the Hugging Face hub (not a local directory; offline?)"
        raise ModelLoadError(f"cannot load a model config for {name_or_path!r} from {where}: {exc}") from exc
    dev = resolve_device(cfg.device)
    backbone = select(model_config).from_checkpoint(name_or_path, model_config, dtype=resolve_dtype(cfg.dtype, dev),
                                                    device=dev, chat_format=cfg.chat_format,
                                                    attn_implementation=cfg.attn_implementation, **hub)
    if cfg.adapter:
        from ..adapters import merge_adapter

        merge_adapter(backbone.model, cfg.adapter)
    if cfg.anyres_max_tiles is not None:
        backbone.limit_anyres(int(cfg.anyres_max_tiles))
    if cfg.image_max_pixels is not None:
        backbone.limit_pixels(int(cfg.image_max_pixels))
    log.info("loaded %s (%s, %s format) on %s in %s", name_or_path, type(backbone).__name__,
             backbone.chat_format, backbone.device, backbone.dtype)
    return backbone


__all__ = ["Backbone", "Features", "load_backbone", "register", "select"]
