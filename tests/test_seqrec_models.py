"""SASRec / MQSA-TED against a dense reference of the official layout, the reduction to SASRec, TED and CE
losses against dense formulas, MoH gates and balance loss, HR/NDCG on a hand-computed example."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from recsys.data.seq_batch import SeqBatch, make_seq_kjt
from recsys.data.transitions import build_transition_graph
from recsys.losses.sequential import (
    linear_logsumexp,
    next_item_loss,
    sequential_losses,
    ted_loss,
)
from recsys.metrics.topk import rank_metrics, target_ranks
from recsys.models.mqsa_ted import MQSATED
from recsys.models.sequential import last_position_ranks, last_position_scores
from recsys.modules.moh import HeadRouter
from recsys.modules.seq_blocks import Layout, SequenceEncoder
from tests.conftest import REPO

VOCAB = SimpleNamespace(num_users=4, num_items=12, num_categories=0)
SEQS = [[3, 5, 7, 2], [9], [1, 2, 3, 4, 5, 6], [11, 4]]


def make_batch(seqs, targets=None, exclude=None):
    def pack(rows):
        return torch.tensor([i for r in rows for i in r], dtype=torch.long), torch.tensor([len(r) for r in rows])

    targets = targets if targets is not None else [[(i % 12) + 1 for i in r] for r in seqs]
    exclude = exclude if exclude is not None else [[] for _ in seqs]
    return SeqBatch(make_seq_kjt(pack(seqs), pack(targets), pack(exclude)), torch.arange(len(seqs)))


def reference_encoder(model, encoder, seqs, max_len):
    """The official code's computation: left padding to max_len, masks with -2^32+1, one row at a time."""
    d, heads = model.dim, encoder.blocks[0].num_heads
    table, pos = model.item_table(), model.positions.weight
    outs = []
    for s in seqs:
        ids = torch.tensor([0] * (max_len - len(s)) + s)
        mask = (ids != 0).float().unsqueeze(1)
        x = (table[ids] * math.sqrt(d) + pos) * mask
        for block in encoder.blocks:
            qin = torch.zeros_like(x)
            for t in range(max_len):
                lo = max(0, t - encoder.window + 1)
                qin[t] = (x[lo : t + 1] * mask[lo : t + 1]).sum(0) / mask[lo : t + 1].sum().clamp_min(1e-24)
            q = block.query_norm(qin)
            Q, K, V = (t.view(max_len, heads, -1).transpose(0, 1) for t in (block.q(q), block.k(x), block.v(x)))
            scores = Q @ K.transpose(1, 2) / math.sqrt(d // heads)
            blocked = (mask.squeeze(1) == 0).unsqueeze(0) | torch.ones(max_len, max_len).triu(1).bool()
            att = torch.softmax(scores.masked_fill(blocked, -(2.0**32) + 1), dim=-1) @ V
            o = block.attn_norm(att.transpose(0, 1).reshape(max_len, d) + q)
            x = (o + block.ff2(F.relu(block.ff1(o)))) * mask
        outs.append(encoder.final_norm(x)[max_len - len(s) :])
    return outs


@pytest.mark.parametrize("heads", [1, 2])
def test_jagged_model_matches_the_official_dense_layout(heads):
    torch.manual_seed(0)
    model = MQSATED(VOCAB, max_len=8, dim=8, num_heads=heads, window=3, alpha=0.3).eval()
    with torch.no_grad():
        out = model(make_batch(SEQS))
        short = reference_encoder(model, model.encoders["short"], SEQS, 8)
        long = reference_encoder(model, model.encoders["long"], SEQS, 8)
        expected = torch.cat([0.3 * s + 0.7 * lo for s, lo in zip(short, long)])
        torch.testing.assert_close(out.hidden, expected, rtol=1e-5, atol=1e-5)
        last = model(make_batch(SEQS), last_only=True).hidden
        torch.testing.assert_close(
            last, torch.stack([e[-1] for e in [0.3 * s + 0.7 * lo for s, lo in zip(short, long)]]), rtol=1e-5, atol=1e-5
        )


def _compose(overrides):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_alpha_1_lambda_0_is_exactly_sasrec():
    sas_factory = instantiate(_compose(["recsys=sasrec"]).recsys)
    mq_factory = instantiate(_compose(["recsys=mqsa_ted", "recsys.alpha=1", "recsys.lambda_kd=0"]).recsys)
    torch.manual_seed(1)
    sas = sas_factory(vocab=VOCAB, max_len=8, dim=8)
    torch.manual_seed(1)
    mq = mq_factory(vocab=VOCAB, max_len=8, dim=8)
    assert isinstance(mq, MQSATED) and mq.lambda_kd == 0 and mq.alpha == 1
    shared = sas.state_dict()
    assert all(torch.equal(v, mq.state_dict()[k]) for k, v in shared.items())
    batch = make_batch(SEQS)
    graph = build_transition_graph(torch.tensor([1, 2]), torch.tensor([2, 3]), 12)
    losses = []
    for model in (sas, mq):
        torch.manual_seed(7)  # the same dropout masks
        loss = sequential_losses(model.train(), batch, graph)
        loss["total"].backward()
        losses.append(loss)
    assert torch.equal(losses[0]["total"], losses[1]["total"]) and set(losses[1]) == {"rec", "total"}
    grads = dict(mq.named_parameters())
    for name, param in sas.named_parameters():
        assert torch.equal(param.grad, grads[name].grad), name
    assert all(p.grad is None for n, p in mq.named_parameters() if n.startswith("encoders.long"))
    eval_batch = make_batch(SEQS, [[1]] * 4, [[2, 3]] * 4)
    assert torch.equal(last_position_scores(sas.eval(), eval_batch), last_position_scores(mq.eval(), eval_batch))


def test_ted_loss_equals_the_dense_teacher_formula():
    torch.manual_seed(2)
    table = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    graph = build_transition_graph(torch.tensor([1, 1, 2, 3, 3, 3, 5]), torch.tensor([2, 2, 3, 4, 1, 4, 6]), 8)
    graph.weight = graph.weight.double()
    heads = torch.tensor([1, 3, 7, 2, 1])  # item 7 has no successor: uniform teacher
    for tau in (0.1, 0.01):
        loss = ted_loss(heads, table, graph, tau)
        teacher = torch.softmax(graph.dense().double()[heads][:, 1:] / tau, dim=1)  # over all 8 items
        student = torch.log_softmax(table[heads] * 2.0 @ table[1:].T / tau, dim=1)  # √d = 2
        reference = -(teacher * student).sum(1).mean()
        torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.autograd.grad(loss, table)[0], torch.autograd.grad(reference, table)[0])


