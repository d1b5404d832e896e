"""Request bodies -> validated items with their prompts.

Every rejection is a :class:`~e5v.serve.errors.RequestError` with an HTTP status, a message that names the item
(``input[2]``, ``messages[0].content[1]``) and the reason, and the request field it concerns (``param``), so that
a client sees exactly what to fix. Images are read through :class:`~e5v.serve.sources.ImageSources`: each is
counted on the request's pixel claim from its header, and decoded only once every image of the request fits.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Iterator

from .. import prompts
from ..errors import ConfigError, InputError
from ..items import Item, clean_text
from .errors import RequestError
from .limits import Claim, Limits
from .sources import ImageSources, Pending


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
    Item texts get the same check from :func:`~e5v.items.clean_text`."""
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
    read = _read_messages if has_messages else _read_input
    for text, image, name in read(body, limits, sources, claim):
        _add(parsed, text, image, name, task, prompt)
    return parsed.decode_images(sources)


def _read_messages(body: dict, limits: Limits, sources: ImageSources, claim: Claim | None) -> Iterator[tuple]:
    """``messages``: exactly one user message, one item. Yields ``(text, image, name)``."""
    msgs = body["messages"]
    if not isinstance(msgs, list) or len(msgs) != 1 or not isinstance(msgs[0], dict):
        raise RequestError(400, "messages must be a list with exactly one message (one embedding per request "
                                "in this shape; send a list in 'input' for batches)", param="messages")
    if msgs[0].get("role", "user") != "user":
        raise RequestError(400, f"messages[0]: role must be 'user', got {_short(msgs[0].get('role'))}",
                           param="messages[0].role")
    text, image = _content(msgs[0].get("content"), "messages[0].content", limits, sources, claim)
    yield text, image, "messages[0]"


def _read_input(body: dict, limits: Limits, sources: ImageSources, claim: Claim | None) -> Iterator[tuple]:
    """``input``: a string or a list of strings and content-part lists, one item each. Yields ``(text, image,
    name)`` item by item, so that an item's prompt is checked before the next item is read."""
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
            yield _text(element, name, limits), None, name
        elif isinstance(element, list) and element and all(isinstance(e, dict) for e in element):
            yield *_content(element, name, limits, sources, claim), name
        elif isinstance(element, int) or (isinstance(element, list) and element and isinstance(element[0], int)):
            raise RequestError(400, f"{name}: token ids are not supported; send the text", param=name)
        else:
            raise RequestError(400, f"{name}: expected a string or a list of content parts, got {_short(element)}",
                               param=name)


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
