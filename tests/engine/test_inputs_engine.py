"""The engine's side of bad and unusual inputs: one bad item fails only itself, in this
process and in worker processes; a bad prompt is the call's clear error; EXIF orientation and the alpha switch
reach the vectors; `e5v eval` embeds with the official conversions."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

import e5v.cli
import e5v.cli.common
from e5v import E5V, prompts
from e5v.items import Item
from e5v.errors import BatchInputError, ConfigError

from e5v.tiny import FAMILIES

from support import TEXTS
from support.serve import Panic


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    """The e5v-like tiny checkpoint; conftest's ``engine`` fixture loads it for this module."""
    return str(tiny_dirs["e5v-like"])


def reasons(res):
    return {i: e.reason for i, e in res.skipped}


def transparent_png() -> bytes:
    """Half transparent, with a colour stored under the transparent half (what the official conversion keeps)."""
    arr = np.random.default_rng(3).integers(0, 255, (40, 48, 4), dtype=np.uint8)
    arr[:, :24, 3] = 0
    arr[:, 24:, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def upright(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


# ------------------------------------------------------------------------------- one bad item, only itself
def test_any_failure_preparing_one_item_fails_only_that_item(engine, monkeypatch):
    bb = engine.backbone
    real_prepare = type(bb).prepare

    def picky(self, text, image=None):  # a tokenizer/processor that fails on some inputs, in two ways
        if "explode" in text:
            raise RuntimeError("the processor fell over")
        if "panic" in text:
            raise Panic("tokenizer panicked")
        return real_prepare(self, text, image)

    monkeypatch.setattr(type(bb), "prepare", picky)
    items = [TEXTS[0], "lone \ud800 surrogate", TEXTS[1], "please explode", "panic now", TEXTS[2]]
    res = engine.embed(items, prompt=prompts.TEXT)
    assert res.indices.tolist() == [0, 2, 5]
    why = reasons(res)
    assert "cannot be encoded as UTF-8" in why[1] and "'\\ud800'" in why[1]
    assert why[3] == "cannot be prepared (RuntimeError: the processor fell over)"
    assert why[4] == "cannot be prepared (Panic: tokenizer panicked)"
    for _, err in res.skipped:
        str(err).encode("utf-8")  # every message can be logged, printed and sent
    np.testing.assert_allclose(res.vectors, engine.encode_text([items[i] for i in (0, 2, 5)]), atol=1e-6)
    streamed = list(E5V(bb, window=2).iter_embed(items, prompt=prompts.TEXT))
    assert [i for c in streamed for i, _ in c.skipped] == [1, 3, 4]
    with pytest.raises(BatchInputError, match="cannot be encoded as UTF-8"):  # encode_* still raise, as documented
        engine.encode_text(items)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_with_an_image_token_fails_that_item_only(family, tiny_dirs):
    """A text that holds the E5-V marker ``<image>`` or one of the family's own image tokens would have the processor
    or the model count an image that is not there: that item alone is skipped, naming the token."""
    m = E5V.from_pretrained(str(tiny_dirs[family]), device="cpu", dtype="float32")
    reserved = m.backbone.reserved_tokens
    assert reserved and all(t in m.backbone.tokenizer.get_vocab() for t in reserved)  # the family's real tokens
    bad = list(dict.fromkeys((prompts.IMAGE, *reserved)))
    res = m.embed(["A dog.", *(f"a {t} b" for t in bad), "hello"], prompt=prompts.TEXT)
    assert res.indices.tolist() == [0, len(bad) + 1]
    assert [r for _, r in sorted(reasons(res).items())] == [
        f"the text contains the image marker {t!r}, a token reserved for images" for t in bad]
    np.testing.assert_allclose(res.vectors, m.encode_text(["A dog.", "hello"]), atol=1e-6)


def test_composed_pair_with_an_unencodable_text(engine, mixed_images):
    pairs = [(mixed_images[0], "is red"), (mixed_images[1], "bad \udcff text"), (mixed_images[2], "zoomed out")]
    res = engine.embed(pairs, prompt=prompts.CIRR_QUERY)
    assert res.indices.tolist() == [0, 2] and "cannot be encoded as UTF-8" in reasons(res)[1]
    np.testing.assert_allclose(res.vectors, engine.encode_composed([pairs[0], pairs[2]]), atol=1e-6)
    res = engine.embed([mixed_images[0], "no\x00such.png", "\ud800.png"], prompt=prompts.IMAGE_PROMPT)
    assert res.indices.tolist() == [0] and all("not a valid file name" in r for r in reasons(res).values())


def test_a_bad_prompt_is_the_calls_clear_error(engine):
    for call in (lambda p: engine.embed(["fine"], prompt=p),
                 lambda p: engine.prepare_window([(0, Item(text="fine", name="x"))], p)):
        with pytest.raises(ConfigError) as ei:
            call("\ud800 <sent>\nSummary:")
        assert "the prompt '\\ud800 <sent>\\nSummary:'" in str(ei.value) and "UTF-8" in str(ei.value)
        str(ei.value).encode("utf-8")


@pytest.mark.slow
def test_workers_fail_only_the_bad_items(engine, mixed_images):
    texts = [TEXTS[0], "lone \ud800", TEXTS[1]]
    images = [mixed_images[0], threading.Lock(), mixed_images[1]]  # a lock cannot be sent to a worker process
    with E5V(engine.backbone, num_workers=1, window=2) as m:
        got = [m.embed(texts, prompt=prompts.TEXT), m.embed(images, prompt=prompts.IMAGE_PROMPT)]
        assert not m._pool.closed  # the workers survived
    ref = E5V(engine.backbone, window=2)  # the same windows in this process
    want = [ref.embed(texts, prompt=prompts.TEXT), ref.embed(images, prompt=prompts.IMAGE_PROMPT)]
    for g, w in zip(got, want):
        assert g.indices.tolist() == w.indices.tolist() == [0, 2]
        np.testing.assert_array_equal(g.vectors, w.vectors)
        assert [(i, str(e)) for i, e in g.skipped] == [(i, str(e)) for i, e in w.skipped]
    assert "unsupported input type lock" in got[1].skipped[0][1].reason


# --------------------------------------------------------------------------- orientation and transparency
def test_exif_orientation_reaches_the_vectors(engine, tmp_path):
    data = rotated_jpeg(6)
    path = tmp_path / "portrait.jpg"
    path.write_bytes(data)
    got = engine.encode_image([str(path), data])
    want = engine.encode_image([upright(data)])
    np.testing.assert_allclose(got, np.concatenate([want, want]), atol=1e-6)
    with Image.open(io.BytesIO(data)) as stored:
        sideways = engine.encode_image([stored.convert("RGB")])
    assert np.abs(got[0] - sideways[0]).max() > 1e-3


@pytest.mark.slow
def test_alpha_switch_of_the_engine(engine):
    data = transparent_png()
    with Image.open(io.BytesIO(data)) as im:
        plain = im.convert("RGB")  # the official pipeline's conversion
        backdrop = Image.new("RGBA", im.size, (255, 255, 255, 255))
        white = Image.alpha_composite(backdrop, im.convert("RGBA")).convert("RGB")
    default = engine.encode_image([data])
    official = E5V(engine.backbone, alpha="official").encode_image([data])
    np.testing.assert_allclose(default, engine.encode_image([white]), atol=1e-6)
    np.testing.assert_allclose(official, engine.encode_image([plain]), atol=1e-6)
    assert np.abs(default - official).max() > 1e-3
    with E5V(engine.backbone, alpha="official", num_workers=1) as m:  # the setting travels to the workers
        np.testing.assert_array_equal(m.encode_image([data]), official)
    with pytest.raises(ConfigError, match="alpha must be one of white, official"):
        E5V(engine.backbone, alpha="grey")


def test_eval_embeds_images_with_the_official_conversions(tiny_dirs, tmp_path, monkeypatch):
    """`e5v eval` on a `datasets` mirror (images read with decode=False): EXIF orientation applied, and the
    official plain RGB conversion of transparent images, which the task definitions set."""
    import datasets

    from e5v.eval import tasks

    assert tasks.ENGINE_OPTIONS == {"alpha": "official"}
    monkeypatch.setattr(e5v.cli, "VERB_MODULES", ("e5v.cli.eval",))
    images = [rotated_jpeg(6), transparent_png(), rotated_jpeg(1)]
    caps = [[f"caption {i} {j}" for j in range(5)] for i in range(len(images))]
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "text": caps},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Sequence(datasets.Value("string"))}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "data" / "flickr30k"))
    loaded = []
    real_load = e5v.cli.common.load_model
    monkeypatch.setattr(e5v.cli.common, "load_model", lambda args, **kw: loaded.append(kw) or real_load(args, **kw))
    rc = e5v.cli.main(["eval", "flickr30k", "--model", str(tiny_dirs["e5v-like"]), "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0 and loaded == [{"alpha": "official"}]
    (folder,) = (tmp_path / "out" / "cache" / "flickr30k").glob("images-*")
    parts = [np.load(f) for f in sorted(folder.glob("part-*.npz"))]
    assert sum(len(p["skipped"]) for p in parts) == 0
    cached = np.concatenate([p["vectors"][np.argsort(p["indices"])] for p in parts])
    m = E5V.from_pretrained(str(tiny_dirs["e5v-like"]), device="cpu", dtype="float32")
    with Image.open(io.BytesIO(images[1])) as im:
        want = m.encode_image([upright(images[0]), im.convert("RGB"), upright(images[2])])
    np.testing.assert_allclose(cached, want, atol=1e-5)

