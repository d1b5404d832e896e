"""Backbone families behind one registry. Adding a family is adding one module and importing it here."""
from __future__ import annotations

from ..errors import ModelLoadError
from .base import Backbone, Features, register, registered
from . import llava, llava_next, qwen2_vl  # noqa: F401  (registration)


def select(config) -> type[Backbone]:
    """The backbone class for a checkpoint's config (by ``model_type``)."""
    model_type = getattr(config, "model_type", None)
    for cls in registered():
        if model_type in cls.model_types:
            return cls
    known = sorted(t for cls in registered() for t in cls.model_types)
    raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {', '.join(known)}")


__all__ = ["Backbone", "Features", "register", "select"]
