"""The server under hostile input: one bad item fails only its own request, every answer is JSON with
a request id, decoded pixels stay within a budget (and peak memory with them), idle sockets cannot starve real
clients, image URLs are checked on their normalised form within one deadline, a taken port fails before
anything is announced, and no image format runs a program. Everything runs on 127.0.0.1 and stops by itself."""
from __future__ import annotations

import http.server
import io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from e5v import E5V
from e5v.serve.app import create_app
from e5v.serve.service import Settings
from e5v.serve.limits import Limits
from e5v.serve.server import free_port, running
from support.serve import data_uri, image_part, png, poison_preparation

TEXTS = ["A dog runs across the park.", "a cat sleeps on the sofa", "The stock market fell today.", "red car"]
LIMITS = Limits(max_items=16, max_body_bytes=1 << 20, max_image_bytes=256 << 10, max_pixels=1_000_000,
                max_text_chars=2000)


def raw_json(body) -> bytes:
    """JSON as a hostile client sends it: lone surrogates escaped (``\\ud800``), which httpx's own encoder refuses."""
    return json.dumps(body).encode()


def post(client: httpx.Client, body, path: str = "/v1/embeddings") -> httpx.Response:
    content = body if isinstance(body, bytes) else raw_json(body)
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def vectors(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:300]
    return np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return E5V.from_pretrained(str(tiny_dirs["e5v-like"]))


@pytest.fixture(scope="module")
def expected(model):
    return model.encode_text(TEXTS)


# ------------------------------------------------------------------------------------------ one bad item
def test_a_bad_item_fails_only_its_own_request_whatever_it_raises(model, expected, monkeypatch):
    """Lone surrogates (in an input, a content part, a prompt) and an item on which the engine's preparation raises
    an arbitrary exception, merged with innocent requests into one model call: a 400 for the carrier only."""
    poison_preparation(monkeypatch, "internal detail that must not reach the client")
    backbone_prepare = type(model.backbone).prepare

    def leaky(self, text, image=None):  # raises inside the engine's own per-item wrapper, which keeps the text
        if "LEAK" in text:
            raise RuntimeError("internal detail that must not reach the client")
        return backbone_prepare(self, text, image)

    monkeypatch.setattr(type(model.backbone), "prepare", leaky)
    small = data_uri(png(Image.new("RGB", (8, 8))))
    poisoned = [({"input": [TEXTS[0], "bad \ud800 text"]}, "input[1]"),
                ({"input": [[{"type": "text", "text": "x\udfff"}, image_part(small)]]}, "input[0][0]"),
                ({"input": ["fine"], "prompt": "<sent>\ud800 in one word:"}, "prompt"),
                ({"input": [TEXTS[1], "POISON pill"]}, "input[1]"),
                ({"input": ["PANIC attack", TEXTS[2]]}, "input[0]"),
                ({"input": [TEXTS[2], "a LEAK here"]}, "input[1]")]
    settings = Settings(model_name="tiny", limits=LIMITS, batch_wait_ms=30)
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        jobs = [(p, w) for _ in range(4) for p, w in poisoned] + [({"input": TEXTS}, None)] * 24
        with ThreadPoolExecutor(16) as ex:
            responses = list(ex.map(lambda job: post(client, job[0]), jobs))
        merged = client.get("/metrics").text
    for (_, where), r in zip(jobs, responses):
        if where is None:
            np.testing.assert_allclose(vectors(r), expected, atol=1e-5)
        else:
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == where and where in err["message"], (where, r.text)
            assert "internal detail" not in r.text
    # the poisoned and the innocent requests did share model calls (more items per call than one request holds)
    calls = {le: float(n) for le, n in (line.split('le="')[1].split('"} ') for line in merged.splitlines()
                                        if line.startswith("e5v_batch_items_bucket"))}
    assert calls["+Inf"] - calls["4"] > 0, merged


