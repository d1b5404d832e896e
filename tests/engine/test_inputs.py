"""Tests for e5v.images, e5v.items.clean_text and e5v.readers: image validation/conversion, text checks and the
batch-file readers.

Every fixture is built in tmp_path with PIL/numpy; nothing touches the network.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from e5v.errors import InputError
from e5v.images import DEFAULT_MAX_PIXELS, describe, load_image
from e5v.items import clean_text
from e5v.readers import Record, list_images, read_pairs, read_texts


def rejected(src, *fragments, **kw) -> InputError:
    """Assert load_image rejects src with a reason containing every fragment; return the error."""
    with pytest.raises(InputError) as ei:
        load_image(src, **kw)
    err = ei.value
    for frag in fragments:
        assert frag in err.reason, (frag, err.reason)
    assert str(err).startswith(f"{err.item}: ")
    return err


def save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def solid(mode, size, colour):
    return Image.new(mode, size, colour)


def png_claiming(width: int, height: int) -> bytes:
    """A real, tiny PNG whose IHDR claims width x height (the IDAT stays the tiny original)."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --------------------------------------------------------------------------------------- good images


def test_good_jpeg_and_png_load_as_detached_rgb(tmp_path):
    jpg = save(solid("RGB", (32, 24), (200, 30, 40)), tmp_path / "a.jpg", quality=95)
    png = save(solid("RGB", (10, 20), (1, 2, 3)), tmp_path / "b.png")
    fd_dir = "/proc/self/fd"
    before = len(os.listdir(fd_dir)) if os.path.isdir(fd_dir) else None
    a, b = load_image(jpg), load_image(str(png))
    if before is not None:
        assert len(os.listdir(fd_dir)) == before  # no file handle kept open
    assert a.mode == "RGB" and a.size == (32, 24)
    assert np.abs(np.asarray(a, dtype=int)[12, 16] - (200, 30, 40)).max() <= 6
    assert b.size == (10, 20) and b.getpixel((5, 5)) == (1, 2, 3)
    assert getattr(a, "fp", None) is None and getattr(b, "fp", None) is None
    os.remove(png)  # the returned image does not depend on the file anymore
    assert b.getpixel((0, 0)) == (1, 2, 3)


def test_bytes_bytearray_memoryview_inputs(tmp_path):
    buf = io.BytesIO()
    solid("RGB", (6, 4), (9, 8, 7)).save(buf, format="PNG")
    data = buf.getvalue()
    for src in (data, bytearray(data), memoryview(data)):
        im = load_image(src)
        assert im.size == (6, 4) and im.getpixel((0, 0)) == (9, 8, 7)
    err = rejected(b"", "0 bytes")
    assert err.item == "<bytes>"


