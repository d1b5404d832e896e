"""The HTTP routes, one router per area: ``embeddings`` (``/v1/embeddings``), ``search`` (``/v1/search``,
``/v1/thumbnail/{id}`` and the search page at ``/``) and ``operations`` (``/v1/models``, ``/health``, ``/metrics``).
Each takes what it needs through :mod:`e5v.serve.dependencies`."""