def test_a_model_failure_on_one_request_spares_the_requests_merged_with_it(model, expected, monkeypatch):
    """The model raises on any forward pass that holds one particular (long) text: merged groups are rerun
    request by request, so only the request that carried it gets the 500, with no internals in its body."""
    from e5v import Item, prompts

    long_text = "word " * 300
    threshold = len(model.prepare(Item(text=long_text, name="x"), prompts.TEXT)) - 1
    assert max(len(model.prepare(Item(text=t, name="x"), prompts.TEXT)) for t in TEXTS) < threshold
    real_batch = model.run_batch

    def crashes_on_long(feats, **kw):
        if any(len(f) >= threshold for f in feats):
            raise RuntimeError("CUDA error: an internal detail")
        return real_batch(feats, **kw)

    monkeypatch.setattr(model, "run_batch", crashes_on_long)
    settings = Settings(model_name="tiny", limits=LIMITS, batch_wait_ms=30)
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        bodies = [{"input": [TEXTS[0], long_text]} if i % 4 == 0 else {"input": TEXTS} for i in range(24)]
        with ThreadPoolExecutor(12) as ex:
            responses = list(ex.map(lambda b: post(client, b), bodies))
    for r in responses[1::4] + responses[2::4] + responses[3::4]:
        np.testing.assert_allclose(vectors(r), expected, atol=1e-5)
    for r in responses[::4]:
        assert r.status_code == 500 and "the model failed on this request" in r.text, r.text
        assert "CUDA" not in r.text and r.json()["error"]["request_id"] == r.headers["x-request-id"]


