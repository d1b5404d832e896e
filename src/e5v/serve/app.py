"""The FastAPI app: ``/v1/embeddings`` (OpenAI shape, vLLM's chat ``messages`` for images), ``/v1/search``,
``/v1/thumbnail/{id}``, ``/v1/models``, ``/health``, ``/metrics``, and the search page at ``/``.

Bodies are read by the app itself (so a size limit and malformed JSON give clear errors before any work),
images are counted against the pixel budget and decoded in worker threads, and every item goes through the
one :class:`Batcher`. Every answer is JSON: an exception that escapes a handler is logged with a request id
and answered with that id only (the id is also in the ``X-Request-Id`` header of every response).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, InputError
from ..inputs import load_image
from .batcher import Batcher
from .metrics import Metrics
from .payload import ImageSources, Limits, Parsed, PixelBudget, RequestError, parse_embeddings, parse_search

log = logging.getLogger(__name__)


STATIC = Path(__file__).with_name("static")
EMBEDDINGS_FIELDS = {"model", "input", "messages", "encoding_format", "dimensions", "user", "task", "prompt"}
SEARCH_FIELDS = {"model", "text", "image", "k", "task", "prompt"}


@dataclass
class Settings:
    """What the operator chose: the served model name, the API key, the allow-lists and the limits."""

    model_name: str
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    allow_paths: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    max_batch_items: int = 256
    max_queue_items: int = 4096
    max_queue_pixels: int = 128_000_000
    batch_wait_ms: float = 2.0
    thumbnail_cache: int = 512
    url_timeout: float = 10.0
    body_timeout: float = 60.0


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


def create_app(model, settings: Settings, index=None) -> FastAPI:
    """An app serving ``model`` (an :class:`e5v.E5V`) and, when given, ``index`` (``e5v.store.open_index``)."""
    if index is not None:
        info = index.info
        if int(info.get("dim", model.dim)) != model.dim:
            raise ConfigError(f"the index holds {info.get('dim')}-d vectors but the model gives {model.dim}-d; "
                              "serve the model the index was built with")
    metrics = Metrics()
    batcher = Batcher(model, metrics=metrics, max_batch_items=settings.max_batch_items,
                      max_queue_items=settings.max_queue_items, wait_ms=settings.batch_wait_ms)
    if settings.max_queue_pixels < settings.limits.max_request_pixels:
        raise ConfigError(f"the server's pixel budget ({settings.max_queue_pixels}) must hold at least one request's "
                          f"({settings.limits.max_request_pixels})")
    pixels = PixelBudget(settings.max_queue_pixels)
    sources = ImageSources(settings.limits, settings.allow_paths, settings.allow_urls, settings.url_timeout)
    thumbs = Thumbnails(index, settings.limits, settings.thumbnail_cache)
    image_prompt = ((index.info.get("prompt") or {}).get("image") if index is not None else None) or None

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="e5v", description="E5-V embeddings and search", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    app.state.batcher, app.state.metrics, app.state.pixels = batcher, metrics, pixels
    app.add_middleware(Guard, metrics=metrics)

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

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "missing API key: send 'Authorization: Bearer <key>'", kind="authentication_error")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(401, "wrong API key", kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        limit = settings.limits.max_body_bytes
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

    async def read_json(request: Request, allowed: set[str]) -> dict:
        try:  # a client that trickles its body holds a connection: it gets one deadline for all of it
            raw = await asyncio.wait_for(read_body(request), settings.body_timeout)
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

    async def run(parsed: Parsed) -> tuple[np.ndarray, int]:
        """Vectors of every item in request order, and the total tokens; one batcher job per prompt."""
        groups = list(parsed.groups().items())
        results = await asyncio.gather(*(batcher.embed([parsed.items[i] for i in pos], p, parsed.kinds[pos[0]])
                                         for p, pos in groups))
        vectors = np.zeros((len(parsed.items), model.dim), dtype=np.float32)
        tokens = 0
        for (_, pos), (vec, tok) in zip(groups, results):
            vectors[pos] = vec
            tokens += int(tok.sum())
        return vectors, tokens

    async def embed_request(parse, *args) -> tuple[Parsed, np.ndarray, int]:
        """Parse (the images counted on a claim on the pixel budget, then decoded) and embed; the claim is held
        until the vectors are back."""
        claim = pixels.claim(settings.limits.max_request_pixels)
        try:
            parsed = await run_in_threadpool(parse, *args, claim)
            vectors, tokens = await run(parsed)
        finally:
            claim.release()
        return parsed, vectors, tokens

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_key(request)
        body = await read_json(request, EMBEDDINGS_FIELDS)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}",
                               param="encoding_format")
        dims = body.get("dimensions")
        if dims is not None and dims != model.dim:
            raise RequestError(400, f"dimensions: this model gives {model.dim}-d vectors and is not trained to be "
                                    "truncated (no Matryoshka); leave dimensions out", param="dimensions")
        _, vectors, tokens = await embed_request(parse_embeddings, body, settings.limits, sources)
        return Response(await run_in_threadpool(embeddings_json, vectors, tokens, fmt, settings.model_name),
                        media_type="application/json")

    @app.post("/v1/search")
    async def search(request: Request):
        check_key(request)
        if index is None:
            raise RequestError(404, "this server has no index; start it with --index DIR", kind="not_found")
        body = await read_json(request, SEARCH_FIELDS)
        parsed, vectors, tokens = await embed_request(parse_search, body, settings.limits, sources, image_prompt)
        hits = (await run_in_threadpool(index.search, vectors, parsed.k))[0]
        data = [{"id": h.id, "score": float(h.score), "meta": h.meta,
                 "thumbnail": f"/v1/thumbnail/{quote(h.id, safe='', errors='surrogateescape')}"
                 if h.meta.get("kind") == "image" else None} for h in hits]
        return JSON({"object": "list", "model": settings.model_name, "query": {"kind": parsed.kinds[0]},
                     "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/thumbnail/{item_id:path}")
    async def thumbnail(request: Request, item_id: str, size: int = 256):
        check_key(request)
        if index is None:
            raise RequestError(404, "this server has no index", kind="not_found")
        claim = pixels.claim(settings.limits.max_request_pixels)
        try:
            data = await run_in_threadpool(thumbs.get, item_id, max(16, min(int(size), 512)), claim)
        finally:
            claim.release()
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "e5v"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "dim": model.dim, "auth": settings.api_key is not None,
                "index": None if index is None else {"count": int(index.info.get("count", 0)),
                                                      "model": index.info.get("model")},
                "queued_items": batcher.queued_items}

    @app.get("/metrics")
    async def prometheus(request: Request):
        check_key(request)
        gauges = {"e5v_queued_items": ("Items waiting for the model.", batcher.queued_items)}
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


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


def embeddings_json(vectors: np.ndarray, tokens: int, fmt: str, model_name: str) -> bytes:
    """The OpenAI embeddings response (built off the event loop: 64 x 4096 floats take a while to print)."""
    if fmt == "base64":  # little-endian float32 bytes, as OpenAI sends them
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return json.dumps({"object": "list", "model": model_name,
                       "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


class Thumbnails:
    """Downscaled JPEGs of the index's own image items (files or tar-shard members), cached (LRU) by id and size."""

    def __init__(self, index, limits: Limits, capacity: int):
        self.index = index
        self.limits = limits
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, item_id: str, size: int, claim=None) -> bytes:
        key = (item_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = self.index.image_bytes(item_id)
        except OSError as err:
            log.warning("thumbnail of %r: %s", item_id, err)
            raise RequestError(404, f"the image of {item_id!r} cannot be read ({err.strerror or type(err).__name__})",
                               kind="not_found") from None
        if data is None:
            raise RequestError(404, f"no image item with id {item_id!r} in the index", param="id", kind="not_found")
        if claim is not None:
            claim.add_image(data, item_id, self.limits.max_pixels)
        try:
            im = load_image(data, item=item_id, max_pixels=self.limits.max_pixels)
        except InputError as err:
            raise RequestError(404, f"the image of {item_id!r} cannot be read: {err.reason}", kind="not_found") from None
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data
