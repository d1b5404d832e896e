"""e5v: universal multimodal embeddings with multimodal LLMs (E5-V, arXiv 2407.12580)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["E5V", "EmbedResult", "Item", "__version__"]


def __getattr__(name):
    # Lazy: `import e5v` stays cheap (the CLI parses arguments before torch is imported).
    if name in ("E5V", "EmbedResult", "Item"):
        from . import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'e5v' has no attribute {name!r}")
