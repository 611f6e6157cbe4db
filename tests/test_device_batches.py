"""Splits held on the training device (``data.resident``): the same batches, in the same order, as the host
loader; exact mid-epoch resume; a one-line error where ``resident=true`` cannot apply. On the CPU the device
table lives on the CPU (same code); ``-m gpu`` runs it on CUDA, through a real ``pipelines.train`` datamodule."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from recsys.data.batch import CTRBatch
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader, epoch_sampler
from recsys.data.datamodule import CTRDataModule
from recsys.data.device_batches import DeviceBatchLoader, DeviceTable
from recsys.data.schema import Vocab
from recsys.errors import ConfigError
from tests.helpers import random_samples

VOCAB = Vocab(30, 400, 7)
MAX_LEN = 10


@pytest.fixture(scope="module")
def table() -> CTRTable:
    return CTRTable.from_frame(random_samples(rows=75, vocab=VOCAB, max_len=MAX_LEN, seed=5), "mem", {"click": "label"})


def assert_same_batch(a: CTRBatch, b: CTRBatch) -> None:
    assert a.sparse is None and b.sparse is None
    for f in fields(a.padded):
        x, y = getattr(a.padded, f.name), getattr(b.padded, f.name)
        assert x.dtype == y.dtype, f.name
        torch.testing.assert_close(x.cpu(), y.cpu(), rtol=0, atol=0)
    torch.testing.assert_close(a.user.cpu(), b.user.cpu(), rtol=0, atol=0)
    assert a.labels.keys() == b.labels.keys()
    for k in a.labels:
        torch.testing.assert_close(a.labels[k].cpu(), b.labels[k].cpu(), rtol=0, atol=0)


def host_and_device_loaders(table, device, shuffle=True, batch=16, seed=3):
    host = batch_loader(BatchedCTRDataset(table, MAX_LEN), len(table), batch, shuffle, seed, drop_last=False)
    resident = DeviceBatchLoader(
        DeviceTable.from_table(table, MAX_LEN, device), epoch_sampler(len(table), batch, shuffle, seed, False)
    )
    return host, resident


def compare_epochs(table, device):
    host, resident = host_and_device_loaders(table, device)
    assert len(host) == len(resident) == 5  # 75 rows / 16: the last batch is partial, kept
    for epoch in (0, 1):
        host.sampler.set_epoch(epoch)
        resident.sampler.set_epoch(epoch)
        pairs = list(zip(host, resident, strict=True))
        for a, b in pairs:
            assert_same_batch(a, b)
            assert b.padded.hist_item.device.type == torch.device(device).type
        first = pairs[0][1].user
    return first


def test_device_batches_equal_the_host_loaders_in_order(table):
    compare_epochs(table, "cpu")
    host, resident = host_and_device_loaders(table, "cpu", shuffle=False, batch=32)
    for a, b in zip(host, resident, strict=True):  # evaluation order: no shuffle, the partial batch kept
        assert_same_batch(a, b)


def test_epochs_differ_and_a_resumed_loader_continues_with_the_next_unseen_batch(table):
    _, resident = host_and_device_loaders(table, "cpu")
    resident.sampler.set_epoch(1)
    it = iter(resident)
    seen = [next(it), next(it)]
    state = resident.state_dict()
    assert state == {"epoch": 1, "batches_done": 2}
    rest = list(it)
    _, resumed = host_and_device_loaders(table, "cpu")
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest) == 3
    for a, b in zip(rest, again, strict=True):
        assert_same_batch(a, b)
    resident.sampler.set_epoch(0)
    assert not torch.equal(next(iter(resident)).user, seen[0].user)  # another epoch, another order


def test_nbytes_is_what_the_copy_takes(table):
    device_table = DeviceTable.from_table(table, MAX_LEN, "cpu")
    tensors = [getattr(device_table, f.name) for f in fields(device_table) if f.name != "labels"]
    tensors += list(device_table.labels.values())
    assert DeviceTable.nbytes_of(table, MAX_LEN) == sum(t.numel() * t.element_size() for t in tensors)


def test_a_sampler_over_other_rows_is_refused(table):
    with pytest.raises(ValueError, match="orders 74 rows, the table holds 75"):
        DeviceBatchLoader(DeviceTable.from_table(table, MAX_LEN, "cpu"), epoch_sampler(74, 8, True, 0, False))


def fit_ranking(root, train, val, steps: int = 9) -> torch.Tensor:
    """``steps`` Lightning steps of a small TWIN-style model (CPU) with validation every 4 steps; its weights."""
    from mtl.single import SingleTower
    from mtl.spec import TaskSpec
    from recsys.models.ranking import RankingModel
    from recsys.models.target_attention import TargetAttentionBackbone
    from recsys.training.ranking import RankingModule
    from tests.helpers import quiet_trainer

    torch.manual_seed(0)
    tasks = [TaskSpec("click")]
    backbone = TargetAttentionBackbone(VOCAB, MAX_LEN, embedding_dim=4, top_k=3)
    model = RankingModel(backbone, SingleTower(backbone.output_dim, tasks, hidden=(8,)))
    module = RankingModule(model, tasks, lambda p: torch.optim.Adam(p), lambda p: torch.optim.Adam(p))
    trainer = quiet_trainer(root, accelerator="cpu", max_steps=steps, logger=False, val_check_interval=4)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert trainer.global_step == steps and "val/auc" in trainer.callback_metrics
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_lightning_trains_and_validates_on_device_batches_as_on_host_batches(table, tmp_path):
    host, resident = host_and_device_loaders(table, "cpu")  # 5 batches an epoch: 9 steps cross into epoch 2
    host_val, resident_val = host_and_device_loaders(table, "cpu", shuffle=False, batch=32)
    on_host = fit_ranking(tmp_path / "host", host, host_val)
    on_device = fit_ranking(tmp_path / "device", resident, resident_val)
    torch.testing.assert_close(on_device, on_host, rtol=0, atol=0)


class _Strategy:
    def __init__(self, device: str) -> None:
        self.root_device = torch.device(device)


class _Trainer:
    def __init__(self, device: str) -> None:
        self.strategy, self.world_size = _Strategy(device), 1


def datamodule(table, resident, device: str) -> CTRDataModule:
    dm = CTRDataModule("mem", source=lambda cache_root: cache_root, cache_dir="unused", resident=resident)
    dm.meta = type("Meta", (), {"max_len": MAX_LEN})()
    dm.tables = {split: table for split in ("train", "val", "test")}
    dm.trainer = _Trainer(device)
    return dm


def test_resident_true_where_it_cannot_apply_is_one_line(table):
    with pytest.raises(ConfigError, match=r"data.resident=true: the trainer is not on a CUDA device; set data.res"):
        datamodule(table, True, "cpu").train_dataloader()


def test_resident_takes_true_false_or_null():
    with pytest.raises(ConfigError, match=r"^data.resident='yes': choose true, false or null$"):
        CTRDataModule("mem", source=lambda cache_root: cache_root, cache_dir="unused", resident="yes")


def test_resident_null_on_the_cpu_keeps_the_host_loader(table):
    loader = datamodule(table, None, "cpu").train_dataloader()
    assert not isinstance(loader, DeviceBatchLoader)
    assert next(iter(loader)).padded is None  # the CPU's batches carry the KJT


@pytest.mark.gpu
def test_device_batches_on_cuda_equal_the_host_loaders(table):
    first = compare_epochs(table, "cuda")
    assert first.is_cuda


@pytest.mark.gpu
@pytest.mark.parametrize("resident", [None, False])
def test_the_datamodule_holds_splits_on_cuda_unless_told_not_to(table, resident):
    dm = datamodule(table, resident, "cuda")
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert all(isinstance(x, DeviceBatchLoader) == (resident is None) for x in loaders)
    if resident is None:
        assert set(dm.device_tables) == {"train", "val", "test"}
        assert dm.train_dataloader().table is loaders[0].table  # copied once, then reused
        batch = next(iter(loaders[0]))
        assert batch.padded.hist_item.is_cuda and batch.batch_size == len(table)
