"""Exact search over codes in parts and chunks, and exact re-scoring of the top candidates."""
import numpy as np
import pytest

import e5v.vectors.retrieval as vsearch
from e5v.errors import ConfigError
from e5v.vectors import make_codec, search, unit_rows


def clustered(n=600, dim=32, clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    return unit_rows(centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)))


def brute(q, x, k):
    s = q @ x.T
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


def test_float32_search_over_parts_and_chunks_is_exact(monkeypatch):
    monkeypatch.setattr(vsearch, "SCAN_CHUNK", 37)
    x, q = clustered(), clustered(9, seed=1)
    parts = [x[:100], x[100:101], x[101:350], x[350:]]
    scores, pos = search(q, parts, make_codec("float32", 32), 15)
    want_s, want_p = brute(q, x, 15)
    assert np.array_equal(pos, want_p)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)


def test_ties_go_to_the_lower_position_whatever_the_chunks(monkeypatch):
    x = unit_rows(np.tile(np.eye(4, dtype=np.float32), (5, 1)))  # every row appears five times
    q = np.eye(4, dtype=np.float32)[[2]]
    for chunk in (3, 7, 1000):
        monkeypatch.setattr(vsearch, "SCAN_CHUNK", chunk)
        _, pos = search(q, [x[:9], x[9:]], make_codec("float32", 4), 5)
        assert pos.tolist() == [[2, 6, 10, 14, 18]]
        _, pos = search(q, [x[:9], x[9:]], make_codec("float32", 4), 2)  # fewer places than tied rows
        assert pos.tolist() == [[2, 6]]


def test_order_keys_sort_by_score_then_column():
    rng = np.random.default_rng(0)
    scores = rng.choice(np.array([-2.5, -1, -0.0, 0.0, 1e-30, 0.25, 3], np.float32), (4, 200))
    keys = vsearch.order_keys(scores)
    columns = np.broadcast_to(np.arange(200), scores.shape)
    assert np.array_equal(np.argsort(keys, axis=1), np.lexsort((columns, -(scores + 0)), axis=1))


def test_k_larger_than_the_collection_returns_every_row():
    x = clustered(5)
    scores, pos = search(x[:2], [x], make_codec("float16", 32), 50)
    assert pos.shape == (2, 5) and sorted(pos[0].tolist()) == list(range(5))


def test_bad_queries_and_k_are_refused():
    x = clustered(5)
    codec = make_codec("float32", 32)
    with pytest.raises(ConfigError, match=r"expected \(q, 32\)"):
        search(np.zeros((1, 31)), [x], codec, 1)
    with pytest.raises(ConfigError, match="NaN"):
        search(np.full((1, 32), np.nan), [x], codec, 1)
    with pytest.raises(ConfigError, match="k must be"):
        search(x[:1], [x], codec, 0)
    with pytest.raises(ConfigError, match="part for part"):
        search(x[:1], [x], codec, 1, full=[x[:4]])


def sign_twins(groups=20, twins=6, dim=64, seed=0):
    """Per group: ``twins`` decoys first, then the target, all with one sign pattern; the query is the target
    nudged without changing a sign. Binary codes cannot tell a group's rows apart (Hamming 0 to the query), so
    only the lowest position, a decoy, wins on codes; the target is the exact nearest and is among the
    candidates whenever they cover a group."""
    rng = np.random.default_rng(seed)
    rows, queries, targets = [], [], []
    for _ in range(groups):
        signs = rng.choice([-1.0, 1.0], dim)
        for _ in range(twins):
            rows.append(signs * rng.uniform(0.05, 1, dim))
        target = signs * rng.uniform(0.05, 1, dim)
        targets.append(len(rows))
        rows.append(target)
        queries.append(target * rng.uniform(0.99, 1.01, dim))
    return unit_rows(np.array(rows)), unit_rows(np.array(queries)), np.array(targets)


def test_binary_with_rescoring_recovers_the_exact_top1():
    x, q, targets = sign_twins()
    _, exact = brute(q, x, 1)
    assert np.array_equal(exact[:, 0], targets)
    codec = make_codec("binary", 64)
    codes = codec.encode(x)
    scores, pos = search(q, [codes], codec, 1, full=[x.astype(np.float16)], candidates=7)
    assert np.array_equal(pos[:, 0], targets)
    np.testing.assert_allclose(scores[:, 0], np.einsum("qd,qd->q", q, x[targets].astype(np.float16)), rtol=1e-5)


