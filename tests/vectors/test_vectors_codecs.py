"""Storage precisions: each codec's encoding, its scores, its error bound, and its round trip through JSON + npy."""
import json

import numpy as np
import pytest

from e5v.errors import ConfigError
from e5v.vectors import PRECISIONS, load_codec, make_codec, save_codec, unit_rows
from e5v.vectors.codecs import Int8Codec


def vectors(n=300, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.linspace(0.2, 3.0, dim)  # dimensions of very different spread: per-dimension ranges matter
    return unit_rows(rng.standard_normal((n, dim)) * scale + 0.3)


@pytest.mark.parametrize("precision, width, dtype", [("float32", 48, "float32"), ("float16", 48, "float16"),
                                                     ("int8", 48, "int8"), ("binary", 6, "uint8")])
def test_codes_have_the_stated_size(precision, width, dtype):
    x = vectors()
    codec = make_codec(precision, 48).fit(x)
    codes = codec.encode(x)
    assert codes.shape == (300, width) and codes.dtype == dtype
    assert codec.bytes_per_vector == codes.nbytes // 300


def test_float_codecs_round_trip():
    x = vectors()
    assert np.array_equal(make_codec("float32", 48).encode(x), x)
    f16 = make_codec("float16", 48)
    assert np.array_equal(f16.decode(f16.encode(x)), x.astype(np.float16).astype(np.float32))
    q = vectors(5, seed=1)
    np.testing.assert_allclose(f16.score(q, f16.encode(x)), q @ x.astype(np.float16).astype(np.float32).T, rtol=1e-6,
                               atol=1e-7)  # scores near 0: the product's summation order shows


@pytest.mark.parametrize("ranges", ["per-dimension", "global"])
def test_int8_error_is_at_most_half_a_level_inside_the_calibrated_range(ranges):
    x = vectors(2000)
    codec = Int8Codec(48, ranges).fit(x[:500])
    inside = x[500:][((x[500:] >= codec.lo) & (x[500:] <= codec.hi)).all(axis=1)]
    assert len(inside) > 100
    err = np.abs(codec.decode(codec.encode(inside)) - inside)
    step = (codec.hi - codec.lo) / 255
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all()
    assert err.max() > step.min() / 4  # the bound is tight, not vacuous
    # the calibration rows' extremes are levels -128 and 127 exactly
    codes = codec.encode(x[:500])
    assert codes.min() == -128 and codes.max() == 127


def test_int8_per_dimension_ranges_beat_one_global_range_on_uneven_dimensions():
    x = vectors(2000)
    errors = {}
    for ranges in ("per-dimension", "global"):
        codec = Int8Codec(48, ranges).fit(x)
        errors[ranges] = np.abs(codec.decode(codec.encode(x)) - x).mean()
    assert errors["per-dimension"] < 0.7 * errors["global"]


def test_int8_clips_values_outside_the_calibrated_range():
    codec = Int8Codec(2).fit(np.array([[0.0, -1.0], [1.0, 1.0]], np.float32))
    codes = codec.encode(np.array([[5.0, -7.0], [0.5, 0.0]], np.float32))
    assert codes[0].tolist() == [127, -128]
    np.testing.assert_allclose(codec.decode(codes[:1]), [[1.0, -1.0]])


def test_int8_constant_dimension_decodes_to_its_value():
    x = np.array([[0.5, 0.1], [0.5, 0.3], [0.5, 0.2]], np.float32)
    codec = Int8Codec(2).fit(x)
    np.testing.assert_allclose(codec.decode(codec.encode(x))[:, 0], 0.5)


def test_int8_score_is_the_query_against_the_dequantised_rows(monkeypatch):
    import e5v.vectors.codecs as codecs

    monkeypatch.setattr(codecs, "CONVERT_BYTES", 7 * 48 * 4)  # several conversion chunks, one shorter at the end
    x, q = vectors(100), vectors(4, seed=2)
    codec = Int8Codec(48).fit(x)
    codes = codec.encode(x)
    np.testing.assert_allclose(codec.score(q, codes), q @ codec.decode(codes).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_scores_do_not_depend_on_the_conversion_block(monkeypatch, precision):
    """float16 and int8 codes are converted to float32 a few rows at a time: any block size gives the product with
    the decoded rows, for a single query and for a batch."""
    import e5v.vectors.codecs as codecs

    x = vectors(100)
    codec = make_codec(precision, 48).fit(x)
    codes = codec.encode(x)
    for q in (vectors(1, seed=7), vectors(9, seed=8)):
        want = q @ codec.decode(codes).T
        for rows in (1, 7, 100, 1000):
            monkeypatch.setattr(codecs, "CONVERT_BYTES", rows * 48 * 4)
            got = codec.score(q, codes)
            assert got.shape == want.shape and got.dtype == np.float32 and got.flags.c_contiguous
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_int8_needs_calibration():
    with pytest.raises(ConfigError, match="fit it on a sample"):
        Int8Codec(4).encode(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("dim", [16, 13])  # a width that is not a multiple of 8: the padding bits never count
def test_binary_score_is_the_cosine_of_the_sign_vectors(dim):
    x, q = vectors(50, dim), vectors(3, dim, seed=3)
    codec = make_codec("binary", dim)
    codes = codec.encode(x)
    assert np.array_equal(np.unpackbits(codes, axis=1)[:, :dim], (x > 0).astype(np.uint8))
    sx, sq = np.where(x > 0, 1.0, -1.0), np.where(q > 0, 1.0, -1.0)
    np.testing.assert_allclose(codec.score(q, codes), sq @ sx.T / dim, atol=1e-6)
    hamming = codec.hamming(codec.encode(q), codes)
    assert np.array_equal(hamming, (np.not_equal(sq[:, None], sx[None]).sum(-1)))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_saved_codec_encodes_and_scores_the_same(tmp_path, precision):
    x, q = vectors(), vectors(4, seed=5)
    codec = make_codec(precision, 48).fit(x)
    save_codec(codec, tmp_path / "codec.json")
    loaded = load_codec(tmp_path / "codec.json")
    assert type(loaded) is type(codec) and loaded.precision == precision and loaded.dim == 48
    assert np.array_equal(loaded.encode(x), codec.encode(x))
    assert np.array_equal(loaded.score(q, codec.encode(x)), codec.score(q, codec.encode(x)))
    assert (tmp_path / "codec.npy").exists() == (precision == "int8")
    assert json.loads((tmp_path / "codec.json").read_text())["precision"] == precision


def test_global_int8_ranges_survive_saving(tmp_path):
    codec = Int8Codec(48, "global").fit(vectors())
    save_codec(codec, tmp_path / "c.json")
    loaded = load_codec(tmp_path / "c.json")
    assert loaded.ranges == "global" and np.array_equal(loaded.lo, codec.lo) and np.array_equal(loaded.hi, codec.hi)


def test_damaged_codec_files_are_refused(tmp_path):
    save_codec(Int8Codec(8).fit(vectors(20, 8)), tmp_path / "c.json")
    np.save(tmp_path / "c.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(ConfigError, match="int8 ranges"):
        load_codec(tmp_path / "c.json")
    (tmp_path / "c.json").write_text('{"precision": "int4", "dim": 8}')
    with pytest.raises(ConfigError, match="int4"):
        load_codec(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("{")
    with pytest.raises(ConfigError, match="not a readable codec"):
        load_codec(tmp_path / "c.json")


def test_codes_that_do_not_fit_the_codec_are_named():
    codec = make_codec("binary", 48)
    with pytest.raises(ConfigError, match=r"expected \(n, 6\) uint8"):
        codec.check_codes(np.zeros((3, 48), np.float32))
    codec.check_codes(np.zeros((3, 6), np.uint8))


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_read_only_memory_maps_score_where_dlpack_refuses_them(tmp_path, monkeypatch, precision):
    """numpy before 2.1 cannot export a read-only array through DLPack (BufferError): scoring a read-only memory
    map takes another way into torch, without a warning."""
    import warnings

    import torch

    def numpy_before_2_1(array, *args, **kwargs):
        raise BufferError("Cannot export readonly array since signalling readonly is unsupported by DLPack.")

    monkeypatch.setattr(torch, "from_dlpack", numpy_before_2_1)
    x, q = vectors(), vectors(5, seed=1)
    codec = make_codec(precision, 48).fit(x)
    np.save(tmp_path / "codes.npy", codec.encode(x))
    codes = np.load(tmp_path / "codes.npy", mmap_mode="r")
    assert not codes.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = codec.score(q, codes)
    np.testing.assert_allclose(got, q @ codec.decode(codes).T, rtol=1e-5, atol=1e-5)
