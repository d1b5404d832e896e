"""``POST /v1/search`` over the index, ``GET /v1/thumbnail/{id}`` of its images, and the search page at ``/``
(its files, under ``/static``, are mounted on the app by :func:`e5v.serve.app.create_app`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from ..dependencies import IndexDep, ServiceDep, json_body, require_api_key
from ..payload import parse_search
from ..responses import JSON

STATIC = Path(__file__).parent.parent / "static"
FIELDS = {"model", "text", "image", "k", "task", "prompt"}

api = APIRouter(dependencies=[Depends(require_api_key)])
page = APIRouter()


@api.post("/v1/search")
async def search(service: ServiceDep, index: IndexDep, body: Annotated[dict, Depends(json_body(FIELDS))]):
    parsed, vectors, tokens = await service.embed(parse_search, body, service.image_prompt)
    hits = (await run_in_threadpool(index.search, vectors, parsed.k))[0]
    data = [{"id": h.id, "score": float(h.score), "meta": h.meta,
             "thumbnail": f"/v1/thumbnail/{quote(h.id, safe='', errors='surrogateescape')}"
             if h.meta.get("kind") == "image" else None} for h in hits]
    return JSON({"object": "list", "model": service.settings.model_name, "query": {"kind": parsed.kinds[0]},
                 "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@api.get("/v1/thumbnail/{item_id:path}")
async def thumbnail(service: ServiceDep, index: IndexDep, item_id: str, size: int = 256):
    """A JPEG of an image of the index, at most ``size`` (16-512) pixels on its longer side."""
    claim = service.pixels.claim(service.settings.limits.max_request_pixels)
    try:
        data = await run_in_threadpool(service.thumbnails.get, item_id, max(16, min(int(size), 512)), claim)
    finally:
        claim.release()
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@page.get("/")
async def search_page():
    return FileResponse(STATIC / "index.html")
