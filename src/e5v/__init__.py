"""e5v: universal multimodal embeddings with multimodal LLMs (E5-V, arXiv 2407.12580)."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["E5V", "EmbedResult", "EngineConfig", "Item", "__version__"]

#: where each public name lives (imported on first use)
_HOMES = {"E5V": "encoder", "EmbedResult": "items", "Item": "items", "EngineConfig": "config"}


def __getattr__(name):
    # Lazy: `import e5v` stays cheap (the CLI parses arguments before torch is imported).
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'e5v' has no attribute {name!r}")
