"""Search over a real index (built with ``e5v index build``) through the server, and the search page in headless
Chromium: a text query and an image query each show a grid of thumbnails with scores."""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from e5v import E5V, prompts
from e5v.cli import main as e5v_main
from e5v.serve.app import create_app
from e5v.serve.service import Settings
from e5v.serve.server import running
from e5v.store import open_index

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 30)}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def shape(color, kind: str) -> Image.Image:
    im = Image.new("RGB", (64, 48), (245, 245, 240))
    draw = ImageDraw.Draw(im)
    (draw.ellipse if kind == "circle" else draw.rectangle)((12, 6, 52, 42), fill=color)
    return im


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, tiny_dirs):
    """Eight images in a sub-folder (ids with a '/'), indexed by the real ``e5v index build``."""
    root = tmp_path_factory.mktemp("serve_gallery")
    (root / "photos" / "shapes").mkdir(parents=True)
    paths = {}
    for name, color in COLORS.items():
        for kind in ("circle", "square"):
            path = root / "photos" / "shapes" / f"{name}-{kind}.png"
            shape(color, kind).save(path)
            paths[f"shapes/{name}-{kind}.png"] = path
    out = root / "index"
    assert e5v_main(["index", "build", str(root / "photos"), "--model", str(tiny_dirs["e5v-like"]),
                     "--out", str(out), "--no-progress"]) == 0
    return {"paths": paths, "index": out}


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return E5V.from_pretrained(str(tiny_dirs["e5v-like"]))


@pytest.fixture(scope="module")
def server(model, gallery):
    index = open_index(gallery["index"])
    with running(create_app(model, Settings(model_name="tiny-e5v"), index)) as url:
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def expected_ranking(model, gallery, query: np.ndarray) -> tuple[list[str], np.ndarray]:
    ids = sorted(gallery["paths"])
    vecs = model.encode_image([gallery["paths"][i] for i in ids], prompt=prompts.IMAGE_PROMPT)
    scores = vecs @ query
    order = np.argsort(-scores, kind="stable")
    return [ids[i] for i in order], scores[order]


def test_search_by_text_image_and_both(server, model, gallery):
    blue = gallery["paths"]["shapes/blue-square.png"]
    r = server.post("/v1/search", json={"image": data_uri(blue), "k": 3})
    hits = r.json()["data"]
    assert r.json()["query"] == {"kind": "image"} and len(hits) == 3
    assert hits[0]["id"] == "shapes/blue-square.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["meta"]["image"] == str(blue) and hits[0]["thumbnail"] == "/v1/thumbnail/shapes%2Fblue-square.png"

    cases = [({"text": "a red circle"}, model.encode_text(["a red circle"])[0], "text"),
             ({"text": "make it green", "image": data_uri(blue)},
              model.encode_composed([(Image.open(blue), "make it green")], task="cirr")[0], "composed")]
    for body, query, kind in cases:
        r = server.post("/v1/search", json=body | {"k": 8})
        assert r.status_code == 200 and r.json()["query"]["kind"] == kind
        ids, scores = expected_ranking(model, gallery, query)
        got = r.json()["data"]
        np.testing.assert_allclose([h["score"] for h in got], scores, atol=1e-5)
        assert {h["id"] for h in got} == set(ids)
    assert len(server.post("/v1/search", json={"text": "x", "k": 50}).json()["data"]) == 8  # k > count


def test_search_rejects_bad_queries(server):
    for body, reason in [({}, "send 'text', 'image'"), ({"text": "a", "k": 0}, "k must be an integer"),
                         ({"text": "a", "k": True}, "k must be an integer"), ({"text": ""}, "text: empty text"),
                         ({"image": "data:image/png;base64,AAAA"}, "image: not a recognised image"),
                         ({"text": "a", "limit": 3}, "unknown field(s) limit")]:
        r = server.post("/v1/search", json=body)
        assert r.status_code == 400 and reason in r.json()["error"]["message"], (body, r.text)


