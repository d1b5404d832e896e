"""PCA: fitted on a sample, saved and loaded, and applied to queries exactly as to the stored vectors."""
import numpy as np
import pytest

from e5v.errors import ConfigError
from e5v.vectors import PCA, make_codec, search, unit_rows


def low_rank(n=400, width=40, rank=6, seed=0):
    """Unit rows near a rank-``rank`` subspace in a random orientation (not the first coordinates), with a shared
    mean direction, as embeddings have."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((width, width)))[0]
    coords = rng.standard_normal((n, width)) * np.r_[np.linspace(3, 1, rank), np.full(width - rank, 0.05)]
    return unit_rows(coords @ basis.T + 2 * basis[:, -1])


def test_fit_gives_orthonormal_leading_axes_and_the_kept_variance():
    x = low_rank()
    pca = PCA.fit(x, 6)
    assert pca.components.shape == (6, 40) and pca.components.dtype == np.float32
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(6), atol=1e-5)
    centred = x - x.mean(0)
    eig = np.linalg.eigvalsh(np.cov(centred, rowvar=False))[::-1]
    assert pca.kept == pytest.approx(eig[:6].sum() / eig.sum(), rel=1e-4)
    assert pca.kept > 0.95
    # the variance along each axis is the matching eigenvalue, leading first
    np.testing.assert_allclose(np.var(centred @ pca.components.T, axis=0, ddof=1), eig[:6], rtol=1e-3)


def test_chunked_fit_equals_one_step(monkeypatch):
    import e5v.vectors.pca as pca_module

    x = low_rank(500)
    whole = PCA.fit(x, 5)
    monkeypatch.setattr(pca_module, "CHUNK", 64)
    chunked = PCA.fit(x, 5)
    np.testing.assert_allclose(chunked.components, whole.components, atol=1e-5)


def test_applied_rows_are_unit_and_full_width_changes_no_score():
    x = low_rank(100)
    full = PCA.fit(x, 40)
    y = full.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(y @ y.T, x @ x.T, atol=1e-5)  # a rotation
    reduced = PCA.fit(x, 6).apply(x)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1, rtol=1e-5)
    assert PCA.fit(x, 6).apply(x[0]).shape == (6,)


def test_saved_pca_applies_the_same_transform(tmp_path):
    x = low_rank()
    pca = PCA.fit(x, 6)
    pca.save(tmp_path / "pca.json")
    loaded = PCA.load(tmp_path / "pca.json")
    assert np.array_equal(loaded.apply(x), pca.apply(x)) and loaded.kept == pytest.approx(pca.kept, abs=1e-6)
    np.save(tmp_path / "pca.npy", pca.components[:5])
    with pytest.raises(ConfigError, match="do not match"):
        PCA.load(tmp_path / "pca.json")


def test_bad_fits_are_refused():
    x = low_rank(10)
    with pytest.raises(ConfigError, match="between 1 and the vectors' width 40"):
        PCA.fit(x, 41)
    with pytest.raises(ConfigError, match="at least 2"):
        PCA.fit(x[:1], 3)
    with pytest.raises(ConfigError, match="width 39"):
        PCA.fit(x, 3).apply(x[:, :39])


def reduced_collection():
    x = low_rank(400)
    pca = PCA.fit(x[::4], 6)  # fitted on a sample
    stored = pca.apply(x)
    return x, pca, stored


def test_search_puts_queries_through_the_collections_pca():
    x, pca, stored = reduced_collection()
    codec = make_codec("float32", 6)
    queries = low_rank(30, seed=1)
    scores, pos = search(queries, [stored], codec, 5, pca=pca)
    want = pca.apply(queries) @ stored.T
    assert np.array_equal(pos, np.argsort(-want, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(want, pos, 1), rtol=1e-5)
    # a stored item's own full-width vector finds that item
    _, own = search(x[:50], [stored], codec, 1, pca=pca)
    assert np.array_equal(own[:, 0], np.arange(50))


def test_a_query_side_that_skips_the_pca_finds_other_items_negative_control():
    """What the test above guards against: the reduced width taken from the query's first coordinates (the PCA
    skipped) puts the query in another space, and the items no longer find themselves."""
    x, pca, stored = reduced_collection()
    truncated = unit_rows(x[:50, :6])
    _, own = search(truncated, [stored], make_codec("float32", 6), 1)
    assert (own[:, 0] == np.arange(50)).mean() < 0.5
