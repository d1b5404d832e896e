"""Run an app under uvicorn: in the foreground (``e5v serve``) or in a background thread (tests, notebooks)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", **options):
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", **options)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(config(app, host, port))
    thread = threading.Thread(target=server.run, name="e5v-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
