"""Request bodies -> validated items with their prompts.

Every rejection is a :class:`RequestError` with an HTTP status, a message that names the item (``input[2]``,
``messages[0].content[1]``) and the reason, and the request field it concerns (``param``), so that a client
sees exactly what to fix.  Images are decoded here, with the limits of :func:`e5v.inputs.load_image`
(bytes, pixels from the header before decoding, so decompression bombs cost nothing); a local path or a
URL named in a request is read only when the operator allowed it.
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from PIL import Image

from .. import prompts
from ..encoder import Item
from ..errors import ConfigError, E5VError, InputError
from ..inputs import DEFAULT_MAX_PIXELS, clean_text, load_image

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
        return cls(400, str(err), param=err.item)

    def body(self) -> dict:
        """The error in OpenAI's shape (what OpenAI clients parse)."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """Per-request limits. Defaults suit one GPU serving many clients."""

    max_items: int = 64
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 16 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 20_000
    max_k: int = 100


@dataclass
class ImageSources:
    """Where a request's image may come from: data URIs always; local files only under ``allow_paths``
    (real paths, symlinks resolved); URLs only under one of ``allow_urls`` (prefixes, redirects not
    followed)."""

    limits: Limits = field(default_factory=Limits)
    allow_paths: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    url_timeout: float = 10.0

    def __post_init__(self):
        self.allow_paths = tuple(os.path.realpath(p) for p in self.allow_paths)
        self.allow_urls = tuple(normalise_prefix(p) for p in self.allow_urls)

    def load(self, url, name: str) -> Image.Image:
        if not isinstance(url, str):
            raise RequestError(400, f"{name}: image_url.url must be a string, got {type(url).__name__}", param=name)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = decode_data_uri(url, name, self.limits.max_image_bytes)
        elif scheme in ("http", "https"):
            data = self._fetch(url, name)
        elif scheme == "file" or url.startswith("/"):
            return self._open_path(unquote(urlsplit(url).path) if scheme == "file" else url, name)
        else:
            raise RequestError(400, f"{name}: unsupported image URL {url[:40]!r}; send a data URI "
                                    "(data:image/png;base64,...)", param=name)
        return self._decode(data, name)

    def _decode(self, src, name: str) -> Image.Image:
        try:
            return load_image(src, item=name, allow_paths=True, max_bytes=self.limits.max_image_bytes,
                              max_pixels=self.limits.max_pixels)
        except InputError as err:
            raise RequestError.from_input(err) from None

    def _open_path(self, path: str, name: str) -> Image.Image:
        if not self.allow_paths:
            raise RequestError(403, f"{name}: this server does not read local paths (the operator can allow "
                                    "folders with --allow-local-paths); send a data URI instead",
                               param=name, kind="permission_error")
        real = os.path.realpath(path)
        if not os.path.isabs(path) or not any(os.path.commonpath([real, d]) == d for d in self.allow_paths):
            raise RequestError(403, f"{name}: the path {path!r} is outside the folders this server may read",
                               param=name, kind="permission_error")
        return self._decode(real, name)

    def _fetch(self, url: str, name: str) -> bytes:
        import httpx

        if not self.allow_urls:
            raise RequestError(403, f"{name}: this server does not fetch URLs (the operator can allow URL "
                                    "prefixes with --allow-urls); send a data URI instead",
                               param=name, kind="permission_error")
        parts = urlsplit(url)
        if parts.username or parts.password or "/../" in parts.path + "/" or "/./" in parts.path + "/":
            raise RequestError(400, f"{name}: URLs with credentials or dot segments are refused", param=name)
        if not any(url.startswith(p) for p in self.allow_urls):
            raise RequestError(403, f"{name}: the URL is outside the prefixes this server may fetch",
                               param=name, kind="permission_error")
        cap = self.limits.max_image_bytes
        try:
            with httpx.stream("GET", url, timeout=self.url_timeout, follow_redirects=False) as r:
                if r.status_code != 200:
                    raise RequestError(400, f"{name}: fetching the image failed (HTTP {r.status_code})", param=name)
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > cap:
                        raise RequestError(400, f"{name}: image data too large (> max_bytes {cap})", param=name)
        except httpx.HTTPError as err:
            raise RequestError(400, f"{name}: fetching the image failed ({type(err).__name__}: {err})",
                               param=name) from None
        return bytes(data)


def normalise_prefix(prefix: str) -> str:
    """An allowed URL prefix always ends its host part with ``/``, so ``http://a`` cannot admit ``http://a.evil``."""
    parts = urlsplit(prefix)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"allowed URL prefix {prefix!r} must start with http:// or https:// and a host")
    return prefix if parts.path else prefix + "/"


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
class Parsed:
    """A request's items (in request order) with the prompt and kind of each."""

    items: list[Item]
    prompts: list[str]
    kinds: list[str]

    def groups(self) -> dict[str, list[int]]:
        """Item positions by prompt: each group is one merged job on the model."""
        out: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            out.setdefault(p, []).append(i)
        return out


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


def _content(parts, name: str, limits: Limits, sources: ImageSources) -> tuple[str | None, Image.Image | None]:
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
    image = sources.load(url, url_name) if url is not None else None
    return text, image


def _add(parsed: Parsed, text, image, name: str, task, prompt, image_prompt=None) -> None:
    kind = "composed" if text is not None and image is not None else "image" if image is not None else "text"
    parsed.items.append(Item(text=text, image=image, name=name))
    parsed.kinds.append(kind)
    parsed.prompts.append(prompt_for(kind, name, task, prompt, image_prompt))


def parse_embeddings(body: dict, limits: Limits, sources: ImageSources) -> Parsed:
    """``input`` (a string, or a list whose elements are strings or lists of content parts) or ``messages``
    (one user message, vLLM's chat shape): one item per string / content."""
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
        text, image = _content(msgs[0].get("content"), "messages[0].content", limits, sources)
        _add(parsed, text, image, "messages[0]", task, prompt)
        return parsed
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
            text, image = _content(element, name, limits, sources)
            _add(parsed, text, image, name, task, prompt)
        elif isinstance(element, int) or (isinstance(element, list) and element and isinstance(element[0], int)):
            raise RequestError(400, f"{name}: token ids are not supported; send the text", param=name)
        else:
            raise RequestError(400, f"{name}: expected a string or a list of content parts, got {_short(element)}",
                               param=name)
    return parsed


def parse_search(body: dict, limits: Limits, sources: ImageSources, image_prompt: str | None) -> tuple[Parsed, int]:
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
    image = sources.load(image, "image") if image is not None else None
    parsed = Parsed([], [], [])
    _add(parsed, text, image, "query", task, prompt, image_prompt)
    return parsed, k


def _short(value) -> str:
    s = repr(value)
    return f"{type(value).__name__} {s if len(s) <= 40 else s[:37] + '...'}"
