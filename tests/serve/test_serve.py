"""The embeddings server against a real uvicorn on a loopback port: many concurrent clients get exactly the
vectors of the engine, bad requests get a 4xx naming the item and the reason while the server keeps serving,
the allow-lists and the API key hold, and ``e5v serve`` runs as a command."""
from __future__ import annotations

import base64
import functools
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from e5v import E5V, Item, prompts
from e5v.serve.app import create_app
from e5v.serve.service import Settings
from e5v.serve.limits import Limits
from e5v.serve.server import free_port, running
from support.serve import data_uri, image_part, png

TEXTS = ["A dog runs across the park.", "a cat sleeps on the sofa", "The stock market fell today.",
         "Two children are playing soccer on the grass in the sun today.", "hello", "red car"]
MODS = ["is red instead", "with two of them", "at night", "without the background", "smaller"]
LIMITS = Limits(max_items=8, max_body_bytes=256 << 10, max_image_bytes=64 << 10, max_pixels=1_000_000,
                max_text_chars=2000)


def vectors(response: httpx.Response) -> np.ndarray:
    out = response.json()
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == list(range(len(out["data"])))
    rows = [d["embedding"] for d in out["data"]]
    if rows and isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.asarray(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return E5V.from_pretrained(str(tiny_dirs["e5v-like"]))


@pytest.fixture(scope="module")
def pool(model, mixed_images):
    """Inputs and the vectors the engine gives them directly (the server must return the same)."""
    uris = [data_uri(png(im)) for im in mixed_images]
    pairs = list(zip(mixed_images, MODS))
    return {"texts": TEXTS, "uris": uris, "images": mixed_images,
            "text": model.encode_text(TEXTS), "image": model.encode_image(mixed_images),
            "composed": model.encode_composed(pairs, task="cirr")}


@pytest.fixture(scope="module")
def files(tmp_path_factory, mixed_images):
    """An allowed folder (with an image and a symlink out of it), a folder outside, and a web server."""
    root = tmp_path_factory.mktemp("serve_files")
    allowed, outside, web = root / "allowed", root / "outside", root / "web"
    for d in (allowed, outside, web):
        d.mkdir()
    for d in (allowed, outside, web):
        (d / "a.png").write_bytes(png(mixed_images[0]))
    os.symlink(outside / "a.png", allowed / "link.png")
    handler = functools.partial(QuietHandler, directory=str(web))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield {"allowed": allowed, "outside": outside, "web": f"http://127.0.0.1:{httpd.server_address[1]}/"}
    httpd.shutdown()
    thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(model, files):
    settings = Settings(model_name="tiny-e5v", limits=LIMITS, allow_paths=(str(files["allowed"]),),
                        allow_urls=(files["web"] + "a",))
    with running(create_app(model, settings)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def request_for(rng: np.random.Generator, pool) -> tuple[dict, np.ndarray]:
    """A random request (texts, an image, image + text, or a mixed list) and the vectors it must give."""
    shape = rng.integers(4)
    fmt = str(rng.choice(["float", "base64"]))
    if shape == 0:
        idx = rng.choice(len(TEXTS), size=int(rng.integers(1, 4)), replace=False)
        body = {"input": [TEXTS[i] for i in idx] if len(idx) > 1 else TEXTS[idx[0]]}
        return body | {"encoding_format": fmt}, pool["text"][idx]
    i = int(rng.integers(len(MODS)))
    if shape == 1:
        body = {"messages": [{"role": "user", "content": [image_part(pool["uris"][i])]}]}
        return body | {"encoding_format": fmt}, pool["image"][[i]]
    if shape == 2:
        content = [image_part(pool["uris"][i]), {"type": "text", "text": MODS[i]}]
        return {"model": "tiny-e5v", "messages": [{"role": "user", "content": content}]}, pool["composed"][[i]]
    t, j = int(rng.integers(len(TEXTS))), int(rng.integers(len(MODS)))
    body = {"input": [[image_part(pool["uris"][i])], TEXTS[t], [{"type": "text", "text": MODS[j]},
                                                               image_part(pool["uris"][j])]]}
    expected = np.stack([pool["image"][i], pool["text"][t], pool["composed"][j]])
    return body | {"encoding_format": fmt}, expected


def batch_histogram(metrics_text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(r'e5v_batch_items_bucket\{le="([^"]+)"\} (\S+)', metrics_text)
            for m in [m]} | {"count": float(re.search(r"e5v_batch_items_count (\S+)", metrics_text)[1])}


@pytest.mark.slow
def test_concurrent_clients_get_the_engines_vectors(server, pool):
    clients, per_client = 32, 20
    before = batch_histogram(server.get("/metrics").text)

    def client(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        problems = []
        with httpx.Client(base_url=str(server.base_url), timeout=120) as c:
            for n in range(per_client):
                body, expected = request_for(rng, pool)
                r = c.post("/v1/embeddings", json=body)
                if r.status_code != 200:
                    problems.append(f"client {seed} request {n}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                got = vectors(r)
                if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5):
                    problems.append(f"client {seed} request {n}: vectors differ from the engine's")
        return problems

    with ThreadPoolExecutor(clients) as ex:
        problems = [p for ps in ex.map(client, range(clients)) for p in ps]
    assert problems == []
    after = batch_histogram(server.get("/metrics").text)
    calls = after["count"] - before["count"]
    merged = calls - (after["4"] - before["4"])  # model calls with more items than any one request holds (<= 3)
    assert 0 < calls < clients * per_client and merged > 0, (calls, merged)


def test_base64_round_trips_and_usage_counts_tokens(server, model, pool):
    body = {"input": TEXTS[:3]}
    as_float = server.post("/v1/embeddings", json=body)
    as_b64 = server.post("/v1/embeddings", json=body | {"encoding_format": "base64"})
    assert as_float.status_code == as_b64.status_code == 200
    assert all(isinstance(d["embedding"], str) for d in as_b64.json()["data"])
    np.testing.assert_array_equal(vectors(as_b64), vectors(as_float))  # bit-exact both ways
    np.testing.assert_allclose(vectors(as_float), pool["text"][:3], atol=1e-6)
    tokens = sum(len(model.prepare(Item(text=t, name="t"), prompts.TEXT)) for t in TEXTS[:3])
    assert as_float.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert as_float.json()["model"] == "tiny-e5v"


def test_task_and_prompt_fields_choose_the_prompt(server, model, pool):
    im, uri = pool["images"][1], pool["uris"][1]
    r = server.post("/v1/embeddings", json={"input": [[image_part(uri)]], "task": "fashioniq-dress"})
    np.testing.assert_allclose(vectors(r), model.encode_image([im], task="fashioniq-dress"), atol=1e-5)
    r = server.post("/v1/embeddings", json={"input": [[image_part(uri), {"type": "text", "text": "longer"}]],
                                            "task": "fashioniq-shirt"})
    np.testing.assert_allclose(vectors(r), model.encode_composed([(im, "longer")], task="fashioniq-shirt"), atol=1e-5)
    own = "<sent>\nIn one word:"
    r = server.post("/v1/embeddings", json={"input": ["a red car"], "prompt": own})
    np.testing.assert_allclose(vectors(r), model.encode_text(["a red car"], prompt=own), atol=1e-5)


def _bomb() -> bytes:
    return png(Image.new("1", (6000, 6000)))  # 36 M pixels in a few kB


def _bad_cases(files):
    ok_png = png(Image.new("RGB", (8, 8), "red"))
    noisy = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    img = lambda url: {"input": [[image_part(url)]]}  # noqa: E731
    return [
        ("malformed json", b'{"input": ["a"', 400, "malformed JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("not utf-8", b'{"input": "\xff\xfe"}', 400, "not UTF-8"),
        ("input wrong type", {"input": 5}, 400, "input must be a string or a list"),
        ("element wrong type", {"input": ["ok", {"a": 1}]}, 400, "input[1]: expected a string or a list"),
        ("token ids", {"input": [[1, 2, 3]]}, 400, "token ids are not supported"),
        ("empty input", {"input": []}, 400, "input is empty"),
        ("blank text", {"input": ["fine", "   "]}, 400, "input[1]: empty text"),
        ("text too long", {"input": ["x" * 2001]}, 400, "input[0]: text too long"),
        ("too many items", {"input": ["a"] * 9}, 400, "too many items (9 > limit 8"),
        ("body too large", {"input": ["y" * 300_000]}, 413, "request body too large"),
        ("both input and messages", {"input": "a", "messages": []}, 400, "exactly one of 'input'"),
        ("unknown field", {"input": "a", "dimension": 3}, 400, "unknown field(s) dimension"),
        ("wrong model", {"input": "a", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
        ("encoding format", {"input": "a", "encoding_format": "int8"}, 400, "encoding_format must be"),
        ("dimensions", {"input": "a", "dimensions": 16}, 400, "no Matryoshka"),
        ("unknown task", {"input": [[image_part(data_uri(ok_png))]], "task": "coco"}, 400, "unknown composed task"),
        ("prompt does not fit", {"input": ["a"], "prompt": "<image> in one word:"}, 400,
         "input[0]: the request's prompt"),
        ("two messages", {"messages": [{"role": "user", "content": "a"}] * 2}, 400, "exactly one message"),
        ("system role", {"messages": [{"role": "system", "content": "a"}]}, 400, "role must be 'user'"),
        ("bad part", {"input": [[{"type": "audio", "x": 1}]]}, 400, "input[0][0]: expected a part"),
        ("two images", {"input": [[image_part(data_uri(ok_png))] * 2]}, 400, "input[0][1]: at most one image"),
        ("corrupt base64", img("data:image/png;base64,iVBORw0KGgo@@@"), 400, "input[0][0]: corrupt base64"),
        ("not base64 uri", img("data:image/png,rawbytes"), 400, "must be base64-encoded"),
        ("non-image bytes", img(data_uri(b"this is not an image at all")), 400, "not a recognised image"),
        ("truncated image", img(data_uri(noisy[:len(noisy) // 2])), 400, "input[0][0]: truncated or corrupt"),
        ("decompression bomb", img(data_uri(_bomb())), 400, "image too large (6000x6000"),
        ("image bytes limit", img(data_uri(b"\x89PNG" + bytes(70_000))), 400, "image data too large"),
        ("text with image marker", {"input": ["fine", "look <image> here"]}, 400, "input[1]: the text contains"),
        ("local path not allowed", img(str(files["outside"] / "a.png")), 403, "outside the folders"),
        ("file url not allowed", img((files["outside"] / "a.png").as_uri()), 403, "outside the folders"),
        ("symlink out of allowed", img(str(files["allowed"] / "link.png")), 403, "outside the folders"),
        ("relative path", img("a.png"), 400, "unsupported image URL"),
        ("url not allowed", img("http://127.0.0.1:9/x.png"), 403, "outside the prefixes"),
        ("url dot segments", img(files["web"] + "a/../a.png"), 400, "dot segments"),
        ("url not found", img(files["web"] + "absent.png"), 400, "HTTP 404"),
        ("search without index", None, 404, "has no index"),
    ]


def test_bad_requests_get_a_4xx_with_the_reason_and_the_server_keeps_serving(server, files, pool):
    for name, body, status, reason in _bad_cases(files):
        if body is None:
            r = server.post("/v1/search", json={"text": "a"})
        elif isinstance(body, bytes):
            r = server.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
        else:
            r = server.post("/v1/embeddings", json=body)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert reason in err["message"], (name, err)
        assert err["code"] == status
    chunked = (b" " * 65536 for _ in range(5))  # no Content-Length: the cap holds while the body streams in
    r = server.post("/v1/embeddings", content=chunked, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "request body too large (> limit" in r.json()["error"]["message"], r.text
    r = server.post("/v1/embeddings", json={"input": TEXTS[:2]})  # still serving, still exact
    np.testing.assert_allclose(vectors(r), pool["text"][:2], atol=1e-5)
    assert server.get("/nowhere").json()["error"]["code"] == 404


def test_a_bad_item_fails_only_its_own_request(server, pool):
    """Requests merged into one model call: the engine's rejection of one item reaches that request only."""
    bodies = [{"input": [TEXTS[i % len(TEXTS)], "bad <image> text" if i % 3 == 0 else TEXTS[0]]} for i in range(24)]
    with ThreadPoolExecutor(24) as ex:
        responses = list(ex.map(lambda b: server.post("/v1/embeddings", json=b), bodies))
    for i, r in enumerate(responses):
        if i % 3 == 0:
            assert r.status_code == 400 and "input[1]: the text contains" in r.json()["error"]["message"]
        else:
            np.testing.assert_allclose(vectors(r), pool["text"][[i % len(TEXTS), 0]], atol=1e-5)


def test_a_failing_model_gives_500_and_the_server_goes_on(server, model, pool, monkeypatch):
    """The 500 names the request id (also in X-Request-Id) and none of the exception's text (that is logged)."""
    def broken(feats, **kw):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(model, "run_batch", broken)
    r = server.post("/v1/embeddings", json={"input": TEXTS[:2]})
    err = r.json()["error"]
    assert r.status_code == 500 and "the model failed on this request" in err["message"], err
    assert "CUDA" not in r.text and "RuntimeError" not in r.text
    assert err["request_id"] == r.headers["x-request-id"] and len(err["request_id"]) == 16
    monkeypatch.undo()
    np.testing.assert_allclose(vectors(server.post("/v1/embeddings", json={"input": TEXTS[:2]})), pool["text"][:2],
                               atol=1e-5)


def test_allowed_paths_and_urls_are_read(server, files, pool):
    expected = pool["image"][[0]]
    for url in (str(files["allowed"] / "a.png"), (files["allowed"] / "a.png").as_uri(), files["web"] + "a.png"):
        r = server.post("/v1/embeddings", json={"input": [[image_part(url)]]})
        assert r.status_code == 200, (url, r.text)
        np.testing.assert_allclose(vectors(r), expected, atol=1e-5)


def test_api_key(model):
    settings = Settings(model_name="tiny-e5v", api_key="s3cret", limits=LIMITS)
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url) as c:
        for headers, reason in [({}, "missing API key"), ({"Authorization": "Bearer nope"}, "wrong API key"),
                                ({"Authorization": "Basic s3cret"}, "missing API key")]:
            r = c.post("/v1/embeddings", json={"input": "a"}, headers=headers)
            assert r.status_code == 401 and reason in r.json()["error"]["message"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/metrics").status_code == 401
        assert c.get("/health").json()["auth"] is True  # health stays open for probes
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer s3cret"})
        np.testing.assert_allclose(vectors(r), model.encode_text(["a"]), atol=1e-5)


def test_health_models_and_metrics(server):
    h = server.get("/health").json()
    assert h["status"] == "ok" and h["dim"] == 64 and h["index"] is None and h["auth"] is False
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny-e5v"
    server.post("/v1/embeddings", json={"input": ["a", "b"]})
    server.post("/v1/embeddings", content=b"{")
    text = server.get("/metrics").text
    ok = re.search(r'e5v_requests_total\{endpoint="/v1/embeddings",status="200"\} (\d+)', text)
    bad = re.search(r'e5v_request_errors_total\{endpoint="/v1/embeddings"\} (\d+)', text)
    items = re.search(r'e5v_items_embedded_total\{kind="text"\} (\d+)', text)
    assert ok and int(ok[1]) >= 1 and bad and int(bad[1]) >= 1 and items and int(items[1]) >= 2
    assert 'e5v_request_seconds_bucket{endpoint="/v1/embeddings",le="+Inf"}' in text
    assert "e5v_queued_items 0" in text


def test_the_served_name_defaults_to_the_model_value_so_the_readme_clients_work_as_written(model, pool,
                                                                                           monkeypatch):
    """`e5v serve --model royokong/e5-v` serves the name `royokong/e5-v`: a client that sends it as `model` (the
    README's curl and OpenAI examples) gets the vectors, one that leaves `model` out too; another name is a 404
    `model_not_found` naming the served one. `--served-model-name` replaces the name."""
    from e5v.cli import build_parser
    from e5v.cli.serve import serve_settings

    monkeypatch.delenv("E5V_API_KEY", raising=False)
    settings = serve_settings(build_parser().parse_args(["serve", "--model", "royokong/e5-v"]))
    assert settings.model_name == "royokong/e5-v"
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["royokong/e5-v"]
        for body in ({"model": "royokong/e5-v", "input": TEXTS[:2]}, {"input": TEXTS[:2]}):
            r = c.post("/v1/embeddings", json=body)
            assert r.status_code == 200 and r.json()["model"] == "royokong/e5-v", r.text
            np.testing.assert_allclose(vectors(r), pool["text"][:2], atol=1e-5)
        r = c.post("/v1/embeddings", json={"model": "e5-v", "input": TEXTS[:2]})
        err = r.json()["error"]
        assert r.status_code == 404 and err["type"] == "model_not_found" and err["param"] == "model", r.text
        assert "this server serves 'royokong/e5-v'" in err["message"]
    named = build_parser().parse_args(["serve", "--model", "royokong/e5-v", "--served-model-name", "e5v"])
    assert serve_settings(named).model_name == "e5v"


def test_an_index_of_the_served_checkpoint_is_not_reported_as_another_model(tmp_path, monkeypatch):
    """The index records a local checkpoint as an absolute path; `e5v serve --model ckpt` (relative) with that
    index is the same model, a hub id is not."""
    from e5v.cli import build_parser
    from e5v.cli.serve import index_mismatch

    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--model", "ckpt"])
    assert index_mismatch({"model": os.path.abspath("ckpt"), "adapter": None}, args) is None
    warning = index_mismatch({"model": "royokong/e5-v", "adapter": None}, args)
    assert warning is not None and "built with royokong/e5-v" in warning and "embedded with ckpt" in warning
    assert index_mismatch({"model": os.path.abspath("ckpt"), "adapter": "/elsewhere/lora"}, args) is not None


def test_the_search_pages_files_are_served(model, server):
    """The page's script and style sheet come with their types; ``/static`` is mounted on the app itself, since
    ``include_router`` drops a router's mounts in some FastAPI versions the project allows."""
    from starlette.routing import Mount

    from e5v.serve.routes.search import STATIC

    for name, kind in (("search.js", "javascript"), ("search.css", "text/css")):
        r = server.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.status_code, r.headers)
        assert r.content == (STATIC / name).read_bytes()
    app = create_app(model, Settings(model_name="tiny-e5v"))
    assert [r.path for r in app.router.routes if isinstance(r, Mount)] == ["/static"]


def test_the_engine_refuses_no_image_that_max_pixels_allows(tiny_dirs, monkeypatch):
    """`e5v serve --max-pixels N` sets the engine's limit too (not its default): an image of N pixels is embedded
    through the server, one pixel row more is refused by the request checks and by the engine alike."""
    from e5v.cli import build_parser
    from e5v.cli.serve import serve_config, serve_settings
    from e5v.errors import BatchInputError

    monkeypatch.delenv("E5V_API_KEY", raising=False)
    args = build_parser().parse_args(["serve", "--model", str(tiny_dirs["e5v-like"]), "--max-pixels", "4096"])
    settings, engine = serve_settings(args), E5V.from_pretrained(config=serve_config(args))
    fits, over = Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (64, 65), (200, 40, 40))
    assert settings.limits.max_pixels == 4096
    with pytest.raises(BatchInputError, match="max_pixels 4096"):
        engine.encode_image(over)
    with running(create_app(engine, settings)) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": [[image_part(data_uri(png(fits)))]]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(vectors(r), engine.encode_image(fits), atol=1e-5)
        r = c.post("/v1/embeddings", json={"input": [[image_part(data_uri(png(over)))]]})
        assert r.status_code in (400, 413) and "4096" in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_cli_serves_on_loopback_until_stopped(tiny_dirs, model):
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", E5V_API_KEY="k1")
    proc = subprocess.Popen([sys.executable, "-m", "e5v.cli", "serve", "--model", str(tiny_dirs["e5v-like"]),
                             "--port", str(port), "--served-model-name", "e5v-tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", headers={"Authorization": "Bearer k1"},
                       json={"model": "e5v-tiny", "input": ["A dog runs across the park."]})
        np.testing.assert_allclose(vectors(r), model.encode_text(["A dog runs across the park."]), atol=1e-5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert f"serving e5v-tiny (64-d) on http://127.0.0.1:{port}" in out
    assert "stopped: served " in out and "embedded 1 items" in out


@pytest.mark.slow
def test_preprocessing_overlaps_the_model_in_the_engines_workers(model, pool, monkeypatch):
    """The next group is preprocessed (in the engine's worker process when it has ``num_workers``) while the
    model runs the previous one; the vectors stay the engine's."""
    from e5v.serve.batcher import RequestBatcher

    engine = E5V(model.backbone, num_workers=1)
    original, prepared, next_group_ready = RequestBatcher._prepare, [], threading.Event()
    in_pass, overlapped = threading.Event(), []

    def counting_prepare(self, prompt, jobs):
        out = original(self, prompt, jobs)
        prepared.append(prompt)
        if len(prepared) == 2:  # the texts, sent while the images' pass runs
            next_group_ready.set()
        return out

    def held_pass(feats, **kw):  # a long forward pass: it ends once the next group is prepared (or after 10 s)
        in_pass.set()
        overlapped.append(next_group_ready.wait(10))
        return model.run_batch(feats, **kw)

    body = {"input": [[image_part(u)] for u in pool["uris"]]}
    try:
        with running(create_app(engine, Settings(model_name="tiny-e5v", limits=LIMITS))) as url:
            with httpx.Client(base_url=url, timeout=60) as client:
                assert client.post("/v1/embeddings", json=body).status_code == 200  # starts the worker process
                monkeypatch.setattr(RequestBatcher, "_prepare", counting_prepare)
                engine.run_batch = held_pass
                with ThreadPoolExecutor(2) as ex:
                    first = ex.submit(client.post, "/v1/embeddings", json=body)
                    assert in_pass.wait(30)
                    second = ex.submit(client.post, "/v1/embeddings", json={"input": TEXTS})
                    r1, r2 = first.result(), second.result()
        assert engine._pool is not None  # the images were prepared by the engine's worker process
    finally:
        engine.close()
    assert prepared == [prompts.IMAGE_PROMPT, prompts.TEXT] and overlapped[0] is True
    np.testing.assert_allclose(vectors(r1), pool["image"], atol=1e-5)
    np.testing.assert_allclose(vectors(r2), pool["text"], atol=1e-5)
