"""Request bodies -> validated items with their prompts.

Every rejection is a :class:`RequestError` with an HTTP status, a message that names the item (``input[2]``,
``messages[0].content[1]``) and the reason, and the request field it concerns (``param``), so that a client
sees exactly what to fix.  Images are decoded here, with the limits of :func:`e5v.inputs.load_image`
(bytes, pixels from the header before decoding, so decompression bombs cost nothing), and only once their
header's pixels fit the request's and the server's :class:`PixelBudget`; a local path or a URL named in a
request is read only when the operator allowed it, a URL within one total deadline.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import io
import logging
import os
import re
import reprlib
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from PIL import Image

from .. import prompts
from ..encoder import Item
from ..errors import ConfigError, E5VError, InputError
from ..inputs import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, clean_text, load_image, pillow_warnings

log = logging.getLogger(__name__)

KINDS = ("text", "image", "composed")


class RequestError(E5VError):
    """A request the server refuses: ``status`` (4xx, or 503 when busy), ``param`` the field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error"):
        self.status = status
        self.param = param
        self.kind = kind
        super().__init__(message)

    @classmethod
    def from_input(cls, err: InputError) -> "RequestError":
        """A rejected item's 400: its public reason only (an internal exception's text stays in the log)."""
        if err.public_reason != err.reason:
            log.warning("%s", err)
        return cls(400, f"{err.item}: {err.public_reason}", param=err.item)

    def body(self, request_id: str | None = None) -> dict:
        """The error in OpenAI's shape (what OpenAI clients parse), with the request id the server log names."""
        out = {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}
        if request_id is not None:
            out["request_id"] = request_id
        return {"error": out}


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Defaults suit one GPU serving many clients."""

    max_items: int = 64
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = 64_000_000
    max_text_chars: int = 20_000
    max_k: int = 100


class PixelBudget:
    """Decoded image pixels held by all requests together (being parsed, queued or on the model).

    Each image is counted from its header before it is decoded (decoded, a pixel costs 4 bytes and more: a
    4.5 kB 1-bit PNG of 6000x6000 takes 150-400 MB), so that neither one request nor many at once can make
    the server decode more than ``limit`` pixels; a request's share is given back when it is answered."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.used = 0
        self._lock = threading.Lock()

    def claim(self, per_request: int) -> "Claim":
        return Claim(self, per_request)


class Claim:
    """One request's share of a :class:`PixelBudget`; :meth:`release` (always, in a ``finally``) gives it back."""

    def __init__(self, budget: PixelBudget, per_request: int):
        self.budget = budget
        self.per_request = per_request
        self.pixels = 0

    def add_image(self, src, name: str, max_pixels: int | None) -> None:
        """Count an image (bytes or a path) from its header; one over ``max_pixels`` is left to the decoder,
        which rejects it with its own reason."""
        pixels = header_pixels(src)
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            self.add(pixels, name)

    def add(self, pixels: int, name: str) -> None:
        total = self.pixels + pixels
        if total > self.per_request:
            raise RequestError(413, f"{name}: the request's images hold {total} pixels, more than the limit of "
                                    f"{self.per_request} per request; send fewer or smaller images", param=name)
        b = self.budget
        with b._lock:
            if b.used + pixels > b.limit:
                raise RequestError(503, "server busy: too many image pixels are being processed; retry later",
                                   kind="server_error")
            b.used += pixels
        self.pixels = total

    def release(self) -> None:
        with self.budget._lock:
            self.budget.used -= self.pixels
        self.pixels = 0


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

    def load(self, url, name: str, claim: Claim | None = None) -> "Pending":
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

    def decode(self, image: "Pending") -> Image.Image:
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


def header_pixels(src) -> int | None:
    """Width x height from an image's header (nothing is decoded); ``None`` when it cannot be read (the
    decoder then names the problem)."""
    try:
        if isinstance(src, str) and not stat.S_ISREG(os.stat(src).st_mode):  # a FIFO would block
            return None
        with pillow_warnings():
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src, formats=IMAGE_FORMATS) as im:
                w, h = im.size
    except Exception:  # garbage is load_image's to report, with its reason
        return None
    return w * h


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


# ------------------------------------------------------------------------------------------------ items
@dataclass
class Pending:
    """An image whose source is allowed and whose pixels are counted, not decoded yet."""

    src: bytes | str
    name: str