def test_exif_orientation_turns_the_image_upright(tmp_path):
    """Issue 18: the Orientation tag is applied (it used to be ignored), as photo viewers and the official
    pipeline do; test_inputs_trust.py checks the pixels of every orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW" orientation
    path = save(solid("RGB", (40, 20), (0, 0, 0)), tmp_path / "rot.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


# ----------------------------------------------------------------------------------------- rejections


def test_missing_directory_zero_bytes(tmp_path):
    missing = tmp_path / "nope.jpg"
    err = rejected(missing, "file not found")
    assert err.item == str(missing) and str(missing) in str(err)
    rejected(tmp_path, "is a directory")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rejected(empty, "empty file (0 bytes)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rejected(fifo, "not a regular file")


def test_not_an_image_and_truncated(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello, I am not a JPEG\n" * 20)
    err = rejected(txt, "not a recognised image")
    assert str(txt) in str(err)

    good = save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
                tmp_path / "full.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    err = rejected(cut, "truncated")
    assert err.reason.startswith("truncated or corrupt image data")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally
    err = rejected(cut.read_bytes(), "truncated", item="upload #3")
    assert str(err).startswith("upload #3: truncated or corrupt image data")


def test_item_label_overrides_and_describe(tmp_path):
    err = rejected(tmp_path / "x.png", "file not found", item="row 7")
    assert err.item == "row 7" and str(err) == "row 7: file not found"
    assert describe(tmp_path / "x.png") == str(tmp_path / "x.png")
    assert describe("a/b.jpg", 3) == "a/b.jpg"
    assert describe(b"xx", 4) == "item 4"
    assert describe(b"xx") == "<bytes>"
    assert describe(Image.new("RGB", (2, 2))) == "<PIL image>"
    assert describe(42) == "<int>"


def test_wrong_type_and_allow_paths(tmp_path):
    err = rejected(12, "unsupported input type int")
    assert err.item == "<int>"
    rejected(None, "unsupported input type NoneType")
    path = save(solid("RGB", (4, 4), (5, 5, 5)), tmp_path / "ok.png")
    for src in (path, str(path)):
        rejected(src, "local paths are not allowed", allow_paths=False)
    assert load_image(path.read_bytes(), allow_paths=False).size == (4, 4)


def test_max_bytes(tmp_path):
    path = save(Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 50, 3), dtype=np.uint8)),
                tmp_path / "noise.png")
    n = path.stat().st_size
    rejected(path, "file too large", f"{n} bytes", max_bytes=n - 1)
    rejected(path.read_bytes(), "image data too large", max_bytes=100)
    assert load_image(path, max_bytes=n).size == (50, 50)


def test_too_small_and_aspect(tmp_path):
    one = save(solid("RGB", (1, 1), (0, 0, 0)), tmp_path / "dot.png")
    rejected(one, "too small")
    assert load_image(save(solid("RGB", (2, 2), (0, 0, 0)), tmp_path / "2.png")).size == (2, 2)
    strip = save(solid("RGB", (2, 500), (0, 0, 0)), tmp_path / "strip.png")
    rejected(strip, "aspect ratio")
    assert load_image(strip, max_aspect=None).size == (2, 500)
    assert load_image(strip, max_aspect=250).size == (2, 500)


def test_bomb_rejected_from_header_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(20000, 20000))
    assert bomb.stat().st_size < 200
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(bomb) as im:  # the file really is a PNG claiming that size
            assert im.format == "PNG" and im.size == (20000, 20000)
    # The IDAT is for 8x8, so decoding would say "truncated": "too large" proves the header check ran first.
    rejected(bomb, "image too large")  # PIL's own DecompressionBombError (> 2x its limit) is converted
    rejected(bomb.read_bytes(), "image too large")
    rejected(bomb, "image too large", max_pixels=None)
    # Between our default limit and PIL's: our check decides, even where PIL would only warn (100M px).
    for side in (8000, 10000):
        mid = tmp_path / f"mid{side}.png"
        mid.write_bytes(png_claiming(side, side))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            err = rejected(mid, "image too large", f"{side}x{side}", f"max_pixels {DEFAULT_MAX_PIXELS}")
        assert side * side > DEFAULT_MAX_PIXELS and err.item == str(mid)
    # A lower limit catches a small real image too.
    small = save(solid("RGB", (30, 30), (0, 0, 0)), tmp_path / "s.png")
    rejected(small, "image too large", max_pixels=899)
    assert load_image(small, max_pixels=900).size == (30, 30)


def test_pil_bomb_warning_cannot_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warned = save(solid("RGB", (12, 12), (1, 1, 1)), tmp_path / "w.png")  # 144 px: PIL warns
    err_size = save(solid("RGB", (20, 20), (1, 1, 1)), tmp_path / "e.png")  # 400 px: PIL raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(warned, max_pixels=None).size == (12, 12)
        rejected(err_size, "image too large", max_pixels=None)


# ---------------------------------------------------------------------------------------- conversions


def test_cmyk_jpeg_to_rgb(tmp_path):
    path = save(solid("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    px = np.asarray(load_image(path), dtype=int)[8, 8]
    assert np.abs(px - (0, 255, 255)).max() <= 8  # pure cyan


def test_palette_png_transparency_becomes_white(tmp_path):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((3, 1), 1)
    path = save(im, tmp_path / "pal.png", transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 1)) == (255, 0, 0)
    # Without transparency, index 0 stays black.
    plain = load_image(save(im, tmp_path / "pal2.png"))
    assert plain.getpixel((0, 0)) == (0, 0, 0)


def test_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (3, 2), (0, 0))
    la.putpixel((1, 0), (0, 255))
    out = load_image(save(la, tmp_path / "la.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)

    arr = np.zeros((2, 3, 4), dtype=np.uint8)  # fully transparent black
    arr[0, 1] = (255, 0, 0, 255)
    arr[0, 2] = (0, 0, 0, 128)
    rgba = Image.fromarray(arr, "RGBA")
    out = load_image(save(rgba, tmp_path / "rgba.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (255, 0, 0)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((2, 0)))


def test_pil_input_converted_on_a_copy():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    src = Image.fromarray(arr, "RGBA")
    out = load_image(src)
    assert out is not src and out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    assert src.mode == "RGBA" and src.getpixel((0, 0)) == (0, 0, 0, 0)
    rgb = Image.new("RGB", (3, 3), (4, 5, 6))
    out = load_image(rgb)
    assert out is not rgb and out.getpixel((1, 1)) == (4, 5, 6)
    rejected(Image.new("RGB", (1, 5)), "too small")


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535, 257]], dtype=np.uint16).repeat(2, axis=0)
    path = save(Image.fromarray(arr), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = load_image(path)
    assert out.mode == "RGB"
    row = [out.getpixel((x, 0)) for x in range(4)]
    assert row[0] == (0, 0, 0) and row[2] == (255, 255, 255) and row[3] == (1, 1, 1)
    assert abs(row[1][0] - 128) <= 1


def test_high_depth_pil_modes():
    be = Image.frombytes("I;16B", (2, 2), np.array([[65535, 0], [0, 0]], dtype=">u2").tobytes())
    assert load_image(be).getpixel((0, 0)) == (255, 255, 255)
    i32 = Image.fromarray(np.array([[65535, 0], [32768, 0]], dtype=np.int32))
    assert i32.mode == "I"
    out = load_image(i32)
    assert out.getpixel((0, 0)) == (255, 255, 255) and abs(out.getpixel((0, 1))[0] - 128) <= 1
    f = Image.fromarray(np.array([[1.0, 0.0], [0.5, 0.0]], dtype=np.float32))
    assert f.mode == "F"
    out = load_image(f)
    assert out.getpixel((0, 0)) == (255, 255, 255) and abs(out.getpixel((0, 1))[0] - 128) <= 1
    wide = Image.fromarray(np.array([[-10.0, 0.0], [10.0, 0.0]], dtype=np.float32))
    out = load_image(wide)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((0, 1)) == (255, 255, 255)


def test_simple_modes_convert():
    assert load_image(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    ycc = load_image(Image.new("YCbCr", (2, 2), (255, 128, 128))).getpixel((0, 0))
    assert all(c >= 250 for c in ycc)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [solid("RGB", (8, 8), (255, 0, 0)), solid("RGB", (8, 8), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as im:
        assert im.n_frames == 2
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (255, 0, 0)


# --------------------------------------------------------------------------------------------- texts


def test_clean_text():
    assert clean_text("  a prompt\n") == "  a prompt\n"  # unchanged, byte-exact
    for bad, frag in ((None, "NoneType"), (b"hi", "bytes"), (3, "int")):
        with pytest.raises(InputError) as ei:
            clean_text(bad, item="t1")
        assert frag in ei.value.reason and ei.value.item == "t1"
    for blank in ("", "   \n\t"):
        with pytest.raises(InputError) as ei:
            clean_text(blank, item="line 4")
        assert ei.value.reason == "empty text" and str(ei.value) == "line 4: empty text"


# ------------------------------------------------------------------------------------------- readers


def test_read_texts_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "a cat", "id": "c1", "lang": "en"}\n\n{"text": " spaced "}\n{"text": "x", "id": 9}\n',
                 encoding="utf-8")
    recs = read_texts(p)
    assert recs == [
        Record(id="c1", text="a cat", meta={"lang": "en"}),
        Record(id="2", text=" spaced "),
        Record(id="9", text="x"),
    ]


def test_read_texts_jsonl_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputError) as ei:
        read_texts(p)
    assert ei.value.item == f"{p}:line 3" and "malformed JSON" in ei.value.reason
    p.write_text('{"text": "ok"}\n{"id": "z"}\n', encoding="utf-8")
    with pytest.raises(InputError) as ei:
        read_texts(p)
    assert ei.value.item == f"{p}:line 2" and ei.value.reason == 'missing required field "text"'
    p.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(InputError, match="expected a JSON object"):
        read_texts(p)


def test_read_texts_txt_blank_lines_are_not_items(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"first\n\n  third \r\n \t\nfourth\n")
    recs = read_texts(p)  # ids stay line indices
    assert [(r.id, r.text) for r in recs] == [("0", "first"), ("2", "  third "), ("4", "fourth")]
    p.write_bytes(b"only\n\n")
    assert [r.text for r in read_texts(p)] == ["only"]
    p.write_bytes(b"no newline at end")
    assert [r.text for r in read_texts(p)] == ["no newline at end"]
    p.write_bytes(b"")
    assert read_texts(p) == []


def test_read_texts_file_problems(tmp_path):
    with pytest.raises(InputError) as ei:
        read_texts(tmp_path / "missing.txt")
    assert ei.value.reason == "file not found" and "missing.txt" in ei.value.item
    p = tmp_path / "latin.txt"
    p.write_bytes(b"ok\ncaf\xe9\n")  # a line that is not UTF-8 is one bad item (the engine rejects it), not a bad file
    recs = read_texts(p)
    assert [r.id for r in recs] == ["0", "1"] and recs[1].text.encode("utf-8", "surrogateescape") == b"caf\xe9"


def _tree(root: Path):
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "b.png").write_bytes(b"x")
    (root / "A.JPG").write_bytes(b"x")
    (root / "sub" / "c.webp").write_bytes(b"x")
    (root / "sub" / "deep" / "d.TIFF").write_bytes(b"x")
    (root / "readme.txt").write_text("not an image")
    (root / "sub" / "notes.json").write_text("{}")
    for i in reversed(range(12)):  # created in reverse so that listing order is unlikely to be sorted
        (root / "sub" / "many" / f"n{i:02d}.png").parent.mkdir(exist_ok=True)
        (root / "sub" / "many" / f"n{i:02d}.png").write_bytes(b"x")


def test_list_images_folder_recursive_sorted(tmp_path):
    root = tmp_path / "imgs"
    _tree(root)
    recs = list_images(str(root))
    many = [f"sub/many/n{i:02d}.png" for i in range(12)]
    assert [r.id for r in recs] == ["A.JPG", "b.png", "sub/c.webp", "sub/deep/d.TIFF", *many]
    assert all(r.text is None and Path(r.image) == root / r.id for r in recs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as ei:
        list_images(str(tmp_path / "empty"))
    assert ei.value.reason == "no image files found"


def test_list_images_glob_single_and_missing(tmp_path):
    root = tmp_path / "imgs"
    _tree(root)
    recs = list_images(str(root / "**" / "*.webp"))
    assert [r.image for r in recs] == [str(root / "sub" / "c.webp")]
    # An explicit pattern is taken at its word (non-images are reported at load time), sorted, not recursive.
    recs = list_images(str(root / "*.*"))
    assert [Path(r.id).name for r in recs] == ["A.JPG", "b.png", "readme.txt"]
    with pytest.raises(InputError, match="no image files found"):
        list_images(str(root / "*.gif"))
    single = list_images(str(root / "b.png"))
    assert single == [Record(id=str(root / "b.png"), image=str(root / "b.png"))]
    with pytest.raises(InputError) as ei:
        list_images(str(tmp_path / "nothing.png"))
    assert ei.value.reason == "no such file or folder"


def test_list_images_manifests(tmp_path):
    mdir = tmp_path / "m"
    mdir.mkdir()
    abs_img = str(tmp_path / "abs.png")
    csvp = mdir / "list.csv"
    csvp.write_text(f"id,image,label\nk1,pics/a.png,cat\n,{abs_img},dog\n", encoding="utf-8")
    recs = list_images(str(csvp))
    assert recs == [
        Record(id="k1", image=str(mdir / "pics" / "a.png"), meta={"label": "cat"}),
        Record(id=abs_img, image=abs_img, meta={"label": "dog"}),
    ]
    (mdir / "nohdr.csv").write_text("file\na.png\n")
    with pytest.raises(InputError, match='"image" or "path" column'):
        list_images(str(mdir / "nohdr.csv"))

    jl = mdir / "list.jsonl"
    jl.write_text('{"path": "x.jpg", "split": "val"}\n{"image": "y.jpg", "id": 5}\n{"name": "z"}\n')
    with pytest.raises(InputError) as ei:
        list_images(str(jl))
    assert ei.value.item == f"{jl}:line 3" and '"image"' in ei.value.reason
    jl.write_text('{"path": "x.jpg", "split": "val"}\n{"image": "y.jpg", "id": 5}\n')
    assert list_images(str(jl)) == [
        Record(id="x.jpg", image=str(mdir / "x.jpg"), meta={"split": "val"}),
        Record(id="5", image=str(mdir / "y.jpg")),
    ]

    tx = mdir / "list.txt"
    tx.write_text("one.png\n\nsub/two.png\n")
    assert list_images(str(tx)) == [
        Record(id="one.png", image=str(mdir / "one.png")),
        Record(id="sub/two.png", image=str(mdir / "sub" / "two.png")),
    ]


def test_read_pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"image": "a.png", "text": "a red square", "src": "web"}\n'
                 '{"image": "/abs/b.png", "text": "b", "id": "B"}\n', encoding="utf-8")
    assert read_pairs(p) == [
        Record(id="0", text="a red square", image=str(tmp_path / "a.png"), meta={"src": "web"}),
        Record(id="B", text="b", image="/abs/b.png"),
    ]
    p.write_text('{"image": "a.png", "text": "t"}\n{"image": "b.png"}\n', encoding="utf-8")
    with pytest.raises(InputError) as ei:
        read_pairs(p)
    assert ei.value.item == f"{p}:line 2" and ei.value.reason == 'missing required field "text"'
