"""Binary ranking metrics over a whole evaluation set: AUC, grouped AUC (GAUC) and logloss.

All vectorised numpy; ties get average ranks (the Mann-Whitney statistic), so
AUC = P(score_pos > score_neg) + 0.5 P(score_pos = score_neg).
"""

from __future__ import annotations

import numpy as np


def _average_ranks(keys: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based ranks of ``scores`` within each group ``keys``, ties averaged; same order as the input."""
    order = np.lexsort((scores, keys))
    k, s = keys[order], scores[order]
    n = len(s)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (k[1:] != k[:-1]) | (s[1:] != s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)  # exclusive
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = k[1:] != k[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    # average of positions [start, end) within the group, 1-based
    avg = (run_start + run_end - 1) / 2.0 + 1.0
    ranks_sorted = avg[run_id] - group_start
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def grouped_auc_parts(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray):
    """Per-group AUC. Returns (group ids, auc per group, size per group) for groups holding both classes."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    ranks = _average_ranks(inverse, scores)
    n_groups = len(uniq)
    pos = np.bincount(inverse, weights=labels, minlength=n_groups)
    size = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    neg = size - pos
    rank_sum = np.bincount(inverse, weights=ranks * labels, minlength=n_groups)
    valid = (pos > 0) & (neg > 0)
    auc = (rank_sum[valid] - pos[valid] * (pos[valid] + 1) / 2.0) / (pos[valid] * neg[valid])
    return uniq[valid], auc, size[valid]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Global ROC-AUC; NaN when only one class is present."""
    _, values, _ = grouped_auc_parts(scores, labels, np.zeros(len(scores), dtype=np.int64))
    return float(values[0]) if len(values) else float("nan")


def gauc(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Size-weighted mean of per-group AUCs, skipping single-class groups (as the DARE code does)."""
    _, values, sizes = grouped_auc_parts(scores, labels, groups)
    return float(np.sum(values * sizes) / np.sum(sizes)) if len(values) else float("nan")


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rmse(preds: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error."""
    d = np.asarray(preds, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return float(np.sqrt(np.mean(d * d)))
