"""Query vectors for an index: a text, an image, or an image plus a modification text (composed)."""
from __future__ import annotations

import numpy as np

from .. import prompts
from ..errors import ConfigError


def embed_query(model, info: dict, *, text: str | None = None, image=None, task: str = "cirr") -> np.ndarray:
    """One query vector (dim,) from ``model`` (an :class:`e5v.E5V`) for the index described by ``info``.

    A text uses the E5-V text prompt; an image uses the prompt the index gave its images, so that an image finds
    itself; an image with a text is a composed query with the query prompt of ``task`` (cirr, fashioniq-*).
    ``image`` is a path, bytes or a PIL image. Bad input raises :class:`e5v.errors.BatchInputError`.
    """
    if text is None and image is None:
        raise ConfigError("a query needs a text, an image, or both")
    if model.dim != info.get("dim", model.dim):
        raise ConfigError(f"the model gives {model.dim}-d vectors but the index at {info.get('path')} holds "
                          f"{info['dim']}-d vectors of {info['model']}")
    if image is None:
        return model.encode_text([text], prompt=prompts.TEXT)[0]
    if text is None:
        return model.encode_image([image], prompt=info["prompt"].get("image") or prompts.IMAGE_PROMPT)[0]
    return model.encode_composed([(image, text)], task=task)[0]