@dataclass
class Parsed:
    """A request's items (in request order) with the prompt and kind of each (and ``k`` of a search)."""

    items: list[Item]
    prompts: list[str]
    kinds: list[str]
    k: int | None = None

    def decode_images(self, sources: ImageSources) -> "Parsed":
        for item in self.items:
            if isinstance(item.image, Pending):
                item.image = sources.decode(item.image)
        return self

    def groups(self) -> dict[str, list[int]]:
        """Item positions by prompt: each group is one merged job on the model."""
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            out.setdefault(p, []).append(i)
        return out


def _encodable(text: str, name: str) -> str:
    """A prompt UTF-8 can encode (JSON admits lone surrogates such as ``"\\ud800"``; the tokenizer does not).
    Item texts get the same check from :func:`~e5v.inputs.clean_text`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, f"{name}: the text is not valid Unicode (a lone surrogate at character "
                                f"{err.start})", param=name) from None
    return text


def _text(value, name: str, limits: Limits) -> str:
    try:
        text = clean_text(value, item=name)
    except InputError as err:
        raise RequestError.from_input(err) from None
    if len(text) > limits.max_text_chars:
        raise RequestError(400, f"{name}: text too long ({len(text)} characters > limit {limits.max_text_chars})",
                           param=name)
    return text


def _options(body: dict, limits: Limits) -> tuple[str | None, str | None]:
    task, prompt = body.get("task"), body.get("prompt")
    if task is not None:
        if not isinstance(task, str):
            raise RequestError(400, f"task must be a string, got {type(task).__name__}", param="task")
        try:
            prompts.composed_prompts(task)
        except ConfigError as err:
            raise RequestError(400, str(err), param="task") from None
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(400, "prompt must be a non-empty string", param="prompt")
        if len(prompt) > limits.max_text_chars:
            raise RequestError(400, f"prompt too long ({len(prompt)} characters)", param="prompt")
        if prompt.count(prompts.SENT) > 1 or prompt.count(prompts.IMAGE) > 1:
            raise RequestError(400, "a prompt may hold at most one <sent> and one <image>", param="prompt")
        _encodable(prompt, "prompt")
    return task, prompt


def prompt_for(kind: str, name: str, task: str | None, prompt: str | None, image_prompt: str | None = None) -> str:
    """The prompt of an item: the request's own ``prompt`` (checked against the item), else the E5-V default
    of its kind: text prompt, image prompt (``image_prompt`` when given, else the gallery prompt of ``task``),
    composed query prompt of ``task`` (cirr by default)."""
    if prompt is not None:
        has_sent, has_image = prompts.SENT in prompt, prompts.IMAGE in prompt
        if (has_sent, has_image) != (kind != "image", kind != "text"):
            need = {"text": "<sent> and no <image>", "image": "<image> and no <sent>",
                    "composed": "both <sent> and <image>"}[kind]
            raise RequestError(400, f"{name}: the request's prompt does not fit this {kind} item (it needs {need})",
                               param="prompt")
        return prompt
    if kind == "text":
        return prompts.TEXT
    if kind == "image":
        if image_prompt:
            return image_prompt
        return prompts.image_prompt(task)
    return prompts.composed_prompts(task or "cirr")[0]


def _content(parts, name: str, limits: Limits, sources: ImageSources,
             claim: Claim | None) -> tuple[str | None, Pending | None]:
    """A chat content (a string, or a list of text / image_url parts) -> (text, image); one of each at most."""
    if isinstance(parts, str):
        return _text(parts, name, limits), None
    if not isinstance(parts, list) or not parts:
        raise RequestError(400, f"{name}: content must be a string or a non-empty list of parts", param=name)
    text = url = None
    url_name = name
    for j, part in enumerate(parts):
        where = f"{name}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if text is not None:
                raise RequestError(400, f"{where}: at most one text part per item", param=where)
            text = _text(part.get("text"), where, limits)
        elif kind == "image_url":
            if url is not None:
                raise RequestError(400, f"{where}: at most one image per item (E5-V embeds one image)", param=where)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if url is None:
                raise RequestError(400, f"{where}: image_url needs a url", param=where)
            url_name = where
        else:
            raise RequestError(400, f"{where}: expected a part {{'type': 'text' | 'image_url', ...}}, got "
                                    f"{_short(part)}", param=where)
    image = sources.load(url, url_name, claim) if url is not None else None
    return text, image


def _add(parsed: Parsed, text, image, name: str, task, prompt, image_prompt=None) -> None:
    kind = "composed" if text is not None and image is not None else "image" if image is not None else "text"
    parsed.items.append(Item(text=text, image=image, name=name))
    parsed.kinds.append(kind)
    parsed.prompts.append(prompt_for(kind, name, task, prompt, image_prompt))


def parse_embeddings(body: dict, limits: Limits, sources: ImageSources, claim: Claim | None = None) -> Parsed:
    """``input`` (a string, or a list whose elements are strings or lists of content parts) or ``messages``
    (one user message, vLLM's chat shape): one item per string / content. Images' pixels go on ``claim``."""
    task, prompt = _options(body, limits)
    has_input, has_messages = body.get("input") is not None, body.get("messages") is not None
    if has_input == has_messages:
        raise RequestError(400, "send exactly one of 'input' (texts) or 'messages' (chat content with images)",
                           param="input")
    parsed = Parsed([], [], [])
    if has_messages:
        msgs = body["messages"]
        if not isinstance(msgs, list) or len(msgs) != 1 or not isinstance(msgs[0], dict):
            raise RequestError(400, "messages must be a list with exactly one message (one embedding per request "
                                    "in this shape; send a list in 'input' for batches)", param="messages")
        if msgs[0].get("role", "user") != "user":
            raise RequestError(400, f"messages[0]: role must be 'user', got {_short(msgs[0].get('role'))}",
                               param="messages[0].role")
        text, image = _content(msgs[0].get("content"), "messages[0].content", limits, sources, claim)
        _add(parsed, text, image, "messages[0]", task, prompt)
        return parsed.decode_images(sources)
    inp = body["input"]
    if isinstance(inp, str):
        inp = [inp]
    if not isinstance(inp, list):
        raise RequestError(400, f"input must be a string or a list, got {type(inp).__name__}", param="input")
    if not inp:
        raise RequestError(400, "input is empty", param="input")
    if len(inp) > limits.max_items:
        raise RequestError(400, f"too many items ({len(inp)} > limit {limits.max_items} per request)", param="input")
    for i, element in enumerate(inp):
        name = f"input[{i}]"
        if isinstance(element, str):
            _add(parsed, _text(element, name, limits), None, name, task, prompt)
        elif isinstance(element, list) and element and all(isinstance(e, dict) for e in element):
            text, image = _content(element, name, limits, sources, claim)
            _add(parsed, text, image, name, task, prompt)
        elif isinstance(element, int) or (isinstance(element, list) and element and isinstance(element[0], int)):
            raise RequestError(400, f"{name}: token ids are not supported; send the text", param=name)
        else:
            raise RequestError(400, f"{name}: expected a string or a list of content parts, got {_short(element)}",
                               param=name)
    return parsed.decode_images(sources)


def parse_search(body: dict, limits: Limits, sources: ImageSources, image_prompt: str | None,
                 claim: Claim | None = None) -> Parsed:
    """``text``, ``image`` (a data URI, or an allowed path / URL) or both (composed), and ``k``. An image alone
    is embedded with ``image_prompt`` (the prompt the index gave its images, so that an image finds itself)."""
    task, prompt = _options(body, limits)
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limits.max_k:
        raise RequestError(400, f"k must be an integer from 1 to {limits.max_k}, got {_short(k)}", param="k")
    text = body.get("text")
    image = body.get("image")
    if text is None and image is None:
        raise RequestError(400, "send 'text', 'image' (a data URI) or both", param="text")
    text = _text(text, "text", limits) if text is not None else None
    image = sources.load(image, "image", claim) if image is not None else None
    parsed = Parsed([], [], [], k)
    _add(parsed, text, image, "query", task, prompt, image_prompt)
    return parsed.decode_images(sources)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40


def _short(value) -> str:
    """A short repr of a client's value, whatever its size or depth."""
    s = _REPR.repr(value)
    return f"{type(value).__name__} {s if len(s) <= 40 else s[:37] + '...'}"
