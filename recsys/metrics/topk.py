"""Full-ranking metrics of next-item prediction: HR@K and NDCG@K from the target's rank (torch only).

One relevant item per user, so ``HR@K = 1[rank < K]`` and ``NDCG@K = 1[rank < K] / log2(rank + 2)``
(0-based rank), averaged over all users; the official MQSA-TED evaluate.py computes the same from its
top-K lists. Ties count in the target's favour (only strictly higher scores rank above it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

DEFAULT_KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """0-based rank of each target among its row: ``scores [B, I]`` (column ``j - 1`` = item ``j``),
    ``targets [B]`` ids 1..I. A target scored ``-inf`` (removed from the ranking) gets rank ``inf``.

    ``overwrite=True`` reuses ``scores`` as scratch (no ``[B, I]`` temporaries; its content is lost).
    """
    target_score = scores.gather(1, (targets - 1).unsqueeze(1))
    above = scores if overwrite else scores.clone()
    ranks = above.sub_(target_score).gt_(0).sum(1).to(torch.float64)  # counts < 2^24: exact in float32
    return ranks.masked_fill(torch.isneginf(target_score.squeeze(1)), float("inf"))


def rank_metrics(ranks: torch.Tensor, ks: Iterable[int] = DEFAULT_KS, prefix: str = "") -> dict[str, float]:
    """``{prefix}hr@K`` and ``{prefix}ndcg@K`` for each K, averaged over ``ranks [U]``."""
    ranks = ranks.to(torch.float64)
    gain = 1.0 / torch.log2(ranks + 2.0)
    metrics = {}
    for k in ks:
        hit = ranks < k
        metrics[f"{prefix}hr@{k}"] = float(hit.double().mean())
        metrics[f"{prefix}ndcg@{k}"] = float(torch.where(hit, gain, torch.zeros_like(gain)).mean())
    return metrics