def test_binary_without_rescoring_misses_it_negative_control():
    x, q, targets = sign_twins()
    codec = make_codec("binary", 64)
    codes = codec.encode(x)
    scores, pos = search(q, [codes], codec, 1)
    assert not np.isin(pos[:, 0], targets).any()
    assert (scores == 1).all()  # Hamming 0: the codes' score cannot see the difference
    # too few candidates to reach past the decoys: re-scoring cannot help either
    _, pos = search(q, [codes], codec, 1, full=[x], candidates=6)
    assert not np.isin(pos[:, 0], targets).any()


def test_int8_with_rescoring_gives_exact_scores_and_the_exact_ranking():
    x, q = clustered(2000, 64), clustered(20, 64, seed=3)
    codec = make_codec("int8", 64).fit(x)
    codes = codec.encode(x)
    want_s, want_p = brute(q, x, 10)
    scores, pos = search(q, [codes[:700], codes[700:]], codec, 10, full=[x[:700], x[700:]], candidates=100)
    assert np.array_equal(pos, want_p)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)
    approx, _ = search(q, [codes], codec, 10)
    assert not np.allclose(approx, want_s, rtol=1e-6)  # the codes' own scores are estimates


def test_default_candidates_grow_with_k():
    assert vsearch.default_candidates(1) == 100 and vsearch.default_candidates(50) == 500


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("precision", ["float16", "int8", "binary"])
def test_read_only_memory_maps_search_like_arrays(tmp_path, precision):
    x, q = clustered(300, 64), clustered(5, 64, seed=4)
    codec = make_codec(precision, 64).fit(x)
    np.save(tmp_path / "codes.npy", codec.encode(x))
    np.save(tmp_path / "full.npy", x.astype(np.float16))
    codes, full = (np.load(tmp_path / f, mmap_mode="r") for f in ("codes.npy", "full.npy"))
    assert not codes.flags.writeable
    for rescore in (None, [x.astype(np.float16)]):
        want = search(q, [codec.encode(x)], codec, 7, full=rescore)
        got = search(q, [codes], codec, 7, full=[full] if rescore else None)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


def test_rescoring_uses_the_full_width_query_and_rows_behind_a_pca():
    from e5v.vectors import PCA

    x, q = clustered(500, 32), clustered(10, 32, seed=6)
    pca = PCA.fit(x, 4)
    codec = make_codec("int8", 4).fit(pca.apply(x))
    codes = codec.encode(pca.apply(x))
    want_s, want_p = brute(q, x, 5)
    reduced_s, reduced_p = search(q, [codes], codec, 5, pca=pca)
    assert not np.array_equal(reduced_p, want_p)  # 4 of 32 dimensions rank differently
    scores, pos = search(q, [codes], codec, 5, pca=pca, full=[x], candidates=500)  # every row a candidate
    assert np.array_equal(pos, want_p)
    np.testing.assert_allclose(scores, want_s, rtol=1e-6)
    with pytest.raises(ConfigError, match="at the queries' width"):
        search(q, [codes], codec, 5, pca=pca, full=[pca.apply(x)])


def test_parts_open_only_what_a_read_needs_and_rows_read_like_one_array():
    from e5v.vectors.retrieval import Parts, Rows

    x = clustered(50, 8)
    arrays, opened = [x[:20], x[20:20], x[20:45], x[45:]], []
    parts = Parts([len(a) for a in arrays], lambda i: opened.append(i) or arrays[i])
    assert len(parts) == 4 and parts.offsets.tolist() == [0, 20, 20, 45, 50]
    assert np.array_equal(vsearch.gather(parts, [[44, 21]]), x[[[44, 21]]]) and opened == [2]
    _, pos = vsearch.scan(x[:2], parts, make_codec("float32", 8), 3, start=46)
    assert opened == [2, 3] and (pos >= 46).all()  # the parts before the start are never opened
    rows = Rows(parts)
    assert rows.shape == (50, 8) and len(rows) == 50 and rows.dtype == np.float32
    assert np.array_equal(rows[18:47], x[18:47]) and np.array_equal(rows[np.array([49, 0, 30])], x[[49, 0, 30]])
    with pytest.raises(IndexError):
        vsearch.gather(parts, [50])


def test_rescoring_puts_missing_candidates_last():
    """A negative position (an approximate index that found fewer candidates) scores -inf and comes last."""
    x = clustered()
    q = x[:2] + 0.01
    cand = np.array([[5, -1, 7, 3], [-1, -1, 9, 2]])
    scores, pos = vsearch.rescore(q, cand, [x[:300], x[300:]], 4)
    for row, c in enumerate(cand):
        real = c[c >= 0]
        want = real[np.argsort(-(x[real] @ q[row]), kind="stable")]
        assert pos[row].tolist() == [*want.tolist(), *[-1] * (4 - len(real))]
        assert np.isneginf(scores[row, len(real):]).all() and np.isfinite(scores[row, :len(real)]).all()