# --------------------------------------------------------------------------------------- always JSON
def test_every_answer_is_json_with_a_request_id(model, expected, monkeypatch):
    """Deep JSON, a 5,000-digit integer, an unencodable field name, CR/LF in image URLs, broken HTTP and a
    crashing handler: each gets a JSON error on a connection that goes on serving; internals stay in the log."""
    import e5v.serve.routes.embeddings as embeddings_route

    settings = Settings(model_name="tiny", limits=LIMITS, allow_urls=("http://127.0.0.1:9/img/",),
                        allow_paths=("/tmp",))
    cases = [
        ("deep json", b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "nested too deeply"),
        ("deeper json", b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
        ("huge integer", b'{"input": "a", "dimensions": ' + b"7" * 5000 + b"}", 400, "more than 4300 digits"),
        ("unencodable field name", raw_json({"input": "a", "\ud800x": 1}), 400, "unknown field(s) \ud800x"),
        ("unencodable model name", raw_json({"input": "a", "model": "\udcff"}), 404, "is not served here"),
        ("crlf url", {"input": [[image_part("http://127.0.0.1:9/img/a.png\r\nX-Evil: 1")]]}, 400, "control char"),
        ("crlf data uri", {"input": [[image_part("data:image/png;base64,iVBO\r\nRw0K")]]}, 400, "corrupt base64"),
        ("crlf path", {"input": [[image_part("/tmp/a\r\n.png")]]}, 400, "file not found"),
        ("crlf in text", {"input": ["a\r\nb"], "encoding_format": "float\r\n"}, 400, "encoding_format must be"),
    ]
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for name, body, status, reason in cases:
            r = post(client, body)
            assert r.status_code == status and r.headers["content-type"] == "application/json", (name, r.text[:300])
            err = r.json()["error"]
            assert reason in err["message"] and err["request_id"] == r.headers["x-request-id"], (name, err)
        np.testing.assert_allclose(vectors(post(client, {"input": TEXTS})), expected, atol=1e-5)

        def crash(*args):
            raise KeyError("secret-internal-state")

        monkeypatch.setattr(embeddings_route, "embeddings_json", crash)
        r = post(client, {"input": TEXTS})
        err = r.json()["error"]
        assert r.status_code == 500 and "internal server error" in err["message"], r.text
        assert "secret-internal-state" not in r.text and err["request_id"] == r.headers["x-request-id"]
        monkeypatch.undo()
        np.testing.assert_allclose(vectors(post(client, {"input": TEXTS})), expected, atol=1e-5)
        assert client.get("/nowhere").headers["content-type"] == "application/json"

        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:  # not HTTP at all
            s.sendall(b"GARBAGE \x00\xff\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head, answer[:300]
        assert "malformed HTTP request" in json.loads(body)["error"]["message"]


# ---------------------------------------------------------------------------------------- memory budget
def bomb_png(side: int = 6000) -> bytes:
    return png(Image.new("1", (side, side)))  # side^2 pixels in a few kB: 150-400 MB once decoded


def test_decoded_pixels_are_budgeted_per_request_and_across_the_queue(model, monkeypatch):
    """Counted from the headers before anything is decoded: a request over its own budget gets 413 and decodes
    nothing; while one request holds the server's budget, another one with images gets 503; all is given back."""
    import e5v.serve.sources as sources

    decoded = []
    real_load = sources.load_image
    monkeypatch.setattr(sources, "load_image", lambda src, **kw: decoded.append(kw["item"]) or real_load(src, **kw))
    limits = Limits(max_items=16, max_body_bytes=1 << 20, max_image_bytes=256 << 10, max_pixels=1_000_000,
                    max_request_pixels=1_000_000)
    big, small = data_uri(png(Image.new("RGB", (1000, 1000), "red"))), data_uri(png(Image.new("RGB", (8, 8), "blue")))
    settings = Settings(model_name="tiny", limits=limits, max_queue_pixels=1_000_000)
    app = create_app(model, settings)
    release, in_pass = threading.Event(), threading.Event()
    real_batch = model.run_batch

    def held(feats, **kw):
        in_pass.set()
        release.wait(30)
        return real_batch(feats, **kw)

    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        r = post(client, {"input": [[image_part(small)], [image_part(big)]]})  # 1,000,064 pixels > 1,000,000
        assert r.status_code == 413 and "input[1][0]: the request's images hold 1000064 pixels" in r.text, r.text
        assert decoded == [] and app.state.service.pixels.used == 0
        monkeypatch.setattr(model, "run_batch", held)
        with ThreadPoolExecutor(1) as ex:
            first = ex.submit(post, client, {"input": [[image_part(big)]]})
            assert in_pass.wait(30)
            assert app.state.service.pixels.used == 1_000_000
            r = post(client, {"input": [[image_part(small)]]})
            assert r.status_code == 503 and "too many image pixels" in r.json()["error"]["message"], r.text
            release.set()
            assert first.result().status_code == 200
        monkeypatch.setattr(model, "run_batch", real_batch)
        np.testing.assert_allclose(vectors(post(client, {"input": [[image_part(small)]]})),
                                   model.encode_image([Image.new("RGB", (8, 8), "blue")]), atol=1e-5)
        assert app.state.service.pixels.used == 0


def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}


def start_server(tiny_dirs, *extra, preexec_fn=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "e5v.cli", "serve", "--model", str(tiny_dirs["e5v-like"]),
                             "--port", str(port), *extra], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


MEMORY_BOUND_MIB = 300  # peak growth allowed under the 12-bomb request (one bomb decoded costs more than this)


@pytest.mark.slow
def test_peak_memory_stays_bounded_under_a_request_of_12_bomb_pngs(tiny_dirs):
    """`e5v serve` with its default limits; a 1-bit 6000x6000 PNG is 4.5 kB and 36 M pixels. Twelve in one request
    (432 M pixels, 71 kB) are refused from their headers: the server's peak RSS grows by less than
    MEMORY_BOUND_MIB. One alone (within the request budget of 64 M pixels) is embedded, for comparison."""
    bomb = data_uri(bomb_png())
    proc, url = start_server(tiny_dirs)
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            before = vm(proc.pid)
            r = post(client, {"input": [[image_part(bomb)] for _ in range(12)]})
            after = vm(proc.pid)
            growth = after["VmHWM"] - before["VmRSS"]
            print(f"\n12 bomb PNGs in one request ({len(bomb) * 12 // 1024} kB): HTTP {r.status_code}; RSS before "
                  f"{before['VmRSS']} MiB, peak after {after['VmHWM']} MiB: growth {growth} MiB "
                  f"(bound {MEMORY_BOUND_MIB} MiB)")
            assert r.status_code == 413 and "more than the limit of 64000000 per request" in r.text, r.text[:300]
            assert growth < MEMORY_BOUND_MIB
            one = post(client, {"input": [[image_part(bomb)]]})
            print(f"one bomb PNG alone: HTTP {one.status_code}; peak {vm(proc.pid)['VmHWM']} MiB "
                  f"(+{vm(proc.pid)['VmHWM'] - before['VmRSS']} MiB over the RSS before)")
            assert one.status_code == 200, one.text[:300]
    finally:
        stop(proc)


# ------------------------------------------------------------------------------------------ connections
@pytest.mark.slow
def test_idle_sockets_cannot_starve_real_clients(tiny_dirs, model):
    """400 idle sockets (half of them trickling a header) against `e5v serve` with a descriptor limit of 256 (a
    common ulimit is 1024): the longest-idle connections are closed to make room, and a real client is served."""
    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc, url = start_server(tiny_dirs, preexec_fn=low_fd_limit)
    idle = []
    try:
        port = int(url.rsplit(":", 1)[1])
        for i in range(400):
            s = socket.socket()
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            if i % 2:
                s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            idle.append(s)
        start = time.monotonic()
        r = httpx.post(url + "/v1/embeddings", json={"input": TEXTS}, timeout=20)
        print(f"\nreal client served in {time.monotonic() - start:.2f} s with 400 idle sockets open")
        np.testing.assert_allclose(vectors(r), model.encode_text(TEXTS), atol=1e-5)
    finally:
        for s in idle:
            s.close()
        stop(proc)


@pytest.mark.slow
def test_header_and_keep_alive_timeouts_and_busy_cap(model):
    """A socket that sends nothing, or trickles a header, is closed after the header timeout; an idle kept-alive
    connection after the keep-alive timeout; a body that does not arrive in time gets a JSON 408; when every
    connection is busy, a newcomer gets a JSON 503."""
    from e5v.serve.server import Connections

    conns = Connections(header_timeout=1.0, keep_alive_timeout=1, max_connections=8)
    release = threading.Event()
    real_batch = model.run_batch

    def slow(feats, **kw):
        release.wait(30)
        return real_batch(feats, **kw)

    app = create_app(model, Settings(model_name="tiny", limits=LIMITS, body_timeout=1.0))
    batcher, arrived = app.state.service.batcher, []
    real_embed = batcher.embed

    async def counting_embed(*args, **kwargs):  # a request that reaches the batcher is busy on its connection
        arrived.append(1)
        return await real_embed(*args, **kwargs)

    batcher.embed = counting_embed
    with running(app, connections=conns) as url:
        host, port = url.removeprefix("http://").split(":")

        def closed_after(sock: socket.socket, trickle: bool) -> float:
            start = time.monotonic()
            while time.monotonic() - start < 10:
                if trickle:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        return time.monotonic() - start
                sock.settimeout(0.2)
                try:
                    if sock.recv(1024) == b"":
                        return time.monotonic() - start
                except socket.timeout:
                    pass
                except OSError:
                    return time.monotonic() - start
            return float("inf")

        silent = socket.create_connection((host, int(port)))
        trickling = socket.create_connection((host, int(port)))
        trickling.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert closed_after(silent, False) < 3 and closed_after(trickling, True) < 3
        with socket.create_connection((host, int(port))) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in kept.recv(65536)
            assert closed_after(kept, False) < 3
        with socket.create_connection((host, int(port)), timeout=10) as slow_body:
            slow_body.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 1000\r\n\r\n{\"input\": ")
            start, answer = time.monotonic(), b""
            while b"}}" not in answer and (chunk := slow_body.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
            assert time.monotonic() - start < 4

        model.run_batch = slow
        try:
            with ThreadPoolExecutor(8) as ex:
                busy = [ex.submit(httpx.post, url + "/v1/embeddings", json={"input": [t]}, timeout=60)
                        for t in TEXTS * 2]
                deadline = time.monotonic() + 30
                while len(arrived) < 8 and time.monotonic() < deadline:
                    time.sleep(0.05)
                with socket.create_connection((host, int(port)), timeout=10) as extra:
                    answer = b""
                    while chunk := extra.recv(65536):
                        answer += chunk
                release.set()
                assert all(f.result().status_code == 200 for f in busy)
        finally:
            del model.run_batch
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and "too many open connections" in json.loads(body)["error"]["message"]


# -------------------------------------------------------------------------------------------- image URLs
class Upstream(http.server.BaseHTTPRequestHandler):
    """/img/a.png an image, /secret.txt a secret, /img/slow a body trickled forever, /img/slowhead headers
    trickled forever; every path asked for is recorded."""

    seen: list[str] = []
    image = b""

    def do_GET(self):
        Upstream.seen.append(self.path)
        try:
            if self.path == "/img/a.png":
                self.reply(200, self.image)
            elif self.path == "/secret.txt":
                self.reply(200, b"the secret")
            elif self.path == "/img/slow":
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                for _ in range(300):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif self.path == "/img/slowhead":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(300):
                    self.wfile.write(b"X-Slow: 1\r\n")
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.reply(404, b"")
        except OSError:
            pass

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    Upstream.seen, Upstream.image = [], png(Image.new("RGB", (8, 8), "green"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_allow_list_is_checked_on_the_normalised_url(model, upstream):
    settings = Settings(model_name="tiny", limits=LIMITS, allow_urls=(upstream + "/img/",))
    escapes = ["/img/%2e%2e/secret.txt", "/img/%2E%2E/secret.txt", "/img/..%2fsecret.txt", "/img/%252e%252e/secret.txt",
               "/img/.%2e/secret.txt", "/img/%2e%2e%5csecret.txt", "/IMG/../secret.txt", "/img/./../secret.txt"]
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in escapes:
            r = post(client, {"input": [[image_part(upstream + path)]]})
            assert r.status_code in (400, 403) and r.json()["error"]["param"] == "input[0][0]", (path, r.text)
        assert "/secret.txt" not in Upstream.seen and Upstream.seen == [], Upstream.seen
        r = post(client, {"input": [[image_part(upstream + "/img/a.png")]]})
        np.testing.assert_allclose(vectors(r), model.encode_image([Image.new("RGB", (8, 8), "green")]), atol=1e-5)


@pytest.mark.slow
def test_url_fetch_has_one_total_deadline(model, upstream):
    settings = Settings(model_name="tiny", limits=LIMITS, allow_urls=(upstream + "/img/",), url_timeout=1.5)
    with running(create_app(model, settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        for path in ("/img/slow", "/img/slowhead"):
            start = time.monotonic()
            r = post(client, {"input": [[image_part(upstream + path)]]})
            took = time.monotonic() - start
            assert r.status_code == 400 and "took longer than 1.5 s" in r.json()["error"]["message"], (path, r.text)
            assert took < 4, (path, took)


# ------------------------------------------------------------------------------------------ port in use
@pytest.mark.slow
def test_a_taken_port_fails_before_serving_is_announced(tiny_dirs):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "e5v.cli", "serve", "--model", str(tiny_dirs["e5v-like"]),
                               "--port", str(port)], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "serving" not in proc.stdout
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- no program is run
def test_an_eps_image_is_refused_and_ghostscript_never_runs(model, monkeypatch):
    """Pillow opens EPS and runs Ghostscript on it to decode; the server must refuse it before that."""
    import subprocess as sp

    started = []

    def no_programs(*args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        raise OSError("no program may run")

    monkeypatch.setattr(sp, "Popen", no_programs)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # as on a fresh process: Pillow looks for gs again
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, "EPS")
    eps = buf.getvalue()
    with running(create_app(model, Settings(model_name="tiny", limits=LIMITS))) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        for mime in ("application/postscript", "image/png"):
            for body in ({"input": [[image_part(data_uri(eps, mime))]]},
                         {"messages": [{"role": "user", "content": [image_part(data_uri(eps, mime)),
                                                                    {"type": "text", "text": "red"}]}]}):
                r = post(client, body)
                assert started == [], started  # Pillow's EPS decoder looked for Ghostscript to run it
                assert r.status_code == 400 and "not a recognised image" in r.json()["error"]["message"], r.text
