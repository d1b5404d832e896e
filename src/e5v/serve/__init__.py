"""HTTP serving: an OpenAI-style embeddings API, search over an index, and a search page.

``payload`` turns request bodies into validated items (``sources`` reads their images, ``limits`` bounds them),
``batcher`` runs every request's items on the one model (merged across clients, one forward pass at a time),
``metrics`` counts for ``/metrics``, ``service`` holds what the routes share, ``routes`` has one router per area
(with ``dependencies`` for the API key and the JSON body), ``app`` wires them into a FastAPI app behind the
``responses`` guard, and ``server`` runs it under uvicorn; ``e5v serve`` (:mod:`e5v.cli.serve`) is the verb.
Nothing heavy is imported here, so ``e5v --help`` stays fast.
"""
