"""Sequential training at a fixed shape (``SeqBatch.padded``, what a CUDA graph of the step records): the same
losses and gradients as the jagged batch, built by the table and the datamodule, and graphed on a GPU."""

import copy
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from recsys.data.ctr_table import BatchedCTRDataset, batch_loader
from recsys.data.seq_batch import SEQ_ITEM, SeqBatch, make_seq_kjt, padded_seq
from recsys.data.seqrec import SeqDataModule, prepare_seqrec
from recsys.data.seqrec_format import Jagged, SeqTable, offsets_of
from recsys.data.transitions import build_transition_graph
from recsys.losses.sequential import sequential_losses
from recsys.models.mqsa_ted import MQSATED
from recsys.models.sasrec import SASRec
from recsys.training.cuda_graph import static_copy, tensor_leaves
from recsys.training.sequential import SequentialModule
from tests.helpers import quiet_trainer

VOCAB = SimpleNamespace(num_users=4, num_items=12, num_categories=0)
SEQS = [[3, 5, 7, 2], [9], [1, 2, 3, 4, 5, 6], [11, 4]]
NEXT = [[5, 7, 2, 8], [10], [2, 3, 4, 5, 6, 12], [4, 1]]
GRAPH = build_transition_graph(torch.tensor([3, 5, 7, 1, 2, 3, 9, 11]), torch.tensor([5, 7, 2, 2, 3, 4, 10, 4]), 12)


def _pack(rows):
    return torch.tensor([i for r in rows for i in r], dtype=torch.long), torch.tensor([len(r) for r in rows])


def jagged_batch() -> SeqBatch:
    return SeqBatch(make_seq_kjt(_pack(SEQS), _pack(NEXT), _pack([[] for _ in SEQS])), torch.arange(len(SEQS)))


def padded_batch(width: int = 8, quantum: int = 8) -> SeqBatch:
    """SEQS right-padded to ``width``; 13 real tokens, ``real_index`` filled up to 16 (quantum 8)."""

    def pad(rows):
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)

    lengths = torch.tensor([len(r) for r in SEQS])
    return SeqBatch(None, torch.arange(len(SEQS)), padded_seq(pad(SEQS), pad(NEXT), lengths, quantum))


MODELS = {
    "sasrec": lambda: SASRec(VOCAB, max_len=8, dim=8, num_heads=2, dropout=0.0),
    "mqsa_ted": lambda: MQSATED(VOCAB, max_len=8, dim=8, num_heads=2, dropout=0.0, window=3, alpha=0.3, lambda_kd=0.5),
    "moh": lambda: MQSATED(
        VOCAB,
        max_len=8,
        dim=8,
        num_heads=4,
        dropout=0.0,
        window=2,
        attention="moh",
        moh={"shared_heads": 1, "routed_topk": 2, "router": "learned"},
    ),
}


