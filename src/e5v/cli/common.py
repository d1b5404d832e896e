"""What every verb shares: the model flags (generated from :class:`~e5v.config.EngineConfig`), loading the model
they describe, the exit statuses, and reporting rejected items once."""
from __future__ import annotations

import argparse
import contextlib
import logging

from ..config import EngineConfig, count

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_SKIPPED", "add_model_args", "count", "engine_config",
           "items_reported_here", "load_model"]

#: exit statuses of every verb: done, an error (one line on stderr), bad usage, done with skipped items
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    """The engine's flags: one per :class:`~e5v.config.EngineConfig` field."""
    EngineConfig.add_arguments(p, model_required=model_required)


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The engine configuration of parsed model flags; ``overrides``: options the verb sets itself."""
    return EngineConfig.from_args(args, **overrides)


def load_model(args: argparse.Namespace, **overrides):
    """The engine for the model flags (quietly with ``--no-progress``); ``overrides``: more engine options
    (``e5v eval`` sets the official protocols' ones)."""
    from ..encoder import load_engine

    return load_engine(engine_config(args, **overrides), progress=not getattr(args, "no_progress", False))


class _ItemRejections(logging.Filter):
    """Passes every record but the engine's "skipped <InputError>" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ..errors import InputError

        return not (isinstance(record.args, tuple) and record.args and isinstance(record.args[0], InputError))


@contextlib.contextmanager
def items_reported_here():
    """While a verb reports the rejected items itself, drop the engine's own log line for each one, so that every
    rejection is reported once."""
    engine_log, drop = logging.getLogger("e5v.encoder"), _ItemRejections()
    engine_log.addFilter(drop)
    try:
        yield
    finally:
        engine_log.removeFilter(drop)
