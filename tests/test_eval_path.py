"""Inference speed-ups keep results: the direct eval path of the target-attention backbone, the dense id map,
and the scorer's run-ahead thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.bundle import IdMapper
from recsys.data.ctr_table import CTRTable
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.modules.tokens import TokenEmbedding
from recsys.scoring.reader import run_ahead
from tests.helpers import direct_and_training_forward, random_samples

# 500 items > 8 x max_len: without the item dot table, item scores take gathered_dot's row-gather branch,
# categories its matmul branch
VOCAB = Vocab(20, 500, 6)
DIRECT = {
    "dare": dict(decoupled=True, attention_dim=4),
    "twin": dict(),
    "twin_4e": dict(decoupled=True, split_target=True),
}


def make_model(variant: str, **kwargs) -> RankingModel:
    torch.manual_seed(0)
    backbone = TargetAttentionBackbone(VOCAB, 12, embedding_dim=8, top_k=5, **{**DIRECT.get(variant, {}), **kwargs})
    return RankingModel(backbone, SingleTower(backbone.output_dim, [TaskSpec("click")], hidden=(32, 16))).eval()


@pytest.fixture(scope="module")
def batch():
    table = CTRTable.from_frame(random_samples(rows=300, vocab=VOCAB, seed=2), "mem", {"click": "label"}, VOCAB)
    return table.batch(np.arange(300))


@pytest.mark.parametrize("item_gram", [True, False])
@pytest.mark.parametrize("variant", DIRECT)
def test_direct_eval_path_equals_the_training_forward(variant, item_gram, batch, monkeypatch):
    if not item_gram:
        monkeypatch.setattr(TokenEmbedding, "GRAM_LIMIT", 0)
    model = make_model(variant)
    fast, slow = direct_and_training_forward(model, batch, monkeypatch)
    torch.testing.assert_close(fast.logits["click"], slow.logits["click"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.extras["attention"], slow.extras["attention"], rtol=0, atol=1e-5)
    assert torch.equal(fast.extras["topk_index"], slow.extras["topk_index"])


def test_item_dot_table_follows_weight_updates(batch, monkeypatch):
    model = make_model("dare")
    with torch.no_grad():
        before = model(batch).extras["topk_index"]
        for p in model.backbone.att_tokens.tables.parameters():
            p.normal_()  # an in-place update, as an optimizer step
        fast = model(batch)
        monkeypatch.setattr(TargetAttentionBackbone, "_direct_eval", lambda self: False)
        slow = model(batch)
    assert not torch.equal(before, fast.extras["topk_index"])
    assert torch.equal(fast.extras["topk_index"], slow.extras["topk_index"])
    torch.testing.assert_close(fast.logits["click"], slow.logits["click"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(projection=True), dict(use_position=False, scorer="din")])
def test_other_variants_and_training_keep_the_padded_path(kwargs):
    assert not make_model("other", **kwargs).backbone._direct_eval()
    assert not make_model("dare").train().backbone._direct_eval()


def test_dense_id_map_equals_the_sorted_search():
    rng = np.random.default_rng(0)
    raw = rng.choice(np.arange(-50, 10**6), 500, replace=False)
    dense, search = IdMapper(raw, np.arange(1, 501), 500), IdMapper(raw, np.arange(1, 501), 500)
    search._dense = None
    extremes = [np.iinfo(np.int64).max, -(2**62), raw.min() - 1, raw.max() + 1, raw.min(), raw.max()]
    ids = np.concatenate([rng.choice(raw, 1000), rng.integers(-(10**6), 2 * 10**6, 1000), extremes])
    assert dense._dense is not None
    np.testing.assert_array_equal(dense(ids), search(ids))


def test_run_ahead_keeps_order_and_raises_in_the_consumer():
    assert list(run_ahead(range(50), lambda x: x * x, depth=2)) == [x * x for x in range(50)]

    def items():
        yield 1
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        list(run_ahead(items(), lambda x: x))
    ahead = run_ahead(range(10**6), lambda x: x)
    assert next(ahead) == 0
    workers = [t for t in threading.enumerate() if t.name == "run_ahead" and t.is_alive()]
    assert len(workers) == 1  # the producer is running (blocked on the full queue)
    ahead.close()  # an early stop ends the thread
    workers[0].join(timeout=5)
    assert not workers[0].is_alive()


def test_weights_made_under_inference_mode_skip_the_dot_table(batch):
    with torch.inference_mode():  # such weights have no version counter to key the cached table on
        model = make_model("dare")
        assert model(batch).logits["click"].shape == (300,)
    assert model.backbone.att_tokens._item_gram is None


# ---- every target-attention config of configs/recsys/: the eval order equals the training order ----------

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _target_attention_configs() -> list[str]:
    """``configs/recsys/*.yaml`` whose backbone is the target-attention one (directly or through its defaults)."""
    import yaml

    def target(name: str) -> str:
        spec = yaml.safe_load((CONFIG_DIR / "recsys" / f"{name}.yaml").read_text())
        own = (spec.get("recsys") or spec).get("_target_", "")
        bases = [d for d in spec.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        return own or next((target(b) for b in bases), "")

    names = sorted(p.stem for p in (CONFIG_DIR / "recsys").glob("*.yaml"))
    return [n for n in names if target(n).endswith("TargetAttentionBackbone")]


RECSYS_CONFIGS = _target_attention_configs()
# items: <= 8 x max_len (gathered_dot's matmul branch), the item dot table, and too many rows for it
VOCABS = {"small": Vocab(30, 150, 8), "gram": Vocab(30, 3000, 40), "large": Vocab(30, 9000, 300)}


def backbone_from_config(name: str, vocab: Vocab, max_len: int):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"recsys={name}"])
    if not cfg.recsys["_target_"].endswith("TargetAttentionBackbone"):
        return None
    return instantiate(cfg.recsys)(vocab=vocab, max_len=max_len)


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("name", RECSYS_CONFIGS)
def test_every_recsys_config_evaluates_as_it_trains(name, vocab):
    """Each config as shipped (its dims, K = 20): the eval forward equals the training-order forward on
    jagged and on fixed-shape batches, for vocabularies on each side of the eval path's branches."""
    torch.manual_seed(0)
    max_len = 40
    backbone = backbone_from_config(name, VOCABS[vocab], max_len)
    assert backbone is not None, name
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_()  # well-separated scores: the top-K has no ties
    model = RankingModel(backbone, SingleTower(backbone.output_dim, [TaskSpec("click")], hidden=(16,))).eval()
    frame = random_samples(rows=200, vocab=VOCABS[vocab], max_len=max_len, seed=7)
    table = CTRTable.from_frame(frame, "mem", {"click": "label"}, VOCABS[vocab])
    direct = backbone._direct_eval()
    assert direct == (backbone.scorer.__class__.__name__ == "DotScorer" and not backbone.projections)
    backbone.eval_chunk = 64
    for batch in (table.batch(np.arange(200)), table.batch(np.arange(200), pad_to=max_len)):
        with torch.no_grad():
            fast = model(batch)
            backbone._direct_eval = lambda: False  # the training order, in eval mode
            slow = model(batch)
            del backbone._direct_eval
        torch.testing.assert_close(fast.logits["click"], slow.logits["click"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.extras["attention"], slow.extras["attention"], rtol=1e-5, atol=1e-5)
        real = torch.gather(batch_mask(batch, max_len), 1, slow.extras["topk_index"])
        assert torch.equal(fast.extras["topk_index"][real], slow.extras["topk_index"][real])


def batch_mask(batch, width: int) -> torch.Tensor:
    """``[B, width]`` True on real history slots (the top-K order of padding slots is arbitrary)."""
    lengths = batch.padded.lengths if batch.padded is not None else batch.sparse["hist_item"].lengths()
    return torch.arange(width) < lengths.unsqueeze(1)
