"""Metrics of e5v.eval on hand-computed cases: ties, several positives, excluded reference, subset recall."""
import numpy as np
import pytest

from e5v.eval import metrics


def test_recall_single_positive():
    s = np.array([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3]])
    assert metrics.best_rank(s, [0, 2]).tolist() == [0, 1]
    assert metrics.recall_at_k(s, [0, 2], (1, 2)) == {1: 50.0, 2: 100.0}


def test_ties_break_by_candidate_index():
    s = np.array([[0.5, 0.5, 0.5]])
    assert metrics.best_rank(s, [[1]]).tolist() == [1]  # index 0 ties and comes first
    assert metrics.best_rank(s, [[0]]).tolist() == [0]
    assert metrics.best_rank(s, [[2]]).tolist() == [2]
    assert metrics.recall_at_k(s, [[1]], (1, 2)) == {1: 0.0, 2: 100.0}


def test_several_positives_hit_on_the_best_one():
    s = np.array([[0.1, 0.9, 0.8, 0.7]])
    assert metrics.best_rank(s, [[0, 3]]).tolist() == [2]
    assert metrics.recall_at_k(s, [[0, 3]], (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 100.0}


def test_excluded_reference_takes_no_place():
    s = np.array([[0.9, 0.5, 0.4]])
    assert metrics.recall_at_k(s, [1], (1,)) == {1: 0.0}
    assert metrics.recall_at_k(s, [1], (1,), exclude=[[0]]) == {1: 100.0}
    # an excluded positive cannot be hit
    assert metrics.best_rank(s, [0], exclude=[[0]]).tolist() == [np.inf]


def test_invalid_candidates_are_dropped_for_every_query():
    s = np.array([[0.9, 0.5], [0.9, 0.1]])
    inv = np.array([True, False])
    assert metrics.best_rank(s, [1, 1], invalid=inv).tolist() == [0, 0]
    assert metrics.best_rank(s, [0, 0], invalid=inv).tolist() == [np.inf, np.inf]


def test_recall_matches_clip_style_topk_without_ties():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(40, 30))
    pos = [rng.choice(30, size=rng.integers(1, 4), replace=False) for _ in range(40)]
    for k in (1, 5, 10):
        top = np.argsort(-s, axis=1)[:, :k]
        expected = np.mean([len(set(t) & set(p)) > 0 for t, p in zip(top, pos)]) * 100
        assert metrics.recall_at_k(s, pos, (k,))[k] == pytest.approx(expected)


def test_subset_recall_ranks_within_the_image_set():
    # gallery: 0 = reference (excluded), 1..4 members, 5 not a member but the best score
    s = np.array([[0.9, 0.1, 0.8, 0.7, 0.6, 0.95]])
    members = [[0, 1, 2, 3]]
    assert metrics.subset_recall(s, [3], members, (1, 2, 3), exclude=[[0]]) == {1: 0.0, 2: 100.0, 3: 100.0}
    assert metrics.best_rank(s, [3], exclude=[[0]]).tolist() == [2]  # global rank: 5 and 2 above it
    # the target outside its set is a miss
    assert metrics.subset_recall(s, [5], members, (1, 2, 3), exclude=[[0]]) == {1: 0.0, 2: 0.0, 3: 0.0}


def test_subset_recall_ties_and_invalid_members():
    # 0 = reference (excluded); 1, 2, 3 tie; 4 is not a member
    s = np.array([[0.9, 0.5, 0.5, 0.5, 0.7], [0.9, 0.5, 0.5, 0.5, 0.7]])
    members = [[0, 1, 2, 3], [0, 1, 2, 3]]
    # query 0: target 2 after 1 (lower index wins the tie); query 1: target 1 first
    assert metrics.subset_recall(s, [2, 1], members, (1, 2, 3), exclude=[[0], [0]]) == {1: 50.0, 2: 100.0, 3: 100.0}
    # candidate 1 failed to embed: the target 2 is now first in query 0's set
    inv = np.array([False, True, False, False, False])
    assert metrics.subset_recall(s, [2, 3], members, (1, 2), exclude=[[0], [0]], invalid=inv) == {1: 50.0, 2: 100.0}
    # a reference that is also the target can never be hit
    assert metrics.subset_recall(s[:1], [0], members[:1], (3,), exclude=[[0]]) == {3: 0.0}


def test_top_k_excludes_reference_and_keeps_tie_order():
    s = np.array([[0.5, 0.9, 0.5, 0.1]])
    assert metrics.top_k(s, 3, exclude=[[1]])[0].tolist() == [0, 2, 3]
    assert metrics.top_k(s, 2, within=[[2, 3, 1]], exclude=[[1]])[0].tolist() == [2, 3]
    assert metrics.top_k(s, 10, invalid=np.array([False, False, True, False]))[0].tolist() == [1, 0, 3]


def test_spearman_with_ties():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    with pytest.raises(ValueError):
        metrics.spearman([1, 2], [1, 2, 3])