def _losses_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    losses = sequential_losses(model, batch, GRAPH, out=out)
    losses["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_padded_batch_gives_the_jagged_losses_and_gradients(name):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    if name == "moh":  # learned routers start at zero (uniform gates): give them a real routing to compare
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.5)
    jagged_losses, jagged_grads, jagged_out = _losses_and_grads(model, jagged_batch())
    padded_losses, padded_grads, padded_out = _losses_and_grads(model, padded_batch())
    assert set(jagged_losses) == set(padded_losses) and ("kd" in jagged_losses) == (name != "sasrec")
    for key, value in jagged_losses.items():
        torch.testing.assert_close(padded_losses[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert set(padded_grads) == set(jagged_grads)
    for key, grad in jagged_grads.items():
        torch.testing.assert_close(padded_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
    batch = padded_batch()
    assert batch.padded.real_index.shape == (16,) and int(batch.padded.real().sum()) == 13
    hidden = batch.token_rows(padded_out.hidden)[batch.padded.real()]
    torch.testing.assert_close(hidden, jagged_out.hidden, rtol=1e-5, atol=1e-6)
    for key, value in jagged_out.extras.items():  # MoH head utilisation counts real tokens only
        torch.testing.assert_close(padded_out.extras[key], value, msg=key)


def test_padding_slots_do_not_reach_the_losses():
    """Changing what sits in the padding slots (ids and targets) changes no loss and no gradient."""
    torch.manual_seed(1)
    model = MODELS["mqsa_ted"]().train()
    batch = padded_batch()
    other = copy.deepcopy(batch)
    real = torch.arange(8) < other.padded.lengths.unsqueeze(1)
    other.padded.items[~real] = 6
    other.padded.targets[~real] = 9
    losses, grads, _ = _losses_and_grads(model, batch)
    other_losses, other_grads, _ = _losses_and_grads(model, other)
    for key, value in losses.items():
        torch.testing.assert_close(other_losses[key], value, msg=key)
    for key, grad in grads.items():
        torch.testing.assert_close(other_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def _table() -> SeqTable:
    lengths = [len(r) for r in SEQS]
    offsets = offsets_of(lengths)
    empty = Jagged(torch.zeros(0, dtype=torch.int64).numpy(), offsets_of([0] * len(SEQS)))
    values = torch.tensor([i for r in SEQS for i in r]).numpy()
    targets = torch.tensor([i for r in NEXT for i in r]).numpy()
    return SeqTable(torch.arange(10, 14).numpy(), Jagged(values, offsets), Jagged(targets, offsets), empty)


def test_table_builds_padded_rows_holding_the_jagged_ones():
    table = _table()
    batch = table.batch([2, 0, 1], pad_to=8)
    assert batch.sparse is None and batch.batch_size == 3 and batch.user.tolist() == [12, 10, 11]
    assert batch.padded.items.tolist() == [[1, 2, 3, 4, 5, 6, 0, 0], [3, 5, 7, 2, 0, 0, 0, 0], [9] + [0] * 7]
    assert batch.padded.targets.tolist()[2] == [10] + [0] * 7 and batch.padded.lengths.tolist() == [6, 4, 1]
    ids, real = batch.tokens(SEQ_ITEM)
    assert ids[real].tolist() == [1, 2, 3, 4, 5, 6, 3, 5, 7, 2, 9]
    assert ids.shape == (24,) and real.sum() == 11  # 11 real tokens, the fill up to B T = 24 (quantum 512)
    assert batch.padded.real_index[:11].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 16]
    jagged = table.batch([2, 0, 1])
    assert jagged.padded is None and jagged.tokens(SEQ_ITEM)[1] is None
    assert torch.equal(jagged.tokens(SEQ_ITEM)[0], ids[real].long())
    leaves = tensor_leaves(batch)  # a padded batch is plain tensors: a CUDA graph can copy it into its buffers
    assert len(leaves) == 5 and all(a is not b for a, b in zip(leaves, tensor_leaves(static_copy(batch))))
    with pytest.raises(ValueError, match="one target per history item"):
        SeqTable(table.user, table.history, table.exclude, table.exclude).padded(8)


def test_datamodule_pads_training_batches_only(tmp_path):
    path = tmp_path / "seq.txt"
    path.write_text("7 1 2 3 4 5 6\n3 5 6 1\n9 2 4 2 7 8\n")
    dm = SeqDataModule(
        "tiny", lambda cache_root: prepare_seqrec(path, cache_root, "tiny", 3), str(tmp_path / "c"), fixed_shape=True
    )
    train = next(iter(dm.train_dataloader()))
    assert train.sparse is None and train.padded.items.shape == (2, 3)  # users 7 and 9; max_len 3
    assert train.padded.lengths.tolist() == [2, 2] and sorted(train.user.tolist()) == [7, 9]
    val = next(iter(dm.val_dataloader()))
    assert val.padded is None and val.sparse is not None
    dm_off = SeqDataModule("tiny", dm.source, str(tmp_path / "c"), fixed_shape=None)  # no trainer: not on CUDA
    assert next(iter(dm_off.train_dataloader())).padded is None


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def _train_seq_on_cuda(graphed: bool, root):
    torch.manual_seed(0)
    model = MODELS["mqsa_ted"]()
    module = SequentialModule(
        model,
        GRAPH,
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01),
        cuda_graph=graphed,
        graph_warmup_steps=2,
    )
    losses = _Losses()
    table = _table()
    loader = batch_loader(BatchedCTRDataset(table, pad_to=8), len(table), 3, shuffle=True, seed=1)
    trainer = quiet_trainer(root, accelerator="gpu", devices=1, max_steps=8, logger=False, callbacks=[losses])
    trainer.fit(module, train_dataloaders=loader)
    weights = {k: v.detach().cpu() for k, v in module.state_dict().items() if v.is_floating_point()}
    return weights, losses.values, copy.copy(module.graphed_step)


@pytest.mark.gpu
def test_graphed_sequential_training_on_cuda_matches_the_eager_step(tmp_path):
    """MQSA-TED (TED's graph sums included) on padded batches: the graphed run follows the eager one (4 users in
    batches of 3: every second batch is the partial one, run eagerly)."""
    eager, eager_losses, none = _train_seq_on_cuda(False, tmp_path / "eager")
    graph, graph_losses, step = _train_seq_on_cuda(True, tmp_path / "graph")
    assert none is None and step is not None and step.failed is None, step and step.failed
    assert step.replays >= 6 and step.eager == 0
    assert torch.allclose(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-6)
    for key, value in eager.items():
        if key.endswith(".k.bias"):  # softmax over keys ignores a bias all keys share: its true gradient is 0, and
            continue  # Adam turns the rounding noise left in its place into full-size, run-dependent steps
        torch.testing.assert_close(graph[key], value, rtol=1e-3, atol=1e-4, msg=key)
    assert len(step.graphs) == 2  # the full batch of 3 users and the partial one of 1
