"""The FastAPI app: :func:`create_app` builds the :class:`~e5v.serve.service.Service` that the routes share and
puts the routers of :mod:`e5v.serve.routes` behind the :class:`~e5v.serve.responses.Guard`.

Bodies are read by the app itself (so a size limit and malformed JSON give clear errors before any work),
images are counted against the pixel budget and decoded in worker threads, and every item goes through the
one :class:`~e5v.serve.batcher.RequestBatcher`. Every answer is JSON: an exception that escapes a handler is
logged with a request id and answered with that id only (the id is also in the ``X-Request-Id`` header of every
response).
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .responses import JSON, Guard, add_error_handlers
from .routes import embeddings, operations, search
from .service import Service, Settings


def create_app(model, settings: Settings, index=None) -> FastAPI:
    """An app serving ``model`` (an :class:`e5v.E5V`) and, when given, ``index`` (``e5v.store.open_index``);
    ``app.state.service`` is their :class:`~e5v.serve.service.Service`."""
    service = Service(model, settings, index)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()

    app = FastAPI(title="e5v", description="E5-V embeddings and search", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    app.state.service = service
    app.add_middleware(Guard, metrics=service.metrics)
    add_error_handlers(app)
    for router in (embeddings.router, search.api, operations.router, search.page):
        app.include_router(router)
    # on the app itself: include_router drops a router's mounts in some FastAPI versions that we support
    app.mount("/static", StaticFiles(directory=search.STATIC), name="static")
    return app
