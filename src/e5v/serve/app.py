"""The FastAPI app: ``/v1/embeddings`` (OpenAI shape, vLLM's chat ``messages`` for images), ``/v1/search``,
``/v1/thumbnail/{id}``, ``/v1/models``, ``/health``, ``/metrics``, and the search page at ``/``.

Bodies are read by the app itself (so a size limit and malformed JSON give clear errors before any work),
images are decoded in worker threads, and every item goes through the one :class:`Batcher`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import threading
import time
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
from .payload import ImageSources, Limits, Parsed, RequestError, parse_embeddings, parse_search


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
    batch_wait_ms: float = 2.0
    thumbnail_cache: int = 512


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
    sources = ImageSources(settings.limits, settings.allow_paths, settings.allow_urls)
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
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.metrics = batcher, metrics

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return JSONResponse(RequestError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse(RequestError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where).body(),
                            status_code=400)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            metrics.observe_request(endpoint, status, time.perf_counter() - start)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise RequestError(401, "missing API key: send 'Authorization: Bearer <key>'", kind="authentication_error")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError(401, "wrong API key", kind="authentication_error")

    async def read_json(request: Request, allowed: set[str]) -> dict:
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
        try:
            body = json.loads(b"".join(chunks))
        except UnicodeDecodeError:
            raise RequestError(400, "the body is not UTF-8 JSON") from None
        except json.JSONDecodeError as err:
            raise RequestError(400, f"malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
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
        parsed = await run_in_threadpool(parse_embeddings, body, settings.limits, sources)
        vectors, tokens = await run(parsed)
        return Response(await run_in_threadpool(embeddings_json, vectors, tokens, fmt, settings.model_name),
                        media_type="application/json")

    @app.post("/v1/search")
    async def search(request: Request):
        check_key(request)
        if index is None:
            raise RequestError(404, "this server has no index; start it with --index DIR", kind="not_found")
        body = await read_json(request, SEARCH_FIELDS)
        parsed, k = await run_in_threadpool(parse_search, body, settings.limits, sources, image_prompt)
        vectors, tokens = await run(parsed)
        hits = (await run_in_threadpool(index.search, vectors, k))[0]
        data = [{"id": h.id, "score": float(h.score), "meta": h.meta,
                 "thumbnail": f"/v1/thumbnail/{quote(h.id, safe='')}" if h.meta.get("kind") == "image" else None}
                for h in hits]
        return JSONResponse({"object": "list", "model": settings.model_name, "query": {"kind": parsed.kinds[0]},
                             "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.get("/v1/thumbnail/{item_id:path}")
    async def thumbnail(request: Request, item_id: str, size: int = 256):
        check_key(request)
        if index is None:
            raise RequestError(404, "this server has no index", kind="not_found")
        data = await run_in_threadpool(thumbs.get, item_id, max(16, min(int(size), 512)))
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

    def get(self, item_id: str, size: int) -> bytes:
        key = (item_id, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = self.index.image_bytes(item_id)
        except OSError as err:
            raise RequestError(404, f"the image of {item_id!r} cannot be read ({err})", kind="not_found") from None
        if data is None:
            raise RequestError(404, f"no image item with id {item_id!r} in the index", param="id", kind="not_found")
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