@pytest.mark.parametrize("pad_class", [True, False])
def test_next_item_loss_is_full_softmax_cross_entropy(pad_class):
    torch.manual_seed(3)
    table = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 8, 3, 3, 5])
    logits = hidden @ table[1:].T
    if pad_class:  # the padding row as a class with logit 0 (column 0)
        reference = F.cross_entropy(torch.cat([torch.zeros(6, 1, dtype=torch.float64), logits], 1), targets)
    else:
        reference = F.cross_entropy(logits, targets - 1)
    loss = next_item_loss(hidden, targets, table, pad_class)
    torch.testing.assert_close(loss, reference)
    got = torch.autograd.grad(loss, (hidden, table))
    want = torch.autograd.grad(reference, (hidden, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_linear_logsumexp_gradient_and_no_grad_path():
    torch.manual_seed(4)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    got = linear_logsumexp(a, b)
    want = torch.logsumexp(a @ b.T, dim=1)
    torch.testing.assert_close(got, want)
    weights = torch.arange(5.0)
    for x, y in zip(
        torch.autograd.grad((got * weights).sum(), (a, b)), torch.autograd.grad((want * weights).sum(), (a, b))
    ):
        torch.testing.assert_close(x, y)
    with torch.no_grad():
        torch.testing.assert_close(linear_logsumexp(a, b), want.detach())


# ---- Mixture-of-Head -------------------------------------------------------------------------
@pytest.mark.parametrize("heads, shared, k", [(4, 2, 1), (8, 3, 2), (6, 1, 3), (8, 4, 4)])
def test_zero_initialised_routers_give_gates_of_exactly_one(heads, shared, k):
    router = HeadRouter(dim=8, num_heads=heads, shared_heads=shared, routed_topk=k)
    gates = router(torch.randn(3, 5, 8)).gates
    assert torch.equal(gates[..., :shared], torch.ones(3, 5, shared))
    routed = gates[..., shared:]
    assert ((routed != 0).sum(-1) == k).all()
    assert torch.equal(routed[routed != 0], torch.ones(3 * 5 * k))


@pytest.mark.parametrize("router_kind", ["learned", "qnorm"])
def test_exactly_k_routed_heads_per_token(router_kind):
    torch.manual_seed(5)
    router = HeadRouter(dim=8, num_heads=6, shared_heads=2, routed_topk=2, router=router_kind)
    for p in router.parameters():
        torch.nn.init.normal_(p)
    x, queries = torch.randn(4, 7, 8), torch.randn(4, 7, 6, 3)
    gates = router(x, queries).gates
    assert ((gates[..., 2:] != 0).sum(-1) == 2).all() and (gates[..., :2] > 0).all()
    if router_kind == "qnorm":  # parameter-free, binary gates
        assert set(gates.unique().tolist()) == {0.0, 1.0} and not list(router.parameters())


def test_balance_loss_is_k_under_uniform_routing_and_ignores_padding():
    router = HeadRouter(dim=8, num_heads=8, shared_heads=2, routed_topk=3)
    assert router(torch.randn(2, 5, 8)).balance.item() == pytest.approx(3.0, abs=1e-6)
    torch.manual_seed(6)
    torch.nn.init.normal_(router.w_routed.weight)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    masked = router(x, mask=mask).balance
    noisy = x.clone()
    noisy[~mask] = 100 * torch.randn(int((~mask).sum()), 8)  # padding content must not matter
    assert torch.equal(router(noisy, mask=mask).balance, masked)
    assert torch.equal(masked, router(x[mask]).balance)  # = the loss over the real tokens alone


def test_dense_weighted_mode_and_moh_encoder_outputs():
    dense = HeadRouter(dim=8, num_heads=4, shared_heads=0, routed_topk=0)
    torch.nn.init.normal_(dense.w_shared.weight)
    gates = dense(torch.randn(5, 8)).gates
    assert (gates > 0).all() and torch.allclose(gates.sum(-1), torch.full((5,), 4.0))
    encoder = SequenceEncoder(
        dim=8, num_blocks=2, num_heads=4, dropout=0.0, attention="moh", moh={"shared_heads": 2, "routed_topk": 1}
    )
    layout = Layout(torch.tensor([3, 1, 4]))
    out = encoder(torch.randn(8, 8), layout)
    assert out.hidden.shape == (8, 8) and len(out.balance) == 2
    for usage in out.utilisation.values():  # 2 shared + 1 routed head active on every token
        assert usage[:2].tolist() == [1.0, 1.0] and usage.sum().item() == pytest.approx(3.0)


def test_moh_model_adds_the_weighted_balance_loss():
    torch.manual_seed(8)
    model = MQSATED(
        VOCAB,
        max_len=8,
        dim=8,
        attention="moh",
        lambda_kd=0.0,
        moh={"num_heads": 4, "shared_heads": 2, "routed_topk": 1, "balance_weight": 0.01},
    )
    out = model.train()(make_batch(SEQS))
    assert out.aux_losses["moh_balance"].item() == pytest.approx(0.01 * 1.0, abs=1e-7)  # uniform routing: L_b = k
    assert set(out.extras) == {"moh_util/short/block0", "moh_util/long/block0"}
    losses = sequential_losses(model, make_batch(SEQS), out=out)
    assert "moh_balance" in losses


# ---- metrics ---------------------------------------------------------------------------------
class _FixedScores(torch.nn.Module):
    """A stand-in model whose last-position scores are given: item table = [0; identity]."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.num_items = scores, scores.shape[1]

    def item_table(self):
        return torch.cat([torch.zeros(1, self.num_items), torch.eye(self.num_items)])

    def forward(self, batch, last_only=False):
        return SimpleNamespace(hidden=self.scores.clone())


def test_hr_ndcg_on_a_hand_computed_example():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.8, 0.2, 0.5],  # target 4 (0.8); item 2 (0.9) removed -> rank 0
            [0.7, 0.6, 0.5, 0.4, 0.3, 0.2],  # target 6 (0.2), nothing removed -> rank 5
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        ]
    )  # target 3 is in the history -> unreachable
    batch = make_batch([[1], [1], [3]], targets=[[4], [6], [3]], exclude=[[2], [], [3, 5]])
    ranks = last_position_ranks(_FixedScores(scores), batch)
    assert ranks.tolist() == [0.0, 5.0, math.inf]
    metrics = rank_metrics(ranks, prefix="test/")
    assert metrics["test/hr@5"] == pytest.approx(1 / 3) and metrics["test/ndcg@5"] == pytest.approx(1 / 3)
    assert metrics["test/hr@10"] == pytest.approx(2 / 3) and metrics["test/hr@20"] == pytest.approx(2 / 3)
    assert metrics["test/ndcg@10"] == pytest.approx((1 + 1 / math.log2(7)) / 3)
    assert metrics["test/ndcg@20"] == metrics["test/ndcg@10"]


def test_exclude_history_false_keeps_a_repeated_target_rankable():
    """The protocol option on a hand example: target 3 repeats a history item (3, 5 excluded)."""
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.9, 0.3, 0.8, 0.2, 0.5]])
    batch = make_batch([[3], [1]], targets=[[3], [4]], exclude=[[3, 5], [2]])
    model = _FixedScores(scores)
    removed = last_position_scores(model, batch)  # official MQSA-TED / S3-Rec protocol (the default)
    assert torch.isneginf(removed[0, [2, 4]]).all() and torch.isneginf(removed[1, 1])
    assert last_position_ranks(model, batch).tolist() == [math.inf, 0.0]
    kept = last_position_scores(model, batch, exclude_history=False)  # RecBole's: nothing removed
    assert torch.equal(kept, scores)
    # target 3 (0.3) is below 0.6, 0.5, 0.4; target 4 (0.8) is below item 2 (0.9), now rankable
    assert last_position_ranks(model, batch, exclude_history=False).tolist() == [3.0, 1.0]


@pytest.mark.parametrize("value", [True, False])
def test_eval_exclude_history_reaches_the_module(value):
    from recsys.training.sequential import SequentialModule

    overrides = ["recsys=mqsa_ted", f"eval.exclude_history={str(value).lower()}"]
    objective = instantiate(_compose(overrides).objective)
    assert objective.keywords["exclude_history"] is value
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    module = SequentialModule(
        _FixedScores(scores),
        None,
        torch.optim.Adam,
        torch.optim.Adam,
        **{k: v for k, v in objective.keywords.items() if k in ("ks", "pad_class", "exclude_history")},
    )
    module._rank(make_batch([[3]], targets=[[3]], exclude=[[3]]))
    assert module._eval["rank"][0].tolist() == ([math.inf] if value else [3.0])


def test_both_protocols_ranks_the_hand_example_under_each_name():
    """eval.both_protocols: the run's protocol keeps the plain names, the other one is logged beside it."""
    from recsys.training.sequential import SequentialModule

    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.1, 0.9, 0.3, 0.8, 0.2, 0.5]])
    batch = make_batch([[3], [1]], targets=[[3], [4]], exclude=[[3, 5], [2]])
    for exclude_history, other in ((True, "history_kept"), (False, "history_removed")):
        module = SequentialModule(
            _FixedScores(scores), None, torch.optim.Adam, torch.optim.Adam, (5,), True, exclude_history, True
        )
        module._rank(batch)
        metrics = module.evaluation_metrics("val")
        removed = {"hr@5": 0.5, "ndcg@5": 0.5}  # ranks [inf, 0]: the repeated target is unreachable
        kept = {"hr@5": 1.0, "ndcg@5": (1 / math.log2(5) + 1 / math.log2(3)) / 2}  # ranks [3, 1]
        mine, theirs = (removed, kept) if exclude_history else (kept, removed)
        assert metrics == pytest.approx(
            {**{f"val/{k}": v for k, v in mine.items()}, **{f"val_{other}/{k}": v for k, v in theirs.items()}}
        )


