"""Hostile and unusual image files and the official pipeline's conversions in
e5v.images.load_image: only raster formats, no half-decoded files, EXIF orientation, alpha handling, and the
decode-time reduction that bounds memory. Every fixture is built here with PIL/numpy."""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageOps

from e5v.errors import ConfigError, InputError
from e5v.images import load_image
from e5v.items import clean_text


def rejected(src, *fragments, **kw) -> InputError:
    with pytest.raises(InputError) as ei:
        load_image(src, **kw)
    for frag in fragments:
        assert frag in ei.value.reason, (frag, ei.value.reason)
    return ei.value


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int) -> Image.Image:
    """A photo-like gradient (JPEG keeps it well, so scaled decodes can be compared by value)."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8))


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n")


# ------------------------------------------------------------------------------------------- formats
def test_postscript_and_pdf_are_rejected_before_ghostscript_runs(tmp_path, monkeypatch):
    """Pillow renders EPS by running Ghostscript on the bytes: an EPS must never reach that point."""
    calls = []

    def no_program(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a program was started")

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: True)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs", raising=False)
    monkeypatch.setattr(subprocess, "check_call", no_program)
    monkeypatch.setattr(subprocess, "Popen", no_program)
    with Image.open(io.BytesIO(EPS)) as im:  # the fixture really is an EPS that Pillow would open
        assert im.format == "EPS"
    disguised = tmp_path / "photo.jpg"
    disguised.write_bytes(EPS)
    binary_eps = b"\xc5\xd0\xd3\xc6" + struct.pack("<6I", 32, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS
    for src in (EPS, disguised, binary_eps, b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
                b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"):
        err = rejected(src, "not a recognised image file", "accepted formats: JPEG, PNG, WEBP, GIF, BMP, TIFF")
        assert "EPS" not in err.reason
    assert calls == []


def test_only_the_listed_raster_formats_open(tmp_path):
    im = noise(24, 16)
    for fmt in ("PPM", "TGA", "ICO", "PCX", "SGI", "DDS"):  # readable by Pillow, not on the list
        rejected(encoded(im, fmt), "not a recognised image file", "accepted formats")
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert load_image(encoded(im, fmt, **({"lossless": True} if fmt == "WEBP" else {}))).size == (24, 16), fmt
    mpo = io.BytesIO()  # cameras' multi-picture JPEG: Pillow's JPEG opener names it MPO
    im.save(mpo, format="MPO", save_all=True, append_images=[noise(24, 16, 1)])
    with Image.open(io.BytesIO(mpo.getvalue())) as check:
        assert check.format == "MPO"
    assert load_image(mpo.getvalue()).size == (24, 16)
    from e5v.images import IMAGE_FORMATS

    assert IMAGE_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


# ------------------------------------------------------------------------------------------ truncation
@pytest.mark.parametrize("kind", ["baseline", "progressive", "cmyk", "grey"])
def test_jpeg_cut_short_with_a_fake_end_marker_is_rejected(kind, tmp_path):
    """libjpeg mends such a file with grey blocks and only a warning; it must not embed as a picture."""
    im = {"cmyk": noise(96, 64).convert("CMYK"), "grey": noise(96, 64).convert("L")}.get(kind, noise(96, 64))
    data = encoded(im, "JPEG", quality=90, progressive=kind == "progressive")
    assert load_image(data).size == (96, 64)
    for cut in (len(data) // 2, len(data) - 64):
        faked = data[:cut] + b"\xff\xd9"
        with Image.open(io.BytesIO(faked)) as check:  # Pillow alone decodes it without a word
            check.load()
        rejected(faked, "truncated or corrupt image data", "premature end")
        path = tmp_path / f"faked-{cut}.jpg"
        path.write_bytes(faked)
        err = rejected(path, "truncated or corrupt image data")
        assert err.item == str(path)


def test_header_claiming_more_pixels_than_the_data_holds_is_rejected():
    small = encoded(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG")
    sof = small.index(b"\xff\xc0")
    big = bytearray(small)
    big[sof + 5:sof + 9] = struct.pack(">HH", 3000, 4000)  # height, width: 12 M pixels from ~600 bytes
    with Image.open(io.BytesIO(bytes(big))) as check:
        assert check.size == (4000, 3000)
    rejected(bytes(big), "truncated or corrupt image data")
    png = bytearray(encoded(Image.new("1", (8, 8)), "PNG"))  # the same lie in a PNG header (IHDR)
    png[16:24] = struct.pack(">II", 3000, 3000)
    png[29:33] = struct.pack(">I", __import__("zlib").crc32(bytes(png[12:29])))
    rejected(bytes(png), "truncated or corrupt image data")


def test_complete_jpegs_with_harmless_extras_still_load():
    data = encoded(noise(40, 30), "JPEG", quality=90)
    assert load_image(data + b"trailing bytes after the end marker").size == (40, 30)
    exif = Image.Exif()
    exif[0x010F] = "camera"
    assert load_image(encoded(noise(40, 30), "JPEG", exif=exif, icc_profile=b"\0" * 16)).size == (40, 30)


# ---------------------------------------------------------------------------------------- orientation
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    """Stored pixels turned as the tag says: what a photo viewer (and the official `datasets` loading) shows."""
    stored = noise(6, 4, orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(stored, "PNG", exif=exif)
    with Image.open(io.BytesIO(data)) as check:
        check.load()
        assert check.getexif()[0x0112] == orientation
        upright = ImageOps.exif_transpose(check).convert("RGB")
    out = load_image(data)
    assert out.size == upright.size == ((4, 6) if orientation >= 5 else (6, 4))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(upright))
    if orientation != 1:
        assert not np.array_equal(np.asarray(out), np.asarray(stored)) or out.size != stored.size


def test_exif_orientation_of_a_camera_jpeg(tmp_path):
    stored = smooth(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", the usual portrait photo
    path = tmp_path / "portrait.jpg"
    stored.save(path, quality=95, exif=exif)
    out = load_image(path)
    assert out.size == (40, 80)
    want = np.asarray(stored.transpose(Image.Transpose.ROTATE_270), dtype=int)
    assert np.abs(np.asarray(out, dtype=int) - want).mean() < 3
    pil = Image.open(path)  # a file that the caller opened gets the same treatment ...
    assert load_image(pil).size == (40, 80)
    assert load_image(pil.convert("RGB")).size == (80, 40)  # ... pixels the caller made are taken as they are


# -------------------------------------------------------------------------------------------- alpha
def test_alpha_white_by_default_and_official_on_request():
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., :3] = (200, 10, 20)  # the colour stored under fully transparent pixels
    arr[0, 1] = (0, 0, 255, 255)
    rgba = encoded(Image.fromarray(arr, "RGBA"), "PNG")
    white, official = load_image(rgba), load_image(rgba, alpha="official")
    assert white.getpixel((0, 0)) == (255, 255, 255) and official.getpixel((0, 0)) == (200, 10, 20)
    assert white.getpixel((1, 0)) == official.getpixel((1, 0)) == (0, 0, 255)
    with Image.open(io.BytesIO(rgba)) as plain:  # "official" is exactly the official pipeline's conversion
        np.testing.assert_array_equal(np.asarray(official), np.asarray(plain.convert("RGB")))

    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([90, 80, 70, 255, 0, 0] + [0] * 762)
    pal.putpixel((3, 1), 1)
    data = encoded(pal, "PNG", transparency=0)
    assert load_image(data).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(data, alpha="official").getpixel((0, 0)) == (90, 80, 70)
    la = Image.new("LA", (3, 2), (60, 0))
    assert load_image(la, alpha="official").getpixel((0, 0)) == (60, 60, 60)
    assert load_image(la).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ConfigError, match="alpha must be one of white, official"):
        load_image(rgba, alpha="black")


# ------------------------------------------------------------------------------------------- reduction
def test_reduce_to_leaves_normal_images_untouched(tmp_path):
    for data in (encoded(smooth(640, 480), "JPEG", quality=92), encoded(noise(300, 200), "PNG")):
        full = load_image(data)
        np.testing.assert_array_equal(np.asarray(load_image(data, reduce_to=336)), np.asarray(full))
    with pytest.raises(ConfigError, match="reduce_to"):
        load_image(encoded(noise(8, 8), "PNG"), reduce_to=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "1-bit PNG", "palette PNG", "rotated JPEG"])
def test_reduce_to_decodes_big_images_smaller(fmt):
    big = smooth(2400, 1600)
    exif = Image.Exif()
    exif[0x0112] = 8
    data = {"JPEG": lambda: encoded(big, "JPEG", quality=92),
            "rotated JPEG": lambda: encoded(big, "JPEG", quality=92, exif=exif),
            "PNG": lambda: encoded(big, "PNG"),
            "1-bit PNG": lambda: encoded(big.convert("L").point(lambda v: 255 * (v > 100)).convert("1"), "PNG"),
            "palette PNG": lambda: encoded(big.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")}[fmt]()
    full = load_image(data)
    out = load_image(data, reduce_to=500)
    assert 500 <= max(out.size) < 1000 and out.mode == "RGB"
    assert abs(out.size[0] / out.size[1] - full.size[0] / full.size[1]) < 0.01  # shape kept, upright too
    want = np.asarray(full.resize(out.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(out, dtype=float) - want).mean() < (12 if "1-bit" in fmt else 3)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resettable peak RSS")
def test_reduce_to_bounds_decoding_memory(tmp_path):
    """A hostile case: a 16 kB 1-bit PNG of 6000x6000 takes ~150 MB as RGB; reduced at decode it does not.
    Peak resident memory of the decode alone (VmHWM, reset after the imports), in a fresh process."""
    path = tmp_path / "sheet.png"
    Image.new("1", (6000, 6000), 1).save(path)
    assert path.stat().st_size < 20_000
    probe = textwrap.dedent(f"""
        import json, sys
        from e5v.images import load_image

        def kib(key):
            return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key))

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        before = kib("VmRSS:")
        im = load_image({str(path)!r}, reduce_to=int(sys.argv[1]) or None)
        print(json.dumps([im.size, (kib("VmHWM:") - before) / 1024]))
    """)

    def peak(reduce_to):
        out = subprocess.run([sys.executable, "-c", probe, str(reduce_to)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        size, mb = json.loads(out.stdout)
        return tuple(size), mb

    (full_size, full_mb), (small_size, small_mb) = peak(0), peak(1008)
    assert full_size == (6000, 6000) and small_size == (1200, 1200)
    assert full_mb > 130, full_mb  # unreduced: the 36 MB 1-bit plane plus a 144 MB RGB copy
    assert small_mb < 90, small_mb  # reduced: the 1-bit plane and one 8-bit copy (36 MB each), then small ones


# ---------------------------------------------------------------------------------------------- texts
def test_texts_utf8_cannot_encode_are_rejected_with_an_encodable_reason():
    for bad in ("\ud800", "fine words \udcff here", "x" * 10 + "\udfff"):
        with pytest.raises(InputError) as ei:
            clean_text(bad, item="line 3")
        err = ei.value
        assert err.item == "line 3" and "cannot be encoded as UTF-8" in err.reason
        str(err).encode("utf-8")  # the message itself can be logged, printed and sent as JSON
    err = InputError("photo-\udcff.jpg", "reason \ud800")
    assert err.item == "photo-\\udcff.jpg" and err.reason == "reason \\ud800"
    again = pickle.loads(pickle.dumps(err))  # as it travels from a worker process
    assert (type(again), again.item, again.reason, str(again)) == (InputError, err.item, err.reason, str(err))
    from e5v.errors import safe_text

    assert safe_text("plain é") == "plain é"


def test_paths_no_file_can_have_are_rejected(tmp_path):
    rejected(str(tmp_path / "a\x00b.png"), "not a valid file name")
    err = rejected(str(tmp_path / "\ud800.png"), "not a valid file name")
    str(err).encode("utf-8")


def test_a_truncation_warning_is_not_lost_to_a_capture_in_another_thread(monkeypatch):
    """``warnings.catch_warnings`` is process-wide: when another thread's capture ends while this thread decodes,
    the decoder's truncation warning must still reach this thread's check. The interleaving is forced: the decode
    lets the other thread end its capture, waits for it, then warns."""
    import threading
    import warnings

    from PIL import ImageFile

    from e5v.images import pillow_warnings

    entered, release = threading.Event(), threading.Event()

    def other():  # e.g. the server's header peek on another request
        with pillow_warnings():
            entered.set()
            release.wait(30)

    a = threading.Thread(target=other)
    a.start()
    entered.wait(30)
    real_load = ImageFile.ImageFile.load

    def load_that_warns(self):
        release.set()
        a.join(30)  # the other capture has ended by now
        warnings.warn("image file is truncated (simulated: the decoder mended missing data)", stacklevel=1)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_that_warns)
    outcome = {}

    def decode():
        try:
            load_image(encoded(noise(32, 32), "PNG"), item="img")
            outcome["accepted"] = True
        except InputError as e:
            outcome["error"] = e

    b = threading.Thread(target=decode)
    b.start()
    b.join(0.5)
    release.set()  # with the lock, the decode waits for the other capture: let that one end
    b.join(30)
    a.join(30)
    assert "error" in outcome and "truncated" in outcome["error"].reason, outcome
