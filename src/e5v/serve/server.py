"""Run an app under uvicorn: in the foreground (``e5v serve``) or in a background thread (tests, notebooks).

uvicorn's HTTP/1.1 protocol is used with what it lacks for a server on an open port: a deadline for a
request's headers (a socket that connects and sends nothing, or trickles a header, is closed), a cap on open
connections that closes the longest-idle one to make room (idle sockets cannot starve real clients; when
every connection is busy the newcomer gets a JSON 503), and JSON for the 400 it sends on broken HTTP.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import resource
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import E5VError
from .errors import RequestError

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")
FD_RESERVE = 128  # descriptors kept free for the model, image files, URL fetches and logs


@dataclass(frozen=True)
class Connections:
    """Connection limits: seconds to send a request's headers, seconds a kept-alive connection may idle,
    open connections (further capped by the process's descriptor limit) and the listen backlog."""

    header_timeout: float = 10.0
    keep_alive_timeout: int = 5
    max_connections: int = 1000
    backlog: int = 128

    def connection_cap(self) -> int:
        """At most the descriptor limit less the reserve and less twice the backlog: asyncio accepts up to
        ``backlog`` connections in one burst before any of them can make room, and the connections they evict
        release their descriptors only an event-loop turn later, while the next burst may already be accepted.
        Without that headroom accept() fails with EMFILE and the listener pauses."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(8, min(self.max_connections, soft - FD_RESERVE - 2 * self.backlog))


def _json_bytes(status: int, message: str) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(RequestError(status, message, kind=kind).body()).encode()


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a connection cap that evicts idle connections, and JSON
    bodies on the errors it answers itself."""

    def __init__(self, *args, header_timeout: float, cap: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.cap = cap
        self.last_active = time.monotonic()
        self._header_timer = None

    # --- idle / header deadline ------------------------------------------------------------------------
    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state in (h11.IDLE, h11.DONE) and (self.cycle is None or self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()
        if len(self.connections) > self.cap:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11)
                and c._waiting_for_headers() and not c.transport.is_closing()]
        if idle:
            oldest = min(idle, key=lambda c: c.last_active)
            log.warning("%d connections open (cap %d): closing the longest-idle one", len(self.connections), self.cap)
            oldest.transport.close()
            return
        log.warning("%d connections open (cap %d), all busy: refusing a new one", len(self.connections), self.cap)
        self._answer_and_close(503, "Service Unavailable",
                               "server busy: too many open connections; retry later")

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        super().on_response_complete()  # arms uvicorn's keep-alive timer, or handles a pipelined request
        if self._waiting_for_headers():
            self._disarm_header_timer()
            self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    # --- answers uvicorn gives itself ------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._answer_and_close(400, "Bad Request", f"malformed HTTP request: {msg}")

    def _answer_and_close(self, status: int, reason: str, message: str) -> None:
        """Written raw: h11 cannot answer a connection that has sent no request (or a broken one)."""
        body = _json_bytes(status, message)
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n")
        if not self.transport.is_closing():
            self.transport.write(head.encode() + body)
            self.transport.close()


def config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
           connections: Connections | None = None, **options):
    import uvicorn

    c = connections or Connections()
    protocol = functools.partial(GuardedH11, header_timeout=c.header_timeout, cap=c.connection_cap())
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol,
                          timeout_keep_alive=c.keep_alive_timeout, backlog=c.backlog, **options)


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket on ``host:port``, bound before anything is announced; a taken port is a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=backlog)
    except OSError as err:
        why = "the address is already in use (another server on this port?)" if err.errno == errno.EADDRINUSE \
            else (err.strerror or str(err))
        raise E5VError(f"cannot listen on {host}:{port}: {why}") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
            connections: Connections | None = None) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields its base URL and stops it on exit."""
    import uvicorn

    c = connections or Connections()
    sock = listen(host, port or 0, c.backlog)
    port = sock.getsockname()[1]
    server = uvicorn.Server(config(app, host, port, connections=c))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="e5v-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
