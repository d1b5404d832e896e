"""Where a request's images may come from, and reading them: data URIs always; local files and URLs only where
the operator allowed them (:class:`ImageSources`). A URL is checked on its normalised form and fetched within one
total deadline; every image's header pixels go on the request's :class:`~e5v.serve.limits.Claim` before any
image of the request is decoded, with the limits of :func:`e5v.images.load_image`.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import os
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from PIL import Image

from ..errors import ConfigError, InputError
from ..images import load_image
from .errors import RequestError
from .limits import Claim, Limits


@dataclass
class Pending:
    """An image whose source is allowed and whose pixels are counted, not decoded yet."""

    src: bytes | str
    name: str


@dataclass
class ImageSources:
    """Where a request's image may come from: data URIs always; local files only under ``allow_paths``
    (real paths, symlinks resolved); URLs only under one of ``allow_urls`` (prefixes, compared with the URL
    normalised: percent-decoded, dot segments refused; redirects not followed), fetched within ``url_timeout``
    seconds in all."""

    limits: Limits = field(default_factory=Limits)
    allow_paths: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    url_timeout: float = 10.0

    def __post_init__(self):
        self.allow_paths = tuple(os.path.realpath(p) for p in self.allow_paths)
        self.allow_urls = tuple(normalise_prefix(p) for p in self.allow_urls)

    def load(self, url, name: str, claim: Claim | None = None) -> Pending:
        """The image's bytes (or allowed real path), its header's pixels put on ``claim``; decoded later by
        :meth:`decode`, once every image of the request has been counted."""
        if not isinstance(url, str):
            raise RequestError(400, f"{name}: image_url.url must be a string, got {type(url).__name__}", param=name)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            src = decode_data_uri(url, name, self.limits.max_image_bytes)
        elif scheme in ("http", "https"):
            src = self._fetch(url, name)
        elif scheme == "file" or url.startswith("/"):
            src = self._allowed_path(unquote(urlsplit(url).path) if scheme == "file" else url, name)
        else:
            raise RequestError(400, f"{name}: unsupported image URL {url[:40]!r}; send a data URI "
                                    "(data:image/png;base64,...)", param=name)
        if claim is not None:
            claim.add_image(src, name, self.limits.max_pixels)
        return Pending(src, name)

    def decode(self, image: Pending) -> Image.Image:
        try:
            return load_image(image.src, item=image.name, allow_paths=True, max_bytes=self.limits.max_image_bytes,
                              max_pixels=self.limits.max_pixels)
        except InputError as err:
            raise RequestError.from_input(err) from None

    def _allowed_path(self, path: str, name: str) -> str:
        if not self.allow_paths:
            raise RequestError(403, f"{name}: this server does not read local paths (the operator can allow "
                                    "folders with --allow-local-paths); send a data URI instead",
                               param=name, kind="permission_error")
        real = os.path.realpath(path)
        if not os.path.isabs(path) or not any(os.path.commonpath([real, d]) == d for d in self.allow_paths):
            raise RequestError(403, f"{name}: the path {path!r} is outside the folders this server may read",
                               param=name, kind="permission_error")
        return real

    def _fetch(self, url: str, name: str) -> bytes:
        if not self.allow_urls:
            raise RequestError(403, f"{name}: this server does not fetch URLs (the operator can allow URL "
                                    "prefixes with --allow-urls); send a data URI instead",
                               param=name, kind="permission_error")
        try:
            norm = normalise_url(url)
        except ValueError as err:
            raise RequestError(400, f"{name}: {err}", param=name) from None
        if not any(norm.startswith(p) for p in self.allow_urls):
            raise RequestError(403, f"{name}: the URL is outside the prefixes this server may fetch",
                               param=name, kind="permission_error")
        return fetch(url, name, self.url_timeout, self.limits.max_image_bytes)


_UNSAFE = re.compile(r"[\x00-\x20\x7f\\]")  # controls (CR/LF included), spaces and backslashes
_UNSAFE_DECODED = re.compile(r"[\x00-\x1f\x7f\\]")


def normalise_url(url: str) -> str:
    """``scheme://host[:port]/path[?query]`` with the path percent-decoded and the host lower-cased, for the
    allow-list check; raises ``ValueError`` for URLs that could mean something else to the upstream server
    (credentials, control characters, dot segments however encoded)."""
    if _UNSAFE.search(url):
        raise ValueError("the URL holds spaces, control characters or backslashes")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None or not parts.hostname:
        raise ValueError("URLs with credentials or without a host are refused")
    path = parts.path or "/"
    for _ in range(3):  # %252e decodes to %2e on a second pass: decode until it stops changing
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    if _UNSAFE_DECODED.search(path) or any(seg in (".", "..") for seg in path.split("/")) or "%" in path:
        raise ValueError("URLs with dot segments (also percent-encoded) or encoded control characters are refused")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the URL has an invalid port") from None
    default = {"http": 80, "https": 443}[parts.scheme.lower()]
    host = parts.hostname.rstrip(".") + (f":{port}" if port not in (None, default) else "")
    return f"{parts.scheme.lower()}://{host}{path}" + (f"?{parts.query}" if parts.query else "")


def normalise_prefix(prefix: str) -> str:
    """An allowed URL prefix, normalised like a request's URL; its host part always ends with ``/``, so that
    ``http://a`` cannot admit ``http://a.evil``."""
    parts = urlsplit(prefix)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"allowed URL prefix {prefix!r} must start with http:// or https:// and a host")
    try:
        return normalise_url(prefix if parts.path else prefix + "/")
    except ValueError as err:
        raise ConfigError(f"allowed URL prefix {prefix!r}: {err}") from None


