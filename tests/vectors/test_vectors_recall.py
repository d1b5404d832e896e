"""The recall of every storage setting against exact float32 search, and its markdown table."""
import numpy as np
import pytest

from e5v.errors import ConfigError
from e5v.vectors import Setting, recall_rows, render_markdown, settings, unit_rows


def collection(n=800, width=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, width))
    mean = 1.5 * rng.standard_normal(width)  # a shared offset: signs alone say little, as in real embeddings
    x = unit_rows(mean + centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, width)))
    q = unit_rows(mean + centres[rng.integers(0, 20, 40)] + 0.5 * rng.standard_normal((40, width)))
    return x, q


def by_setting(rows, name):
    return {(r["precision"], r["dims"], r["rescore"]): r for r in rows if r["queries"] == name}


def test_settings_rescore_only_the_lossy_precisions():
    assert settings(dims=[None, 16]) == [
        Setting("float32"), Setting("float16"), Setting("int8"), Setting("int8", rescore=True), Setting("binary"),
        Setting("binary", rescore=True), Setting("float32", 16), Setting("float16", 16), Setting("int8", 16),
        Setting("int8", 16, True), Setting("binary", 16), Setting("binary", 16, True)]
    with pytest.raises(ConfigError, match="int4"):
        settings(["int4"])


def test_recall_of_every_setting():
    x, q = collection()
    rows = recall_rows(x, {"near": q, "self": x[:40]}, dims=[None, 16], sample=400)
    assert len(rows) == 2 * 12
    near = by_setting(rows, "near")
    assert near[("float32", 64, False)]["recall@1"] == 1 and near[("float32", 64, False)]["recall@10"] == 1
    assert near[("float16", 64, False)]["recall@10"] >= 0.99
    assert near[("binary", 64, False)]["recall@10"] < 0.8  # signs of offset vectors lose much
    assert near[("binary", 64, True)]["recall@10"] > near[("binary", 64, False)]["recall@10"] + 0.15
    assert near[("int8", 64, True)]["recall@10"] >= near[("int8", 64, False)]["recall@10"]
    assert near[("float32", 16, False)]["recall@10"] < 1  # 16 of 64 dimensions cost something here
    assert {r["bytes_per_vector"] for r in rows if r["dims"] == 64} == {256, 128, 64, 8}
    assert near[("binary", 16, True)]["rescore_bytes"] == 128 and near[("binary", 16, False)]["rescore_bytes"] == 0
    # re-scored from the full-width copy, the reduced settings win back what the PCA dropped
    assert near[("binary", 16, True)]["recall@10"] > near[("float32", 16, False)]["recall@10"] + 0.2
    assert near[("int8", 16, False)]["full_width"] is False and near[("int8", 64, False)]["full_width"] is True
    assert by_setting(rows, "self")[("int8", 64, True)]["recall@1"] == 1  # every stored vector finds itself


def test_exact_ties_count_as_hits():
    """A gallery that holds each vector twice: the exact top 10 is five pairs of tied copies, and a setting that
    returns the other copy of a pair is right."""
    x, q = collection(200)
    doubled = np.concatenate([x, x])[np.random.default_rng(1).permutation(400)]
    rows = recall_rows(doubled, {"q": q}, precisions=["float32", "float16"])
    assert all(r["recall@1"] == 1 and r["recall@10"] == 1 for r in rows)


def test_markdown_table_has_a_line_per_setting_and_columns_per_query_set():
    x, q = collection(300)
    rows = recall_rows(x, {"text->image": q, "image->text": x[:10]}, precisions=["float32", "binary"], dims=[None, 8])
    table = render_markdown(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 6
    assert "text->image R@1 (n=40)" in lines[0] and "image->text R@10" in lines[0]
    assert lines[2].startswith("| float32 | 64 | no | 256 | - | 1.000 | 1.000 | 1.000 | 1.000 |")
    assert "| binary | 8 (PCA) | yes | 1 | 128 |" in table


def test_bad_query_sets_are_refused():
    x, q = collection(50)
    with pytest.raises(ConfigError, match="query set 'q'"):
        recall_rows(x, {"q": q[:, :10]})
    with pytest.raises(ConfigError, match="between 1 and 64"):
        recall_rows(x, {"q": q}, dims=[65])


def test_an_index_s_own_float16_partitions_re_score_the_candidates():
    """Rows over float16 partitions (as ``index evaluate`` passes them) give what a float16 array gives, and
    re-score the candidates themselves (no float16 copy is made)."""
    from e5v.vectors.retrieval import Parts, Rows

    x, q = collection(300)
    half = x.astype(np.float16)
    want = recall_rows(half, {"q": q}, dims=[None, 16], sample=200)
    opened = []

    def partition(i):
        opened.append(i)
        return (half[:100], half[100:])[i]

    stored = Rows(Parts([100, 200], partition))
    got = recall_rows(half, {"q": q}, dims=[None, 16], sample=200, full=stored)
    assert got == want and set(opened) == {0, 1}
    with pytest.raises(ConfigError, match="re-scoring rows have shape"):
        recall_rows(x, {"q": q}, full=half[:10])
