"""``e5v serve``: the embeddings API, search over an index, and the search page, on one port."""
from __future__ import annotations

import argparse
import os
import sys

MiB = 1 << 20


def add_parsers(sub) -> None:
    from .common import add_model_args

    p = sub.add_parser(
        "serve", help="serve an OpenAI-style embeddings API, search over an index, and a search page",
        description="Serve POST /v1/embeddings (OpenAI shape; images as chat messages with image_url data URIs, "
                    "as vLLM accepts), POST /v1/search and the search page at / (with --index), GET /health "
                    "and GET /metrics. Requests from all clients are batched together on the model.")
    add_model_args(p)
    p.add_argument("--index", help="index directory (e5v index build) to search and show on the page")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("E5V_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $E5V_API_KEY)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name of /v1/models and of every answer; a request may send it as 'model' or leave "
                        "'model' out, and one that sends another name gets 404 model_not_found (default: the "
                        "--model value as given, e.g. royokong/e5-v)")
    p.add_argument("--allow-local-paths", nargs="+", default=[], metavar="DIR",
                   help="let requests name image files under these folders (off by default)")
    p.add_argument("--allow-urls", nargs="+", default=[], metavar="PREFIX",
                   help="let requests name image URLs starting with these prefixes, e.g. https://cdn.example.com/img/ "
                        "(off by default; checked on the percent-decoded URL, dot segments refused, redirects not "
                        "followed)")
    p.add_argument("--url-timeout", type=float, default=10.0,
                   help="seconds one image URL fetch may take in all (default 10)")
    lim = p.add_argument_group("limits per request")
    lim.add_argument("--max-items", type=int, default=64, help="items per /v1/embeddings request (default 64)")
    lim.add_argument("--max-body-mb", type=float, default=32, help="request body size in MiB (default 32)")
    lim.add_argument("--max-image-mb", type=float, default=16, help="encoded size of one image in MiB (default 16)")
    lim.add_argument("--max-pixels", type=int, default=40_000_000,
                     help="width x height of one image, checked before decoding (default 40M)")
    lim.add_argument("--max-request-pixels", type=int, default=64_000_000,
                     help="pixels of all images of one request, counted from their headers before decoding; "
                          "more is refused with 413 (default 64M)")
    lim.add_argument("--max-text-chars", type=int, default=20_000, help="characters of one text (default 20000)")
    lim.add_argument("--max-k", type=int, default=100, help="largest k for /v1/search (default 100)")
    bat = p.add_argument_group("batching")
    bat.add_argument("--max-batch-items", type=int, default=256,
                     help="items merged into one model call (two such groups are held prepared at most: one "
                          "running, the next preprocessed meanwhile)")
    bat.add_argument("--max-queue-items", type=int, default=4096, help="items waiting before 503 'busy'")
    bat.add_argument("--max-queue-pixels", type=int, default=128_000_000,
                     help="image pixels held by all requests together, counted from their headers, before 503 "
                          "'busy' (decoding and preprocessing cost about 18 bytes a pixel at peak; default 128M)")
    bat.add_argument("--batch-wait-ms", type=float, default=2.0,
                     help="how long the model waits for more requests to merge (default 2 ms)")
    con = p.add_argument_group("connections")
    con.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection has to send a request's headers (default 10)")
    con.add_argument("--keep-alive-timeout", type=int, default=5,
                     help="seconds an idle kept-alive connection stays open (default 5)")
    con.add_argument("--body-timeout", type=float, default=60.0,
                     help="seconds a request has to send its body (default 60)")
    con.add_argument("--max-connections", type=int, default=1000,
                     help="open connections; at the cap the longest-idle one is closed to make room, and when all "
                          "are busy a newcomer gets 503 (default 1000, and at most the descriptor limit - 128 - "
                          "twice the backlog)")
    con.add_argument("--backlog", type=int, default=128, help="connections waiting to be accepted (default 128)")
    p.set_defaults(run=run_serve)


