"""DIN, TWIN, TWIN-4E, TWIN w/ proj. and DARE against a numeric reference on a hand example.

The reference below is written from the model description alone (recsys/models/target_attention.py's module
docstring), one row and one slot at a time in float64, reading only the backbone's parameters (all set to
explicit small values). A broken score, mask, position id, top-K, re-softmax, projection or table routing
changes the features, so these tests fail; a head that overfits one batch cannot hide it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys.data.batch import CTRBatch, make_ctr_kjt
from recsys.data.vocab import Vocab
from recsys.models.target_attention import TargetAttentionBackbone

VOCAB = Vocab(num_users=2, num_items=4, num_categories=2)
DIM = 2
# two rows: row 0 has 3 behaviours (oldest first) and top_k=2 drops one; row 1 has a single behaviour
ROWS = [
    {"hist_item": [1, 2, 3], "hist_cat": [1, 1, 2], "item": 4, "cat": 2},
    {"hist_item": [2], "hist_cat": [1], "item": 1, "cat": 1},
]
VARIANTS = {
    "din": dict(use_position=False, scorer="din", din_hidden=3),
    "twin": dict(),
    "twin_4e": dict(decoupled=True, split_target=True),
    "twin_proj": dict(projection=True),
    "dare": dict(decoupled=True),
}


def hand_batch() -> CTRBatch:
    cat = lambda key: torch.tensor([v for r in ROWS for v in r[key]])  # noqa: E731
    sparse = make_ctr_kjt(
        cat("hist_item"),
        cat("hist_cat"),
        torch.tensor([len(r["hist_item"]) for r in ROWS]),
        torch.tensor([r["item"] for r in ROWS]),
        torch.tensor([r["cat"] for r in ROWS]),
    )
    return CTRBatch(sparse=sparse)


def hand_backbone(variant: str) -> TargetAttentionBackbone:
    """The backbone with every parameter set to explicit values: entry i of a tensor is ((7 i + 3 k) mod 11 - 5)/10
    for the k-th parameter, so no two tables (or rows) are alike and scores have no ties."""
    backbone = TargetAttentionBackbone(VOCAB, max_len=3, embedding_dim=DIM, top_k=2, **VARIANTS[variant])
    with torch.no_grad():
        for k, (_, param) in enumerate(sorted(backbone.named_parameters())):
            i = torch.arange(param.numel(), dtype=torch.float64)
            param.copy_((((7 * i + 3 * k) % 11 - 5) / 10).view(param.shape))
    return backbone


def reference_features(backbone: TargetAttentionBackbone, variant: str) -> np.ndarray:
    """``[B, 3 D_token]`` features ``[v_t, h, v_t ⊙ h]`` computed slot by slot."""
    cfg = VARIANTS[variant]
    decoupled, split = cfg.get("decoupled", False), cfg.get("split_target", False)
    use_pos, din = cfg.get("use_position", True), cfg.get("scorer") == "din"
    params = {n: p.detach().double().numpy() for n, p in backbone.named_parameters()}

    def token(role: str, kind: str, side: str, item: int, cat: int, position: int) -> list[np.ndarray]:
        """[item, category(, position)] parts of one token from the ``role`` tables ("shared", "att" or "repr"),
        each mapped by the ``<kind>_<side>`` projection for TWIN w/ proj. (kind: "att" = scores, "repr" = pooling)."""
        tokens = "att_tokens" if role == "att" else "repr_tokens"
        suffix = f"_{side}" if split else ""
        parts = [
            params[f"{tokens}.tables.embeddings.{role}_item{suffix}.weight"][item],
            params[f"{tokens}.tables.embeddings.{role}_category{suffix}.weight"][cat],
        ]
        if use_pos:
            parts.append(params[f"{tokens}.positions.{1 if split and side == 'target' else 0}.weight"][position])
        if cfg.get("projection"):
            names = ["item", "category", "position"][: len(parts)]
            parts = [params[f"projections.{kind}_{side}.{name}.weight"] @ v for name, v in zip(names, parts)]
        return parts

    att_role = "att" if decoupled else "shared"
    repr_role = "repr" if decoupled else "shared"
    att_token = lambda *a: token(att_role, "att", *a)  # noqa: E731
    repr_token = lambda *a: np.concatenate(token(repr_role, "repr", *a))  # noqa: E731

    def score(q: list[np.ndarray], k: list[np.ndarray]) -> float:
        q_sem, k_sem = np.concatenate(q[:2]), np.concatenate(k[:2])
        if din:
            x = np.concatenate([q_sem, k_sem, q_sem - k_sem, q_sem * k_sem])
            h = params["scorer.mlp.0.weight"] @ x + params["scorer.mlp.0.bias"]
            h = np.where(h > 0, h, params["scorer.mlp.1.weight"] * h)
            return float((params["scorer.mlp.2.weight"] @ h + params["scorer.mlp.2.bias"])[0]) / len(q_sem)
        s = float(q_sem @ k_sem) / math.sqrt(len(q_sem))
        if use_pos:
            s += float(q[2] @ k[2]) / math.sqrt(len(q[2]))
        return s

    out = []
    for row in ROWS:
        n = len(row["hist_item"])
        slots = list(zip(row["hist_item"], row["hist_cat"], [n - j for j in range(n)]))  # newest = position 1
        query = att_token("target", row["item"], row["cat"], 0)
        scores = [score(query, att_token("hist", *slot)) for slot in slots]
        top = sorted(range(n), key=lambda j: -scores[j])[: min(2, n)]
        e = np.exp([scores[j] - max(scores[j] for j in top) for j in top])
        weights = e / e.sum()
        pooled = sum(w * repr_token("hist", *slots[j]) for w, j in zip(weights, top))
        target = repr_token("target", row["item"], row["cat"], 0)
        out.append(np.concatenate([target, pooled, target * pooled]))
    return np.stack(out)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_features_match_the_hand_reference(variant, mode):
    backbone = hand_backbone(variant)
    backbone.train(mode == "train")
    features = backbone(hand_batch()).features.detach().double().numpy()
    expected = reference_features(backbone, variant)
    assert features.shape == expected.shape == (2, 3 * backbone.repr_tokens.token_dim)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_the_reference_tells_variants_apart():
    """Sanity of the hand example: every variant's features differ from TWIN's (nothing is vacuous)."""
    twin = reference_features(hand_backbone("twin"), "twin")
    for variant in ("din", "twin_4e", "twin_proj", "dare"):
        other = reference_features(hand_backbone(variant), variant)
        assert other.shape != twin.shape or not np.allclose(other, twin, atol=1e-4), variant
