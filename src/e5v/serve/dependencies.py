"""The FastAPI dependencies the routes share: the app's :class:`~e5v.serve.service.Service`, the API key check,
the index (404 without one), and a request's JSON body read under the size limit and the body deadline."""
from __future__ import annotations

import asyncio
import hmac
import json
import sys
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from .errors import RequestError
from .service import Service


async def get_service(request: Request) -> Service:
    return request.app.state.service  # async: a plain def would run in a worker thread


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(request: Request, service: ServiceDep) -> None:
    """With an API key set, the request must send ``Authorization: Bearer <key>`` (401 otherwise)."""
    key = service.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError(401, "missing API key: send 'Authorization: Bearer <key>'", kind="authentication_error")
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise RequestError(401, "wrong API key", kind="authentication_error")


async def require_index(service: ServiceDep):
    """The index served (``e5v.store.open_index``); 404 when the server has none."""
    if service.index is None:
        raise RequestError(404, "this server has no index; start it with --index DIR", kind="not_found")
    return service.index


IndexDep = Annotated[Any, Depends(require_index)]


def json_body(allowed: set[str]):
    """A dependency: the body as a JSON object with no field outside ``allowed``, whose ``model`` (when sent) is
    the served name (404 ``model_not_found`` otherwise)."""

    async def read_json(request: Request, service: ServiceDep) -> dict:
        settings = service.settings
        try:  # a client that trickles its body holds a connection: it gets one deadline for all of it
            raw = await asyncio.wait_for(read_body(request, settings.limits.max_body_bytes), settings.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {settings.body_timeout:g} s") from None
        body = await run_in_threadpool(parse_json, raw)
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(400, f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}",
                               param=unknown[0])
        name = body.get("model")
        if name is not None and name != settings.model_name:
            raise RequestError(404, f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                               param="model", kind="model_not_found")
        return body

    return read_json


async def read_body(request: Request, limit: int) -> bytes:
    """The body's bytes; 413 as soon as it is over ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body too large ({declared} bytes > limit {limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body too large (> limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes):
    """The body as JSON; whatever the bytes, a 400 that says why (never a RecursionError or a ValueError)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise RequestError(400, f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except ValueError:  # an integer longer than Python converts
        raise RequestError(400, f"malformed JSON: a number has more than {sys.get_int_max_str_digits()} digits") \
            from None
