import itertools

import numpy as np
import pytest

from recsys.metrics.ranking import auc, gauc, logloss


def brute_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def test_auc_hand_example():
    # positives 0.9, 0.4; negatives 0.5, 0.1 -> pairs: (0.9>0.5),(0.9>0.1),(0.4<0.5),(0.4>0.1) = 3/4
    assert auc(np.array([0.9, 0.5, 0.4, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    assert auc(scores, labels) == pytest.approx(brute_auc(scores, labels))


def test_gauc_weights_groups_and_skips_single_class():
    scores = np.array([0.9, 0.1, 0.2, 0.8, 0.5, 0.6])
    labels = np.array([1, 0, 1, 0, 1, 1])
    groups = np.array([1, 1, 2, 2, 3, 3])  # group 3 has one class only
    # group 1: auc 1 (size 2), group 2: auc 0 (size 2) -> 0.5
    assert gauc(scores, labels, groups) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    s, y, g = rng.random(60), rng.integers(0, 2, 60), rng.integers(0, 4, 60)
    expected = []
    for k in np.unique(g):
        m = g == k
        if 0 < y[m].sum() < m.sum():
            expected.append((brute_auc(s[m], y[m]), m.sum()))
    want = sum(a * n for a, n in expected) / sum(n for _, n in expected)
    assert gauc(s, y, g) == pytest.approx(want)


def test_logloss():
    assert logloss(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(np.log(2))
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))
