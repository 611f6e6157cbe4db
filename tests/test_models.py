import numpy as np
import pytest
import torch

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.data.ctr_table import CTRTable
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.training.ranking import split_sparse_dense
from tests.helpers import fit_one_batch, random_samples

VOCAB = Vocab(20, 50, 6)
VARIANTS = {
    "dare": dict(decoupled=True, attention_dim=8),
    "twin": dict(),
    "twin_4e": dict(decoupled=True, split_target=True),
    "twin_proj": dict(projection=True),
    "din": dict(use_position=False, scorer="din"),
}


def make_model(variant, top_k=5, seed=0):
    torch.manual_seed(seed)
    backbone = TargetAttentionBackbone(VOCAB, 12, embedding_dim=8, top_k=top_k, **VARIANTS[variant])
    return RankingModel(backbone, SingleTower(backbone.output_dim, [TaskSpec("click")], hidden=(32, 16)))


@pytest.fixture(scope="module")
def table():
    return CTRTable.from_frame(random_samples(rows=256, seed=1), "mem", {"click": "label"}, VOCAB)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes(variant, table):
    model = make_model(variant)
    batch = table.batch(np.arange(16))
    out = model(batch)
    max_len = int(batch.sparse["hist_item"].lengths().max())
    assert out.logits["click"].shape == (16,)
    assert out.aux_logits["full_sequence"].shape == (16,)
    assert out.extras["attention"].shape == (16, min(5, max_len))
    torch.testing.assert_close(out.extras["attention"].sum(-1), torch.ones(16))
    token = 3 * 8 if variant != "din" else 2 * 8
    assert model.backbone.output_dim == 3 * token


def test_topk_picks_highest_scores_and_ignores_padding(table):
    model = make_model("dare", top_k=3)
    batch = table.batch(np.arange(32))
    scores, mask = model.backbone.attention_scores(batch)
    out = model(batch)
    idx = out.extras["topk_index"]
    masked = scores.masked_fill(~mask, float("-inf"))
    expected = masked.topk(3, dim=1).values
    torch.testing.assert_close(masked.gather(1, idx), expected)
    # slots beyond a row's length get zero weight
    weights = out.extras["attention"]
    assert torch.all(weights[~mask.gather(1, idx)] == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_steps_reduce_the_loss(variant, table):
    """Trainability only (the head alone could overfit a batch): the attention itself is checked against a hand
    reference in tests/test_attention_reference.py."""
    model = make_model(variant)
    first, last = fit_one_batch(model, [TaskSpec("click")], table.batch(np.arange(len(table))), steps=30)
    assert last < 0.8 * first, (first, last)


def test_dare_decouples_attention_and_representation(table):
    model = make_model("dare")
    batch = table.batch(np.arange(64))

    def att():
        return {n: p for n, p in model.named_parameters() if n.startswith("backbone.att_tokens.")}

    def rep():
        return {n: p for n, p in model.named_parameters() if n.startswith("backbone.repr_tokens.")}

    def norm(params):
        return {n: 0.0 if p.grad is None else float(p.grad.abs().sum()) for n, p in params.items()}

    # score path -> only attention tables
    scores, mask = model.backbone.attention_scores(batch)
    scores[mask].sum().backward()
    assert all(v > 0 for v in norm(att()).values()), norm(att())
    assert all(v == 0 for v in norm(rep()).values()), norm(rep())

    # pooled path (scores cut) -> only representation tables
    model.zero_grad(set_to_none=True)
    model.backbone.detach_scores = True
    model(batch).logits["click"].sum().backward()
    assert all(v == 0 for v in norm(att()).values()), norm(att())
    assert all(v > 0 for v in norm(rep()).values()), norm(rep())


def test_twin_shares_one_table_between_paths(table):
    model = make_model("twin")
    batch = table.batch(np.arange(64))
    scores, mask = model.backbone.attention_scores(batch)
    scores[mask].sum().backward()
    shared = {n: p for n, p in model.named_parameters() if ".tables." in n}
    assert shared and all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared.values())
    assert model.backbone.att_tokens is None


def test_attention_width_is_independent():
    backbone = TargetAttentionBackbone(VOCAB, 12, embedding_dim=16, attention_dim=4, decoupled=True)
    widths = {n: p.shape[1] for n, p in backbone.named_parameters() if ".tables." in n}
    assert {w for n, w in widths.items() if n.startswith("att_")} == {4}
    assert {w for n, w in widths.items() if n.startswith("repr_")} == {16}
    with pytest.raises(ValueError, match="decoupled"):
        TargetAttentionBackbone(VOCAB, 12, embedding_dim=16, attention_dim=4, decoupled=False)


def test_sparse_dense_split_and_init():
    model = make_model("dare")
    sparse, dense = split_sparse_dense(model)
    assert len(sparse) == 4  # att/repr x item/category
    assert all(p.dim() == 2 and p.shape[0] in (51, 7) for p in sparse)
    std = torch.cat([p.detach().flatten() for p in sparse]).std().item()
    assert 0.005 < std < 0.02
