"""Backbone families behind one registry. Adding a family is adding one module and importing it here."""
from __future__ import annotations

import logging
import os

from ..config import EngineConfig, resolve_device, resolve_dtype
from ..errors import ConfigError, ModelLoadError
from .base import Backbone, Features, register, registered
from . import gemma3, idefics3, internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
# (the imports register the families)

log = logging.getLogger(__name__)


#: Families that transformers runs natively but e5v refuses, and why.
REFUSED = {
    "phi4_multimodal": "Phi-4-multimodal is not supported: transformers has its image processor only for "
                       "torchvision (no PIL version), and its images need the checkpoint's vision LoRA switched on "
                       "(a mixture of LoRAs per input kind), which e5v's one merged adapter does not model",
}


def select(config) -> type[Backbone]:
    """The backbone class for a checkpoint's config (by ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise ModelLoadError(f"{REFUSED[model_type]} (model_type {model_type!r})")
    for cls in registered():
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in registered() for t in cls.model_types)
    raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(known)}")


def load_config(name_or_path: str, **hub):
    """The checkpoint's transformers config. A ``config.json`` that asks for the checkpoint's own Python code
    (``auto_map``) or names a ``model_type`` transformers does not know (Phi-3-V, Phi-3.5-V, original InternVL)
    would run only with ``trust_remote_code``: refused, with that reason."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = PretrainedConfig.get_config_dict(name_or_path, **hub)[0]
    model_type = raw.get("model_type")
    if raw.get("auto_map") or (model_type and model_type not in CONFIG_MAPPING):
        raise ModelLoadError(f"{name_or_path}: model_type {model_type!r} needs remote code (the checkpoint's own "
                             "Python files, trust_remote_code), which e5v does not run; use a version of the "
                             "checkpoint that transformers runs natively")
    return AutoConfig.from_pretrained(name_or_path, **hub)


def load_backbone(cfg: EngineConfig) -> Backbone:
    """The backbone of ``cfg.model`` (a hub id or a local checkpoint directory) on ``cfg.device`` in the compute
    ``cfg.dtype``, with the LoRA adapter ``cfg.adapter`` merged into its weights.

    ``cfg.anyres_max_tiles``: speed option of tiling families, a deviation from the official recipe: only grids of
    at most that many tiles (LLaVA-NeXT, 1: the base tile plus one 336-px grid tile, about 2.2x fewer image
    tokens); see :meth:`~e5v.backbones.llava_next.LlavaNextBackbone.limit_anyres`. ``cfg.image_max_pixels``: the
    same as a pixel budget: images resized to at most that many pixels, or as many whole grid tiles
    (:meth:`Backbone.limit_pixels`). Both only lower the checkpoint's own budget.
    """
    if not cfg.model:
        raise ConfigError("no model: give a hub id or a checkpoint directory")
    name_or_path = cfg.model
    hub = {k: v for k, v in {"revision": cfg.revision, "local_files_only": cfg.local_files_only}.items()
           if v is not None}
    local = os.path.isdir(name_or_path)
    if not local and (os.path.exists(name_or_path) or name_or_path.startswith(("/", ".", "~"))):
        raise ModelLoadError(f"{name_or_path}: no such checkpoint directory")
    try:
        model_config = load_config(name_or_path, **hub)
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
    backbone.limit_images(cfg)
    log.info("loaded %s (%s, %s format) on %s in %s", name_or_path, type(backbone).__name__,
             backbone.chat_format, backbone.device, backbone.dtype)
    return backbone


__all__ = ["Backbone", "Features", "load_backbone", "load_config", "register", "select"]
