"""Every answer is JSON with a request id: the :class:`JSON` response class, the :class:`Guard` middleware (an id in
``X-Request-Id`` on every response, the request counted for ``/metrics``, an escaped exception answered with a
JSON 500 naming the id only), and the handlers that turn FastAPI's own errors into OpenAI-shaped bodies."""
from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import RequestError
from .metrics import Metrics

log = logging.getLogger(__name__)


class JSON(JSONResponse):
    """JSON with non-ASCII escaped: encodable whatever a request held (lone surrogates, odd field names)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def request_id(request: Request) -> str | None:
    return request.scope.get("e5v.request_id")


class Guard:
    """The outermost layer: gives each request an id (``X-Request-Id``), counts it for ``/metrics``, and
    answers an exception that escaped the app with a JSON 500 naming the id (the traceback goes to the log,
    never to the client)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope["e5v.request_id"] = uuid.uuid4().hex[:16]
        start, status, started = time.perf_counter(), 500, False

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %r) failed", rid, scope.get("method"), scope.get("path"))
            if not started:  # once a response is under way, closing the connection is all that is left
                err = RequestError(500, f"internal server error (request id {rid}; the server log has the details)",
                                   kind="server_error")
                body = JSON(err.body(rid)).body
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send_with_id({"type": "http.response.body", "body": body})
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "other"
            self.metrics.observe_request(endpoint, status, time.perf_counter() - start)


def add_error_handlers(app: FastAPI) -> None:
    """Refusals (:class:`RequestError`), FastAPI's HTTP errors (404, 405) and its validation errors, as JSON
    errors in OpenAI's shape with the request id."""

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSON(err.body(request_id(request)), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSON(RequestError(err.status_code, str(err.detail)).body(request_id(request)),
                    status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSON(RequestError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where)
                    .body(request_id(request)), status_code=400)
