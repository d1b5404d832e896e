"""A seeded, bounded fuzz of the server: 1,200 random and hostile requests from 12 concurrent keep-alive
clients against a real uvicorn on 127.0.0.1 (tiny model). No answer >= 500 (503 "busy" aside), no dropped
connection, every answer JSON, every innocent request (merged with poisoned ones on the model) gets exactly the
engine's vectors, and so do requests after the fuzzing."""
from __future__ import annotations

import io
import json
import os
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from e5v import E5V
from e5v.serve.app import create_app
from e5v.serve.service import Settings
from e5v.serve.limits import Limits
from e5v.serve.server import running
from support.serve import data_uri, image_part, png, poison_preparation

SEED, CLIENTS, PER_CLIENT = 12, 12, 100
TEXTS = ["A dog runs across the park.", "a cat sleeps on the sofa", "The stock market fell today.", "hello",
         "Two children are playing soccer on the grass in the sun today.", "red car", "ünïcödé ✓ 文字"]
MODS = ["is red instead", "with two of them", "at night", "smaller"]
LIMITS = Limits(max_items=8, max_body_bytes=256 << 10, max_image_bytes=64 << 10, max_pixels=1_000_000,
                max_request_pixels=2_000_000, max_text_chars=2000)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return E5V.from_pretrained(str(tiny_dirs["e5v-like"]))


