"""What operators and clients ask about the server: ``GET /v1/models``, ``GET /health`` (open, for probes) and
``GET /metrics`` (Prometheus text)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from ..dependencies import ServiceDep, require_api_key

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(service: ServiceDep):
    return {"object": "list", "data": [{"id": service.settings.model_name, "object": "model", "owned_by": "e5v"}]}


@router.get("/health")
async def health(service: ServiceDep):
    index = service.index
    return {"status": "ok", "model": service.settings.model_name, "dim": service.model.dim,
            "auth": service.settings.api_key is not None,
            "index": None if index is None else {"count": int(index.info.get("count", 0)),
                                                  "model": index.info.get("model")},
            "queued_items": service.batcher.queued_items}


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(service: ServiceDep):
    gauges = {"e5v_queued_items": ("Items waiting for the model.", service.batcher.queued_items)}
    return PlainTextResponse(service.metrics.render(gauges), media_type="text/plain; version=0.0.4")