def test_early_stopping_all_waits_for_every_monitor():
    from recsys.tracking.callbacks import EarlyStoppingAll

    stopper = EarlyStoppingAll(monitor="val/ndcg@20", also=["val_history_kept/ndcg@20"], mode="max", patience=2)
    trainer = SimpleNamespace(
        callback_metrics={},
        fast_dev_run=False,
        should_stop=False,
        current_epoch=0,
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
    )
    # the run's protocol peaks at epoch 1, the other one keeps improving until epoch 3
    curves = [(0.5, 0.1), (0.4, 0.2), (0.4, 0.3), (0.4, 0.3), (0.4, 0.3)]
    stops = []
    for epoch, (main, other) in enumerate(curves):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/ndcg@20": torch.tensor(main), "val_history_kept/ndcg@20": torch.tensor(other)}
        stopper._run_early_stopping_check(trainer)
        stops.append(trainer.should_stop)
    # Lightning's own EarlyStopping on val/ndcg@20 would have stopped after epoch 3 (index 2)
    assert stops == [False, False, False, False, True] and stopper.stopped_epoch == 4
    state = stopper.state_dict()
    again = EarlyStoppingAll(monitor="val/ndcg@20", also=["val_history_kept/ndcg@20"], mode="max", patience=2)
    again.load_state_dict(state)
    assert again.also["val_history_kept/ndcg@20"].wait_count == 2 and again.wait_count == 4


def test_target_ranks_keeps_scores_unless_told():
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert target_ranks(scores, torch.tensor([3])).tolist() == [1.0]
    assert scores.tolist() == [[3.0, 1.0, 2.0]]


def test_torch_fallback_without_fbgemm_kernels_gives_the_same_model(monkeypatch):
    """The GPU benchmark machine has no FBGEMM CUDA kernels: the torch paths must agree with FBGEMM's."""
    import recsys.ops.jagged as jagged

    torch.manual_seed(9)
    model = MQSATED(VOCAB, max_len=8, dim=8, num_heads=2)
    graph = build_transition_graph(torch.tensor([1, 2, 3, 3]), torch.tensor([2, 3, 4, 5]), 12)
    batch = make_batch(SEQS)
    results = []
    for fbgemm in (True, False):
        monkeypatch.setattr(jagged, "fbgemm_supports", lambda device_type, on=fbgemm: on)
        model.zero_grad()
        loss = sequential_losses(model.eval(), batch, graph)["total"]
        loss.backward()
        results.append((loss.detach(), model.item_table().grad.clone(), model(batch, last_only=True).hidden.detach()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
