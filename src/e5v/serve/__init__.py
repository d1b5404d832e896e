"""HTTP serving: an OpenAI-style embeddings API, search over an index, and a search page.

``payload`` turns request bodies into validated items, ``batcher`` runs every request's items on the one
model (merged across clients, one forward pass at a time), ``metrics`` counts for ``/metrics``, ``app``
wires them into a FastAPI app, ``server`` runs it under uvicorn, ``cli`` adds the ``e5v serve`` verb.
Nothing heavy is imported here, so ``e5v --help`` stays fast.
"""
