"""``POST /v1/embeddings``: OpenAI's shape, with vLLM's chat ``messages`` for images."""
from __future__ import annotations

import base64
import json
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..dependencies import ServiceDep, json_body, require_api_key
from ..errors import RequestError
from ..payload import parse_embeddings

FIELDS = {"model", "input", "messages", "encoding_format", "dimensions", "user", "task", "prompt"}

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/embeddings")
async def embeddings(service: ServiceDep, body: Annotated[dict, Depends(json_body(FIELDS))]):
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
    pca = reduction(service, body.get("dimensions"))
    _, vectors, tokens = await service.embed(parse_embeddings, body)
    if pca is not None:
        vectors = pca.apply(vectors)
    return Response(await run_in_threadpool(embeddings_json, vectors, tokens, fmt, service.settings.model_name),
                    media_type="application/json")


def reduction(service, dims):
    """The PCA that gives ``dims``-d vectors: None for the model's own width (or no ``dimensions``), the served
    index's PCA for the width of its search codes (the vectors those codes were made from, re-normalised);
    any other size is a 400 that names the sizes this server gives."""
    full = service.model.dim
    if dims is None or dims == full:
        return None
    index = service.index
    reduced = (index.info.get("codes") or {}).get("dims") if index is not None else None
    if reduced is not None and dims == reduced:
        return index.transform()[1]
    sizes = f"{full} (the model's width)" + (f" or {reduced} (the PCA of the served index)" if reduced else "")
    raise RequestError(400, f"dimensions: this server gives {sizes}, not {dims!r}; the model is not trained to be "
                            "truncated (no Matryoshka)", param="dimensions")


def embeddings_json(vectors: np.ndarray, tokens: int, fmt: str, model_name: str) -> bytes:
    """The OpenAI embeddings response (built off the event loop: 64 x 4096 floats take a while to print)."""
    if fmt == "base64":  # little-endian float32 bytes, as OpenAI sends them
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return json.dumps({"object": "list", "model": model_name,
                       "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()
