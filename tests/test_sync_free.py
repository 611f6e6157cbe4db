"""The fixed-shape training step of the target-attention backbones: same numbers as the jagged (KJT) path,
and nothing in forward, backward or the sparse table update that needs the device's data on the host.

Two independent checks of "no host sync": the step runs under ``FakeTensorMode`` (tensors without data:
``.item()``, ``nonzero``, boolean-mask indexing, ``torch.unique`` all raise there), and with
``Tensor.item/tolist/__bool__/__int__/__float__/nonzero`` patched to raise. Each check is shown to catch the
jagged path, which reads ``lengths.max()`` to the host. On a GPU, ``torch.cuda.set_sync_debug_mode("error")``
checks the same step for real (``-m gpu``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.data.ctr_table import CTRTable
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.ops.sparse_update import LazyAdam, RowWiseAdagrad
from recsys.training.ranking import RankingModule
from tests.helpers import random_samples

VOCAB = Vocab(20, 500, 6)
MAX_LEN = 12
TASKS = [TaskSpec("click")]
VARIANTS = {
    "dare": dict(decoupled=True, attention_dim=4),
    "twin": dict(),
    "twin_4e": dict(decoupled=True, split_target=True),
    "twin_proj": dict(projection=True),
    "din": dict(use_position=False, scorer="din"),
}


@pytest.fixture(scope="module")
def table():
    return CTRTable.from_frame(random_samples(rows=96, vocab=VOCAB, max_len=MAX_LEN, seed=3), "mem", {"click": "label"})


def make_model(variant: str, **kwargs) -> RankingModel:
    torch.manual_seed(0)
    backbone = TargetAttentionBackbone(VOCAB, MAX_LEN, embedding_dim=8, top_k=5, **VARIANTS[variant], **kwargs)
    return RankingModel(backbone, SingleTower(backbone.output_dim, TASKS, hidden=(32, 16)))


def step(model: RankingModel, batch, sparse_optimizer=None) -> torch.Tensor:
    """Forward, losses, backward and (optionally) the sparse table update; returns the loss."""
    module = RankingModule(model, TASKS, sparse_optimizer or torch.optim.SGD, torch.optim.SGD)
    loss = module.compute_losses(batch, model(batch))["total"]
    loss.backward()
    if sparse_optimizer is not None:
        module.configure_optimizers()[0].step()
    return loss


def test_padded_batches_carry_the_same_ids(table):
    rows = np.array([5, 0, 17, 3])
    jagged, padded = table.batch(rows), table.batch(rows, pad_to=MAX_LEN).padded
    lengths = jagged.sparse["hist_item"].lengths()
    assert padded.hist_item.shape == (4, MAX_LEN) and torch.equal(padded.lengths, lengths)
    for key, dense in (("hist_item", padded.hist_item), ("hist_cat", padded.hist_cat)):
        mask = torch.arange(MAX_LEN) < lengths.unsqueeze(1)
        assert torch.equal(dense[mask], jagged.sparse[key].values()) and not dense[~mask].any()
    assert torch.equal(padded.target_item, jagged.sparse["target_item"].values())
    with pytest.raises(ValueError, match="more than the padded width"):
        table.batch(rows, pad_to=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_shape_step_equals_the_jagged_step(variant, table):
    """Same logits, aux logits and gradients from the fixed-shape ids as from the KJT (whose width is the
    batch's longest history, shorter than max_len here)."""
    rows = np.arange(40)
    jagged, fixed = table.batch(rows), table.batch(rows, pad_to=MAX_LEN + 3)
    results = []
    for batch in (jagged, fixed):
        model = make_model(variant).train()
        torch.manual_seed(1)
        out = model(batch)
        model.zero_grad()
        step(model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.logits["click"], b.logits["click"], rtol=0, atol=1e-6)
    for name in a.aux_logits:
        torch.testing.assert_close(a.aux_logits[name], b.aux_logits[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.extras["attention"], b.extras["attention"], rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-6, msg=name)


@contextlib.contextmanager
def host_reads_raise():
    """Patch the Python entry points that copy device data to the host so that they raise."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"host sync: Tensor.{name} inside the step")

        return method

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "unique")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    saved_fns = {n: getattr(torch, n) for n in ("nonzero", "unique", "masked_select")}
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        for n in saved_fns:
            setattr(torch, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        for n, f in saved_fns.items():
            setattr(torch, n, f)


OPTIMIZERS = {"row_wise_adagrad": lambda p: RowWiseAdagrad(p, lr=0.05), "lazy_adam": lambda p: LazyAdam(p, lr=0.01)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_shape_step_has_no_host_sync(variant, optimizer, table):
    batch = table.batch(np.arange(64), pad_to=MAX_LEN)
    with FakeTensorMode(allow_non_fake_inputs=True):
        step(make_model(variant, sparse_grad=True).train(), batch, OPTIMIZERS[optimizer])
    model = make_model(variant, sparse_grad=True).train()
    before = [p.detach().clone() for p in model.parameters()]
    with host_reads_raise():
        step(model, batch, OPTIMIZERS[optimizer])
    tables = list(model.backbone.repr_tokens.tables.parameters())
    assert tables[0].grad.is_sparse
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the update happened


def test_the_checks_catch_the_jagged_path(table):
    batch = table.batch(np.arange(64))  # no fixed-shape ids: the KJT path reads lengths.max() to the host
    with pytest.raises(AssertionError, match="host sync"), host_reads_raise():
        step(make_model("dare").train(), batch)
    with (
        pytest.raises(Exception, match="local_scalar_dense|data-dependent"),
        FakeTensorMode(allow_non_fake_inputs=True),
    ):
        step(make_model("dare").train(), batch)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_shape_step_does_not_synchronise_the_gpu(variant, table):
    batch = table.batch(np.arange(64), pad_to=MAX_LEN).to("cuda")
    model = make_model(variant, sparse_grad=True).cuda().train()
    step(model, batch, OPTIMIZERS["row_wise_adagrad"])  # warm-up: lazy inits, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(model, batch, OPTIMIZERS["row_wise_adagrad"])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_torch_jagged_ops_read_nothing_from_the_device_given_the_total():
    """The torch fallbacks of recsys.ops.jagged (what CUDA runs without FBGEMM's kernels) are shape-static."""
    from recsys.ops.jagged import dense_to_jagged_torch, jagged_to_padded_dense_torch, lengths_to_offsets_torch

    values, lengths = torch.randn(10, 3), torch.tensor([3, 0, 7])
    offsets = lengths_to_offsets_torch(lengths)
    dense = jagged_to_padded_dense_torch(values, offsets, 7)
    assert torch.equal(dense_to_jagged_torch(dense, offsets, total=10), values)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = dense_to_jagged_torch(jagged_to_padded_dense_torch(values, offsets, 7), offsets, total=10)
    assert fake.shape == (10, 3)
