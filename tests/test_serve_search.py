"""Search over a real index (built with ``e5v index build``) through the server, and the search page in headless
Chromium: a text query and an image query each show a grid of thumbnails with scores."""
from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from e5v import E5V, prompts
from e5v.cli import main as e5v_main
from e5v.serve.app import Settings, create_app
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


def run_page(url: str, screenshot=None) -> str:
    """The page's DOM after its scripts (and their fetches) ran, from headless Chromium."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--virtual-time-budget=15000", "--window-size=1100,720", "--dump-dom", url]
    if screenshot is not None:
        cmd.insert(-1, f"--screenshot={screenshot}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def page_hits(dom: str) -> list[tuple[str, str]]:
    """(id, thumbnail src) of each result card, in page order."""
    return re.findall(r'<div class="hit" data-id="([^"]+)"><div class="thumb"><img alt="[^"]*" src="([^"]*)"', dom)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (the project's set-up installs it)")
def test_search_page_in_headless_chromium(server, gallery, tmp_path):
    base = str(server.base_url).rstrip("/")
    dom = run_page(f"{base}/?q={quote('a red circle')}&k=8")
    assert 'data-state="done"' in dom and 'data-kind="text"' in dom and "8 results for a text query" in dom
    hits = page_hits(dom)
    api = server.post("/v1/search", json={"text": "a red circle", "k": 8}).json()["data"]
    assert [h[0] for h in hits] == [h["id"] for h in api]  # the page shows the API's ranking
    assert all(src.startswith("blob:") for _, src in hits)  # each thumbnail was fetched and shown
    scores = re.findall(r'<span class="score">([0-9.]+)</span>', dom)
    assert scores == [f"{h['score']:.3f}" for h in api]

    shot = tmp_path / "search_page.png"
    blue = gallery["paths"]["shapes/blue-square.png"]
    dom = run_page(f"{base}/?k=8#image={quote(data_uri(blue), safe='')}", screenshot=shot)
    assert 'data-state="done"' in dom and 'data-kind="image"' in dom
    hits = page_hits(dom)
    assert len(hits) == 8 and hits[0][0] == "shapes/blue-square.png"
    assert re.search(r'<span class="score">1\.000</span>', dom)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for name, color in COLORS.items():  # every colour's thumbnail is drawn (only blue is in the query preview)
        near = (np.abs(pixels - color).max(axis=1) < 30).sum()
        assert near > 200, (name, near)
    print(f"screenshot: {shot}")
