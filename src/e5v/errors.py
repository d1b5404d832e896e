"""One exception family for the whole package; the CLI turns each into one line on stderr and exit status 1."""
from __future__ import annotations


class E5VError(Exception):
    """Base class of every error e5v raises on purpose."""


def safe_text(s) -> str:
    """``s`` as a str that UTF-8 can encode: a lone surrogate (from a hostile text or an undecodable file name)
    becomes its backslash escape, so that a message about bad input can always be logged, printed or sent."""
    s = str(s)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


class InputError(E5VError):
    """One input item was rejected. Names the item and the reason (both always encodable, see :func:`safe_text`).

    ``public_reason`` is what a server may tell a remote client: the reason itself, except where the reason quotes
    an internal exception's text (then only its type; the full reason belongs in the server's log)."""

    def __init__(self, item: str, reason: str, public_reason: str | None = None):
        self.item = safe_text(item)
        self.reason = safe_text(reason)
        self.public_reason = self.reason if public_reason is None else safe_text(public_reason)
        super().__init__(f"{self.item}: {self.reason}")

    def __reduce__(self):  # pickled with its arguments, so that it can cross process boundaries
        return type(self), (self.item, self.reason, self.public_reason)


class BatchInputError(E5VError):
    """Some items of a batch were rejected; the others were embedded and travel with the error.

    ``skipped`` is a list of ``(index, InputError)``; ``result`` holds the vectors of the accepted items.
    """

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


class ConfigError(E5VError):
    """An option or a prompt does not fit the model or the task."""


class IndexDamagedError(E5VError):
    """An index folder on disk does not match its manifest (a file missing, cut short, swapped or edited).
    Names the partition and the problem; ``e5v index verify`` lists all, ``e5v index repair`` re-embeds them."""
