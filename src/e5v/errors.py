"""One exception family for the whole package; the CLI turns it into a message and an exit code."""
from __future__ import annotations


class E5VError(Exception):
    """Base class of every error e5v raises on purpose."""

    exit_code = 1


class InputError(E5VError):
    """One input item was rejected. Names the item and the reason."""

    exit_code = 2

    def __init__(self, item: str, reason: str):
        self.item = item
        self.reason = reason
        super().__init__(f"{item}: {reason}")


class BatchInputError(E5VError):
    """Some items of a batch were rejected; the others were embedded and travel with the error.

    ``skipped`` is a list of ``(index, InputError)``; ``result`` holds the vectors of the accepted items.
    """

    exit_code = 2

    def __init__(self, skipped, result=None):
        self.skipped = list(skipped)
        self.result = result
        lines = [f"  #{i} {e}" for i, e in self.skipped[:20]]
        more = len(self.skipped) - len(lines)
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__(f"{len(self.skipped)} input item(s) rejected:\n" + "\n".join(lines))


class ModelLoadError(E5VError):
    """A checkpoint could not be loaded or is of an unsupported family."""

    exit_code = 3


class ConfigError(E5VError):
    """An option or a prompt does not fit the model or the task."""

    exit_code = 4
