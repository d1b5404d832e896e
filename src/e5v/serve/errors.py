""":class:`RequestError`: a request the server refuses, in the shape OpenAI clients parse."""
from __future__ import annotations

import logging

from ..errors import E5VError, InputError

log = logging.getLogger(__name__)


class RequestError(E5VError):
    """A request the server refuses: ``status`` (4xx, or 503 when busy), ``param`` the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status = status
        self.param = param
        self.kind = kind
        super().__init__(message)

    @classmethod
    def from_input(cls, err: InputError) -> "RequestError":
        """A rejected item's 400: its public reason only (an internal exception's text stays in the log)."""
        if err.public_reason != err.reason:
            log.warning("%s", err)
        return cls(400, f"{err.item}: {err.public_reason}", param=err.item)

    def body(self, request_id: str | None = None) -> dict:
        """The error in OpenAI's shape (what OpenAI clients parse), with the request id the server log names."""
        out = {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}
        if request_id is not None:
            out["request_id"] = request_id
        return {"error": out}