def test_thumbnails_are_downscaled_images_of_the_index(server):
    r = server.get("/v1/thumbnail/shapes/yellow-circle.png", params={"size": 32})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert max(im.size) == 32 and im.size == (32, 24)
    centre = np.asarray(im.convert("RGB"))[10:14, 14:18].reshape(-1, 3).mean(0)
    assert np.abs(centre - COLORS["yellow"]).max() < 25
    same = server.get("/v1/thumbnail/" + quote("shapes/yellow-circle.png", safe=""), params={"size": 32})
    assert same.content == r.content  # encoded '/' reaches the same item
    missing = server.get("/v1/thumbnail/shapes/purple.png")
    assert missing.status_code == 404 and "no image item" in missing.json()["error"]["message"]


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands in
    on fd 3, replies out on fd 4, NUL-terminated JSON), so that the test types, clicks and uploads a file the
    way a user does; no extra package needed."""

    def __init__(self, profile, size=(1100, 720)):
        to_child_r, self.out = os.pipe()
        self.inp, from_child_w = os.pipe()
        a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w))  # clear of fds 3 and 4
        os.close(to_child_r)
        os.close(from_child_w)
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                "about:blank"]
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$@" 3<&{a} 4>&{b} {a}<&- {b}>&-', "bash", *args],
                                     pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self.buf, self.last, self.session = b"", 0, None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        self.last += 1
        msg = {"id": self.last, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:  # replies and events; events have no id
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.last:
                    assert "error" not in reply, (method, reply["error"])
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method}")
            chunk = os.read(self.inp, 1 << 20)
            assert chunk, "chromium exited"
            self.buf += chunk

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, (expression, r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"the page never showed {expression}: {self.js(STATE)}"
            time.sleep(0.05)
        return value

    def click(self, selector: str) -> None:
        """A left click with the mouse at the middle of the element."""
        x, y = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def drop_file(self, selector: str, path) -> None:
        """Drag a file from the desktop and drop it on the element."""
        x, y = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
        for kind in ("dragEnter", "dragOver", "drop"):
            self.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=data)

    def choose_file(self, selector: str, path) -> None:
        """What the file chooser does: set the input's files (its change event fires)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", files=[str(path)], nodeId=node)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
            self.proc.wait(10)
        except (AssertionError, OSError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        os.close(self.out)
        os.close(self.inp)


#: what the page shows: the results' state and kind, the status line, and each card with its thumbnail
STATE = """(() => { const r = document.getElementById("results");
  if (!r) return {state: "no page"};
  return {state: r.dataset.state, kind: r.dataset.kind, status: document.getElementById("status").textContent,
          hits: [...r.querySelectorAll(".hit")].map((h) => {
            const img = h.querySelector("img");
            return {id: h.dataset.id, score: h.querySelector(".score").textContent,
                    src: img ? img.src : null, drawn: img ? img.complete && img.naturalWidth : 0}; })}; })()"""

#: true once a new search finished and every thumbnail of its cards is decoded
SETTLED = """(() => { const r = document.getElementById("results");
  return !!r && r.dataset.state === "done" && r.dataset.kind === %s &&
         [...r.querySelectorAll(".hit img")].every((i) => i.complete && i.naturalWidth > 0); })()"""


def shown(browser: Browser, kind: str) -> dict:
    browser.wait_for(SETTLED % json.dumps(kind))
    return browser.js(STATE)


def test_queries_are_embedded_as_the_index_was_built(tmp_path, tiny_dirs, model, monkeypatch):
    """`e5v serve --index` takes the vector options its flags leave open from the index, as `e5v search` does: an
    index built with --max-length 32, served without --max-length, gets queries truncated at 32 tokens too (a long
    stored text finds itself at score 1). The same --model is no mismatch."""
    from e5v.cli import build_parser
    from e5v.cli.serve import index_mismatch, serve_config, serve_settings

    monkeypatch.delenv("E5V_API_KEY", raising=False)
    long = "a red circle on a pale background beside a small green square and a blue triangle under a tree"
    source = tmp_path / "texts.jsonl"
    source.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n"
                              for i, t in enumerate([long, "a cat sleeps", "the stock market fell"])))
    ckpt, out = str(tiny_dirs["e5v-like"]), tmp_path / "index"
    assert e5v_main(["index", "build", str(source), "--model", ckpt, "--max-length", "32", "--out", str(out),
                     "--no-progress"]) == 0
    index = open_index(out)
    args = build_parser().parse_args(["serve", "--model", ckpt, "--index", str(out)])
    config = serve_config(args, index)
    assert config.max_length == 32 and index_mismatch(index.info, config) is None
    truncated = E5V(model.backbone, max_length=32).encode_text([long])
    assert not np.allclose(truncated, model.encode_text([long]), atol=1e-3)  # the limit changes this vector
    with running(create_app(E5V.from_pretrained(config=config), serve_settings(args), index)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/embeddings", json={"input": [long]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose([r.json()["data"][0]["embedding"]], truncated, atol=1e-5)
        r = client.post("/v1/search", json={"text": long, "k": 1})
        assert r.status_code == 200, r.text
        hit = r.json()["data"][0]
        assert hit["id"] == "t0" and hit["score"] == pytest.approx(1.0, abs=1e-4), hit


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (the project's set-up installs it)")
def test_search_page_in_headless_chromium(server, gallery, tmp_path):
    """A user types a text and clicks Search, chooses an image file, drops another image on the page, then adds
    a text to that image: each time the grid shows the API's results with every thumbnail drawn."""
    base = str(server.base_url).rstrip("/")
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=f"{base}/")
        browser.wait_for("document.getElementById('info')?.textContent.includes('8 items')")

        browser.click("#text")
        browser.call("Input.insertText", text="a red circle")
        browser.js("document.getElementById('k').value = '24'")
        browser.click("#go")
        page = shown(browser, "text")
        api = server.post("/v1/search", json={"text": "a red circle", "k": 24}).json()["data"]
        assert [(h["id"], h["score"]) for h in page["hits"]] == [(h["id"], f"{h['score']:.3f}") for h in api]
        assert len(api) == 8 and "8 results for a text query" in page["status"]
        assert all(h["src"].startswith("blob:") and h["drawn"] == 64 for h in page["hits"])  # thumbnails decoded

        browser.js("document.getElementById('text').value = ''")
        blue = gallery["paths"]["shapes/blue-square.png"]
        browser.choose_file("#file", blue)  # the "choose one" file input: reads the file, then searches
        page = shown(browser, "image")
        assert browser.js("document.getElementById('preview').src").startswith("data:image/png;base64,")
        assert len(page["hits"]) == 8 and page["hits"][0]["id"] == "shapes/blue-square.png"
        assert page["hits"][0]["score"] == "1.000" and all(h["drawn"] == 64 for h in page["hits"])
        shot = tmp_path / "search_page.png"
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))

        browser.click("#clear-image")
        green = gallery["paths"]["shapes/green-circle.png"]
        browser.drop_file("#drop", green)  # dropped on the drop zone: replaces the image, searches
        browser.wait_for("document.getElementById('results').firstChild?.dataset.id === 'shapes/green-circle.png'")
        assert shown(browser, "image")["hits"][0]["score"] == "1.000"

        browser.click("#text")
        browser.call("Input.insertText", text="make it blue")
        browser.click("#go")  # the image stays: a composed query
        page = shown(browser, "composed")
        api = server.post("/v1/search", json={"text": "make it blue", "image": data_uri(green), "k": 24}).json()
        assert [(h["id"], h["score"]) for h in page["hits"]] == [(h["id"], f"{h['score']:.3f}") for h in api["data"]]
    finally:
        browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for name, color in COLORS.items():  # every colour's thumbnail is drawn (only blue is in the query preview)
        near = (np.abs(pixels - color).max(axis=1) < 30).sum()
        assert near > 200, (name, near)
    print(f"screenshot: {shot}")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (the project's set-up installs it)")
def test_search_page_links_run_their_query(server, tmp_path):
    """``/?q=TEXT&k=N`` (a link to a search) opens with that search done."""
    base = str(server.base_url).rstrip("/")
    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Page.navigate", url=f"{base}/?q={quote('a red circle')}&k=3")
        page = shown(browser, "text")
    finally:
        browser.close()
    api = server.post("/v1/search", json={"text": "a red circle", "k": 3}).json()["data"]
    assert [h["id"] for h in page["hits"]] == [h["id"] for h in api]
