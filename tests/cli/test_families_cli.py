"""Every backbone family indexes, searches and serves through the same commands (issue 15): the vectors the index
stores and the server returns are the engine's own, for texts and images."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from e5v import E5V
from e5v.serve.app import create_app
from e5v.serve.server import running
from e5v.serve.service import Settings
from e5v.store import open_index
from e5v.tiny import FAMILIES

from support import random_images
from support.serve import data_uri, image_part, png


@pytest.mark.parametrize("family", FAMILIES)
def test_index_search_and_serve(family, tiny_dirs, cli, tmp_path):
    path = str(tiny_dirs[family])
    engine = E5V.from_pretrained(path, device="cpu", dtype="float32")
    images = random_images(3, seed=5)
    (tmp_path / "photos").mkdir()
    for i, im in enumerate(images):
        im.save(tmp_path / "photos" / f"p{i}.png")
    want = engine.encode_image([str(tmp_path / "photos" / f"p{i}.png") for i in range(3)])

    code, _, err = cli("index", "build", tmp_path / "photos", "--model", path, "--out", tmp_path / "idx",
                       "--device", "cpu", "--dtype", "float32", "--no-progress")
    assert code == 0, err
    index = open_index(tmp_path / "idx")
    assert index.ids() == ["p0.png", "p1.png", "p2.png"]
    np.testing.assert_allclose(index.gather(np.arange(3)), want, atol=1e-5)
    code, out, err = cli("search", tmp_path / "idx", "--image", tmp_path / "photos" / "p1.png", "-k", "3", "--json",
                         "--exact")
    assert code == 0, err
    assert json.loads(out)["results"][0]["id"] == "p1.png"  # an image finds itself first

    with running(create_app(engine, Settings(model_name=family))) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/embeddings", json={"input": ["A dog runs.", [image_part(data_uri(png(images[0])))]]})
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_allclose(got[0], engine.encode_text(["A dog runs."])[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[0], atol=1e-5)