@pytest.fixture(scope="module")
def pool(model, tmp_path_factory):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in
              [(32, 32), (40, 90), (100, 30), (64, 64)]]
    folder = tmp_path_factory.mktemp("fuzz_files")
    (folder / "a.png").write_bytes(png(images[0]))
    os.mkfifo(folder / "fifo.png")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "EPS")
    noisy = png(images[3])
    return {"images": images, "uris": [data_uri(png(im)) for im in images], "folder": folder, "eps": buf.getvalue(),
            "truncated": noisy[: len(noisy) // 2], "bomb": png(Image.new("1", (3000, 3000))),
            "text": model.encode_text(TEXTS), "image": model.encode_image(images),
            "composed": model.encode_composed(list(zip(images, MODS)), task="cirr")}


def innocent(rng, pool) -> tuple[dict, np.ndarray]:
    """A valid request and the engine's vectors for it."""
    shape = int(rng.integers(4))
    if shape == 0:
        idx = rng.choice(len(TEXTS), size=int(rng.integers(1, 5)), replace=False)
        return {"input": [TEXTS[i] for i in idx]}, pool["text"][idx]
    i = int(rng.integers(len(MODS)))
    if shape == 1:
        return {"messages": [{"role": "user", "content": [image_part(pool["uris"][i])]}]}, pool["image"][[i]]
    if shape == 2:
        content = [image_part(pool["uris"][i]), {"type": "text", "text": MODS[i]}]
        return {"input": [content], "encoding_format": "float"}, pool["composed"][[i]]
    t = int(rng.integers(len(TEXTS)))
    return ({"input": [[image_part(pool["uris"][i])], TEXTS[t]]}, np.stack([pool["image"][i], pool["text"][t]]))


def random_json(rng, depth: int = 0):
    """Any JSON value, with the odd lone surrogate, huge number and control character."""
    k = int(rng.integers(9 if depth < 3 else 6))
    if k == 0:
        return None
    if k == 1:
        return bool(rng.integers(2))
    if k == 2:
        return int(rng.integers(-2**62, 2**62)) * (10 ** int(rng.integers(0, 40)))
    if k == 3:
        return float(rng.normal()) * 10.0 ** float(rng.integers(-300, 300))
    if k == 4:
        return "".join(chr(int(c)) for c in rng.integers(0, 0x11000, size=int(rng.integers(0, 12))))
    if k == 5:
        return str(rng.choice(["", " ", "\ud800", "a\x00b", "<image>", "<sent>", "\r\n", "data:", "/etc/passwd"]))
    if k in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


def random_json_key(rng) -> str:
    return str(rng.choice(["input", "messages", "model", "task", "prompt", "k", "text", "image", "type", "url",
                           "image_url", "content", "role", "\ud800", "encoding_format", "dimensions", "x"]))


def hostile(rng, pool, url_base: str) -> tuple[str, str, bytes | dict, dict]:
    """(kind, path, body, headers): a hostile request; it must never get a 5xx (503 "busy" aside)."""
    folder = pool["folder"]
    kind = str(rng.choice(["surrogate", "deep", "bignum", "badkey", "crlf", "garbage", "truncated_json", "random",
                           "random_input", "base64", "truncated_png", "eps", "bomb", "bigbody", "fifo", "path",
                           "escape_url", "search", "method", "nonutf8", "prompt", "task", "k"]))
    if kind == "surrogate":
        where = int(rng.integers(3))
        bad = "x" + chr(int(rng.integers(0xD800, 0xE000))) + "y"
        body = ({"input": [TEXTS[0], bad]} if where == 0 else
                {"input": [[image_part(pool["uris"][0]), {"type": "text", "text": bad}]]} if where == 1 else
                {"input": [TEXTS[1]], "prompt": "<sent>" + bad})
        return kind, "/v1/embeddings", body, {}
    if kind == "deep":
        d = int(rng.integers(500, 20_000))
        return kind, "/v1/embeddings", b'{"input": ' + b"[" * d + b"]" * d + b"}", {}
    if kind == "bignum":
        digits = b"9" * int(rng.integers(4000, 9000))
        return kind, "/v1/embeddings", b'{"input": "a", "dimensions": ' + digits + b"}", {}
    if kind == "badkey":
        return kind, "/v1/embeddings", {"input": "a", chr(int(rng.integers(0xD800, 0xE000))): 1}, {}
    if kind == "crlf":
        return kind, "/v1/embeddings", {"input": [[image_part(url_base + "img/a.png\r\nX-Injected: 1")]]}, {}
    if kind == "garbage":
        return kind, "/v1/embeddings", bytes(rng.integers(0, 256, size=int(rng.integers(0, 3000)), dtype=np.uint8)), {}
    if kind == "truncated_json":
        text = json.dumps({"input": TEXTS[:3]}).encode()
        return kind, "/v1/embeddings", text[: int(rng.integers(0, len(text)))], {}
    if kind == "random":
        return kind, "/v1/embeddings", {random_json_key(rng): random_json(rng) for _ in range(3)}, {}
    if kind == "random_input":
        body = {"input": [random_json(rng), [{"type": "image_url", "image_url": random_json(rng)}]]}
        return kind, "/v1/embeddings", body, {}
    if kind == "base64":
        return kind, "/v1/embeddings", {"input": [[image_part("data:image/png;base64," + "@#%" * 10)]]}, {}
    if kind == "truncated_png":
        return kind, "/v1/embeddings", {"input": [[image_part(data_uri(pool["truncated"]))]]}, {}
    if kind == "eps":
        return kind, "/v1/embeddings", {"input": [[image_part(data_uri(pool["eps"], "application/postscript"))]]}, {}
    if kind == "bomb":
        return kind, "/v1/embeddings", {"input": [[image_part(data_uri(pool["bomb"]))] for _ in range(3)]}, {}
    if kind == "bigbody":
        return kind, "/v1/embeddings", {"input": ["y" * (300 << 10)]}, {}
    if kind == "fifo":
        return kind, "/v1/embeddings", {"input": [[image_part(str(folder / "fifo.png"))]]}, {}
    if kind == "path":
        body = {"input": [[image_part(str(folder / ".." / "x.png"))], [image_part("/etc/passwd")]]}
        return kind, "/v1/embeddings", body, {}
    if kind == "escape_url":
        return kind, "/v1/embeddings", {"input": [[image_part(url_base + "img/%2e%2e/secret.txt")]]}, {}
    if kind == "search":
        return kind, "/v1/search", {"text": "\ud800"}, {}
    if kind == "method":
        return kind, "/v1/embeddings?x=\u00ff", b"", {"X-Method": "GET"}
    if kind == "nonutf8":
        return kind, "/v1/embeddings", b'{"input": "\xff\xfe\xfa"}', {}
    if kind == "prompt":
        return kind, "/v1/embeddings", {"input": ["a"], "prompt": random_json(rng)}, {}
    if kind == "task":
        return kind, "/v1/embeddings", {"input": [[image_part(pool["uris"][1])]], "task": random_json(rng)}, {}
    return kind, "/v1/search", {"text": "a", "k": random_json(rng)}, {}


def poisoned(rng, pool) -> tuple[dict, str]:
    """Items that pass the request checks and fail on the engine: the request must get a 400 naming the item."""
    which = int(rng.integers(3))
    if which == 0:
        return {"input": [TEXTS[0], "POISON in the engine", TEXTS[1]]}, "input[1]"
    if which == 1:
        return {"input": ["PANIC in the tokenizer", TEXTS[2]]}, "input[0]"
    return {"input": [[image_part(pool["uris"][1])], "a <image> marker"]}, "input[1]"


def raw_http(host: str, port: int, data: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.slow
def test_fuzz_the_server(model, pool, monkeypatch):
    poison_preparation(monkeypatch, "engine crash")  # items the engine chokes on with arbitrary exceptions
    settings = Settings(model_name="tiny", limits=LIMITS, allow_paths=(str(pool["folder"]),),
                        allow_urls=("http://127.0.0.1:9/img/",), batch_wait_ms=5, url_timeout=2)
    statuses, kinds, problems, lock = Counter(), Counter(), [], threading.Lock()

    def count(kind: str, status: int) -> None:
        with lock:
            statuses[status] += 1
            kinds[kind] += 1

    app = create_app(model, settings)
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")

        def client(seed: int) -> None:
            rng = np.random.default_rng([SEED, seed])
            with httpx.Client(base_url=url, timeout=60) as c:
                for n in range(PER_CLIENT):
                    roll = rng.random()
                    try:
                        if roll < 0.4:
                            body, want = innocent(rng, pool)
                            kind, r = "innocent", c.post("/v1/embeddings", json=body)
                            if r.status_code != 200:
                                problems.append(f"innocent {body!r:.100} got {r.status_code} {r.text[:200]}")
                            else:
                                got = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
                                if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
                                    problems.append(f"innocent {body!r:.100}: wrong vectors")
                        elif roll < 0.55:
                            body, where = poisoned(rng, pool)
                            kind, r = "poisoned", c.post("/v1/embeddings", json=body)
                            if r.status_code != 400 or r.json()["error"]["param"] != where:
                                problems.append(f"poisoned got {r.status_code} {r.text[:200]}")
                        elif roll < 0.57:
                            kind = "raw"
                            answer = raw_http(host, int(port), bytes(rng.integers(0, 256, 200, dtype=np.uint8))
                                              + b"\r\n\r\n")
                            head, _, rest = answer.partition(b"\r\n\r\n")
                            status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else 0
                            count(kind, status)
                            if status != 400 or "error" not in json.loads(rest):
                                problems.append(f"raw garbage got {answer[:200]!r}")
                            continue
                        else:
                            kind, path, body, headers = hostile(rng, pool, "http://127.0.0.1:9/")
                            method = headers.pop("X-Method", "POST")
                            content = body if isinstance(body, bytes) else json.dumps(body).encode()
                            r = c.request(method, path, content=content,
                                          headers={"Content-Type": "application/json", **headers})
                            if r.status_code >= 500 and r.status_code != 503:  # random bodies may be valid
                                problems.append(f"{kind} got {r.status_code} {r.text[:200]}")
                        count(kind, r.status_code)
                        if r.headers.get("content-type") != "application/json" or "x-request-id" not in r.headers:
                            problems.append(f"{kind}: not JSON with a request id: {r.headers}")
                        r.json()
                    except Exception as exc:  # a dropped connection, a body that is not JSON
                        problems.append(f"client {seed} request {n}: {type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(CLIENTS) as ex:
            list(ex.map(client, range(CLIENTS)))
        metrics = httpx.get(url + "/metrics").text
        monkeypatch.undo()
        with httpx.Client(base_url=url, timeout=60) as c:  # after the storm: still the engine's vectors
            after = c.post("/v1/embeddings", json={"input": TEXTS}).json()
            imgs = c.post("/v1/embeddings", json={"input": [[image_part(u)] for u in pool["uris"]]}).json()
        assert app.state.service.pixels.used == 0 and app.state.service.batcher.queued_items == 0
    merged = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line.startswith(('e5v_batch_items_bucket{le="4"}', 'e5v_batch_items_count'))]
    total = sum(statuses.values())
    print(f"\nfuzz: {total} requests from {CLIENTS} clients (seed {SEED}); by kind {dict(sorted(kinds.items()))}; "
          f"by status {dict(sorted(statuses.items()))}; model calls {merged[1]:.0f}, with more items than one "
          f"request holds {merged[1] - merged[0]:.0f}; problems {len(problems)}")
    assert problems == [], problems[:10]
    assert total >= 1000 and not [s for s in statuses if s >= 500 and s != 503]
    assert kinds["innocent"] > 300 and kinds["poisoned"] > 100 and merged[1] - merged[0] > 0
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in after["data"]]), pool["text"], atol=1e-5)
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in imgs["data"]]), pool["image"], atol=1e-5)