def serve_settings(args: argparse.Namespace):
    """The server's :class:`~e5v.serve.service.Settings` from the parsed flags; the served name is
    ``--served-model-name``, else the ``--model`` value as given."""
    from ..serve.service import Settings
    from ..serve.limits import Limits

    limits = Limits(max_items=args.max_items, max_body_bytes=int(args.max_body_mb * MiB),
                    max_image_bytes=int(args.max_image_mb * MiB), max_pixels=args.max_pixels,
                    max_request_pixels=args.max_request_pixels, max_text_chars=args.max_text_chars, max_k=args.max_k)
    return Settings(model_name=args.served_model_name or args.model, api_key=args.api_key, limits=limits,
                    allow_paths=tuple(args.allow_local_paths), allow_urls=tuple(args.allow_urls),
                    max_batch_items=args.max_batch_items, max_queue_items=args.max_queue_items,
                    max_queue_pixels=args.max_queue_pixels, batch_wait_ms=args.batch_wait_ms,
                    url_timeout=args.url_timeout, body_timeout=args.body_timeout)


def serve_config(args: argparse.Namespace, index=None):
    """The engine's :class:`~e5v.config.EngineConfig`: the model flags, with the server's ``--max-pixels`` (so
    that the engine does not refuse a decoded image the request checks allowed); with ``index``, the vector
    options the flags leave open are the index's, as ``e5v search`` takes them, so that queries land in the
    index's vector space."""
    from ..store.indexing import index_config
    from .common import engine_config

    config = engine_config(args, max_pixels=args.max_pixels)
    return config if index is None else index_config(index.manifest, config)


def index_mismatch(info: dict, served) -> str | None:
    """A warning when the index was built with another model or adapter than ``served``'s (an
    :class:`~e5v.config.EngineConfig` or the parsed flags); the index records local checkpoints as absolute
    paths: compared the same way."""
    from ..config import checkpoint_path

    built = info.get("model"), info.get("adapter")
    if built == (checkpoint_path(served.model), checkpoint_path(served.adapter)):
        return None
    return (f"the index was built with {built[0]} (adapter {built[1]}); queries are embedded with {served.model} "
            f"(adapter {served.adapter})")


def run_serve(args: argparse.Namespace) -> int:
    from ..encoder import E5V
    from ..serve.app import create_app
    from ..serve.server import LOOPBACK, Connections, config, listen
    from .common import EXIT_ERROR, EXIT_OK, EXIT_USAGE

    if args.host not in LOOPBACK and not args.api_key:
        print(f"e5v serve: warning: binding {args.host} without --api-key: anyone who can reach this port can use "
              "the model", file=sys.stderr)
    for d in args.allow_local_paths:
        if not os.path.isdir(d):
            print(f"e5v serve: error: --allow-local-paths {d}: not a folder", file=sys.stderr)
            return EXIT_USAGE
    settings = serve_settings(args)
    connections = Connections(header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
                              max_connections=args.max_connections, backlog=args.backlog)
    sock = listen(args.host, args.port, connections.backlog)  # a taken port fails here, before anything is loaded
    try:
        index = None
        if args.index:
            from ..store import open_index

            index = open_index(args.index)
        engine = serve_config(args, index)
        if index is not None and (warning := index_mismatch(index.info, engine)):
            print(f"e5v serve: warning: {warning}", file=sys.stderr)
        model = E5V.from_pretrained(config=engine)
        app = create_app(model, settings, index)
        import uvicorn

        what = f", index {args.index} ({index.info.get('count')} items)" if index is not None else ""
        port = sock.getsockname()[1]  # the one bound (--port 0 picks a free one)
        print(f"serving {settings.model_name} ({model.dim}-d){what} on http://{args.host}:{port}", flush=True)
        server = uvicorn.Server(config(app, args.host, port, log_level="info" if args.verbose else "warning",
                                       connections=connections))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised Ctrl-C
            pass
    finally:
        sock.close()
    m = app.state.service.metrics
    requests = sum(m.requests.values())
    errors = sum(n for (_, status), n in m.requests.items() if status >= 400)
    print(f"stopped: served {requests} requests ({errors} errors), embedded {sum(m.items.values())} items")
    return EXIT_OK if server.started else EXIT_ERROR