def fetch(url: str, name: str, timeout: float, cap: int) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (connecting, headers and body: an upstream that trickles
    bytes is cut off at the deadline), at most ``cap`` bytes, no redirects."""
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
    kwargs = {"context": ssl.create_default_context()} if cls is http.client.HTTPSConnection else {}
    conn = cls(parts.hostname, parts.port, timeout=timeout, **kwargs)
    expired = threading.Event()

    def cut_off():  # unblocks a read that is waiting on the socket
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(2)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut_off)
    timer.daemon = True
    start = time.monotonic()
    try:
        timer.start()
        conn.connect()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "e5v"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RequestError(400, f"{name}: fetching the image failed (HTTP {resp.status})", param=name)
        data = bytearray()
        while chunk := resp.read1(65536):
            data += chunk
            if len(data) > cap:
                raise RequestError(400, f"{name}: image data too large (> max_bytes {cap})", param=name)
            if expired.is_set():
                break
        if expired.is_set() or time.monotonic() - start > timeout:
            raise TimeoutError
        return bytes(data)
    except RequestError:
        raise
    except Exception as err:  # socket, TLS and HTTP errors, the deadline: the client learns the kind, not details
        if expired.is_set() or isinstance(err, TimeoutError):
            raise RequestError(400, f"{name}: fetching the image took longer than {timeout:g} s", param=name) \
                from None
        raise RequestError(400, f"{name}: fetching the image failed ({type(err).__name__})", param=name) from None
    finally:
        timer.cancel()
        conn.close()


def decode_data_uri(url: str, name: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:[mediatype];base64,...`` URI; corrupt or oversized payloads are refused before decoding."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise RequestError(400, f"{name}: malformed data URI (no ',' after the media type)", param=name)
    if not head.lower().endswith(";base64"):
        raise RequestError(400, f"{name}: data URI must be base64-encoded (data:image/png;base64,...)", param=name)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise RequestError(400, f"{name}: image data too large (about {len(payload) * 3 // 4} bytes > max_bytes "
                                f"{max_bytes})", param=name)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{name}: corrupt base64 in data URI ({err})", param=name) from None
