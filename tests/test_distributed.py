"""TorchRecStrategy on 2 CPU ranks (gloo, ``elastic_launch``) against a single-process reference.

Each model case trains through Lightning + DMP with row-wise or table-wise tables and a fused row-wise
Adagrad; the cases of one group (``GROUPS``: DARE; SASRec and MQSA-TED with the item table table-wise
and row-wise) share one launch. Each case checks:

1. the plan shards each table as configured;
2. dense weights are identical on both ranks after the run;
3. the loss curve matches a single-process run on the same data (tolerance ``LOSS_ATOL``): the reference
   evaluates the same per-rank micro-batches one after another (BatchNorm statistics are per rank under
   DDP, so one big batch would be a different model), backpropagates the mean of their losses (DDP
   averages dense gradients, TorchRec divides table gradients by the world size) and applies the same
   optimisers (FBGEMM's row-wise Adagrad written out for the tables, Adam for dense weights); final
   weights agree within ``WEIGHT_ATOL``;
4. a DCP checkpoint saved at the end of epoch 1 (step 3) and resumed reaches the same weights and
   losses at step 6 as the uninterrupted run (``RESUME_ATOL``), so model shards and the fused
   optimiser state (Adagrad momentum) round-trip;
5. validation metrics are gathered across ranks: both ranks log the ``val/auc`` (``val/ndcg@10``) a single
   process computes on the whole validation set with the run's final weights;
6. the fallback for devices without FBGEMM kernels (forced here) trains as plain DDP with whole tables.

Sequential models score against the whole item table (tied output layer); sharded, they obtain it through
the collection's lookup of ids 0..I (``SASRec.lookup``), which a single-process test compares with the
direct weight. Adding a model is one entry in ``CASES`` (a :class:`Case` built by a function like
:func:`dare_case`) and in ``GROUPS``.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.spec import TaskSpec
from recsys.data.ctr_table import CTRTable, identity_collate
from recsys.data.vocab import Vocab
from recsys.distributed.collectives import merge_batches
from recsys.errors import CheckpointError
from tests.helpers import random_samples

WORLD = 2
EPOCHS, STEPS_PER_EPOCH, BATCH = 2, 3, 32  # per rank: 3 steps of 32 rows per epoch
FUSED = {"name": "row_wise_adagrad", "lr": 0.05, "eps": 1e-8}
DENSE_LR = 0.01
LOSS_ATOL = 1e-4  # per-step global loss, distributed vs single-process reference (losses ~1.4)
# final weights, distributed vs reference; after 6 steps weights have moved by ~5e-2, tables and most dense
# weights agree to ~1e-6, the BatchNorm scales to ~1e-4 (their N(0, 0.01) init gives tiny gradients, and
# Adam's normalised step amplifies float summation-order differences)
WEIGHT_ATOL = 5e-4
RESUME_ATOL = 1e-6  # final weights and losses, resumed vs uninterrupted


@dataclass(frozen=True)
class Case:
    """A model under test.

    Attributes:
        module: ``table_device -> LightningModule`` (``meta`` for the sharded build, ``None`` unsharded).
        batches: ``() -> (train batches in global step order, val batches)``; train batch ``s * WORLD + r``
            is rank r's batch at step s of every epoch.
        sharding: ``trainer.sharding`` for the strategy.
        expected: table name -> sharding type the plan must use.
        val_metric: validation metric both ranks must log identically.
        dense_key: a parameter-name fragment of dense weights that must change in the fallback run.
        not_compared: parameter-name fragments left out of the final-weight comparison with the reference
            because their exact gradient is zero: float noise, normalised by Adam into lr-sized steps, moves
            them differently in every summation order (attention key biases: softmax ignores a constant
            added to every key's score).
    """

    module: Callable[[torch.device | None], torch.nn.Module]
    batches: Callable[[], tuple[list, list]]
    sharding: dict[str, str]
    expected: dict[str, str]
    val_metric: str = "val/auc"
    dense_key: str = "tower"
    not_compared: tuple[str, ...] = ()


# ---- DARE -----------------------------------------------------------------------------------------
DARE_VOCAB, DARE_MAX_LEN = Vocab(40, 120, 10), 12


def _dare_module(table_device: torch.device | None):
    from mtl.single import SingleTower
    from recsys.models.ranking import RankingModel
    from recsys.models.target_attention import TargetAttentionBackbone
    from recsys.training.ranking import RankingModule

    tasks = [TaskSpec("click")]
    backbone = TargetAttentionBackbone(
        DARE_VOCAB,
        DARE_MAX_LEN,
        embedding_dim=8,
        attention_dim=8,
        decoupled=True,
        top_k=5,
        aux_hidden=(16,),
        device=table_device,
    )
    tower = SingleTower(backbone.output_dim, tasks, hidden=(16, 8))
    return RankingModule(
        RankingModel(backbone, tower, init_std=0.01),
        tasks,
        sparse_optimizer=functools.partial(torch.optim.SGD, lr=0.0),  # unused under DMP
        dense_optimizer=functools.partial(torch.optim.Adam, lr=DENSE_LR),
    )


def _dare_batches() -> tuple[list, list]:
    n_train, n_val = STEPS_PER_EPOCH * WORLD * BATCH, 3 * BATCH
    frame = random_samples(rows=n_train + n_val, vocab=DARE_VOCAB, max_len=DARE_MAX_LEN, seed=0)
    table = CTRTable.from_frame(frame, "test", {"click": "label"}, DARE_VOCAB, ["label"])
    rows = np.arange(n_train + n_val)
    chunks = [table.batch(rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    return chunks[: STEPS_PER_EPOCH * WORLD], chunks[STEPS_PER_EPOCH * WORLD :]


def dare_case() -> Case:
    """DARE: item tables row-wise, category tables table-wise (four tables: att/repr x item/category)."""
    rw, tw = "row_wise", "table_wise"
    return Case(
        _dare_module,
        _dare_batches,
        {"item": rw, "category": tw},
        {"att_item": rw, "repr_item": rw, "att_category": tw, "repr_category": tw},
    )


# ---- SASRec / MQSA-TED: one item table, tied to the full-softmax output layer ---------------------------
SEQ_VOCAB, SEQ_MAX_LEN = Vocab(100, 30, 0), 6
SEQ_BATCH = 8  # users per batch


def _seq_rows(users: range, seed: int) -> list[list[int]]:
    """One learnable item sequence per user (a walk with stride 3 from a random start), 3..MAX_LEN+1 items."""
    rng = np.random.default_rng(seed)
    n_items = SEQ_VOCAB.num_items
    return [
        [(int(rng.integers(n_items)) + 3 * k) % n_items + 1 for k in range(int(rng.integers(3, SEQ_MAX_LEN + 2)))]
        for _ in users
    ]


def _seq_batch(seqs: list[list[int]], users: range, train: bool):
    """Training rows: inputs ``s[:-1]``, targets ``s[1:]``; evaluation rows: target ``s[-1]``, history excluded."""
    from recsys.data.seq_batch import SeqBatch, make_seq_kjt

    def pack(rows):
        return torch.tensor([i for r in rows for i in r], dtype=torch.long), torch.tensor([len(r) for r in rows])

    inputs = [s[:-1] for s in seqs]
    targets = [s[1:] for s in seqs] if train else [s[-1:] for s in seqs]
    exclude = [[] for _ in seqs] if train else [sorted(set(s[:-1])) for s in seqs]
    return SeqBatch(make_seq_kjt(pack(inputs), pack(targets), pack(exclude)), torch.tensor(list(users)))


def _seq_batches() -> tuple[list, list]:
    n_train, n_val = STEPS_PER_EPOCH * WORLD, 3
    out = []
    for b in range(n_train + n_val):
        users = range(1 + b * SEQ_BATCH, 1 + (b + 1) * SEQ_BATCH)
        out.append(_seq_batch(_seq_rows(users, seed=b), users, train=b < n_train))
    return out[:n_train], out[n_train:]


def _seq_module(model_cls: type, table_device: torch.device | None):
    """A tiny SASRec or MQSA-TED (TED on, graph from the training batches) without dropout (deterministic)."""
    from recsys.data.batch import TARGET_ITEM
    from recsys.data.seq_batch import SEQ_ITEM
    from recsys.data.transitions import build_transition_graph
    from recsys.training.sequential import SequentialModule

    model = model_cls(SEQ_VOCAB, SEQ_MAX_LEN, dim=8, dropout=0.0, init_std=0.1, device=table_device)
    graph = None
    if model.lambda_kd > 0:
        train, _ = _seq_batches()
        src = torch.cat([b.jagged(SEQ_ITEM)[0] for b in train])
        dst = torch.cat([b.jagged(TARGET_ITEM)[0] for b in train])
        graph = build_transition_graph(src, dst, SEQ_VOCAB.num_items)
    return SequentialModule(
        model,
        graph,
        sparse_optimizer=functools.partial(torch.optim.SGD, lr=0.0),
        dense_optimizer=functools.partial(torch.optim.Adam, lr=DENSE_LR),
        ks=(5, 10),
    )


def seq_case(model: str, sharding: str) -> Case:
    """``sasrec`` or ``mqsa_ted`` with its one table (``item``) sharded ``table_wise`` or ``row_wise``."""
    from recsys.models.mqsa_ted import MQSATED
    from recsys.models.sasrec import SASRec

    model_cls = {"sasrec": SASRec, "mqsa_ted": MQSATED}[model]
    return Case(
        functools.partial(_seq_module, model_cls),
        _seq_batches,
        {"item": sharding},
        {"item": sharding},
        val_metric="val/ndcg@10",
        dense_key="encoders",
        not_compared=(".k.bias",),
    )


CASES: dict[str, Callable[[], Case]] = {
    "dare": dare_case,
    **{
        f"{m}_{short}": functools.partial(seq_case, m, kind)
        for m in ("sasrec", "mqsa_ted")
        for short, kind in (("tw", "table_wise"), ("rw", "row_wise"))
    },
}
# cases trained in one launch (one pair of processes)
GROUPS: dict[str, tuple[str, ...]] = {
    "dare": ("dare",),
    "seqrec": ("sasrec_tw", "sasrec_rw", "mqsa_ted_tw", "mqsa_ted_rw"),
}


# ---- the distributed side (runs in each elastic_launch worker) --------------------------------------
def _worker(case_names: tuple[str, ...], workdir: str) -> dict[str, dict]:
    """One rank: every case of a group, each in its own folder ``workdir/<case>``."""
    return {name: _run_case(name, str(Path(workdir) / name)) for name in case_names}


def _run_case(case_name: str, workdir: str) -> dict:
    """One rank, one case: uninterrupted run (A), then a run resumed from A's epoch-1 checkpoint (B), then
    the forced no-FBGEMM fallback (C)."""
    import pytorch_lightning as pl
    import torch.distributed as dist
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from recsys.compat import in_backward_optimizer_filter
    from recsys.distributed.checkpoint import gather_full_state_dict, load_full_state_dict
    from recsys.distributed.strategy import TorchRecStrategy

    torch.set_num_threads(1)
    case = CASES[case_name]()
    train, val = case.batches()
    init = torch.load(Path(workdir) / "init.pt", weights_only=True)

    class Data(pl.LightningDataModule):
        """Rank r trains on batches r, r + WORLD, ...; validates on val[r::WORLD], where rank 1 also gets
        a repeat of val[0] (as Lightning's sampler pads), which the metric gathering must drop."""

        def train_dataloader(self):
            rank = dist.get_rank()
            return DataLoader(train[rank::WORLD], batch_size=None, collate_fn=identity_collate)

        def val_dataloader(self):
            rank = dist.get_rank()
            mine = val[rank::WORLD] + ([val[0]] if rank == 1 else [])
            return DataLoader(mine, batch_size=None, collate_fn=identity_collate)

    class Record(pl.Callback):
        """Loads the shared initial weights into the shards (after DMP setup) and records step losses."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_fit_start(self, trainer, pl_module) -> None:
            load_full_state_dict(pl_module, init)

        def on_train_start(self, trainer, pl_module) -> None:
            self.wrapper = type(trainer.strategy.model).__name__

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    def fit(ckpt_dir: str, resume: str | None = None):
        module = case.module(torch.device("meta"))
        strategy = TorchRecStrategy(sharding=case.sharding, fused_optimizer=FUSED, process_group_backend="gloo")
        record = Record()
        saver = ModelCheckpoint(
            dirpath=str(Path(workdir) / ckpt_dir),
            filename="epoch{epoch}",
            monitor=None,
            save_top_k=-1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            auto_insert_metric_name=False,
        )
        trainer = pl.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=WORLD,
            max_epochs=EPOCHS,
            logger=False,
            callbacks=[record, saver],
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=Data(), ckpt_path=resume)
        dense = {n: p.detach().clone() for n, p in in_backward_optimizer_filter(strategy.dmp.named_parameters())}
        return trainer, strategy, record.losses, dense, gather_full_state_dict(module)

    trainer, strategy, losses_a, dense_a, full_a = fit("a")
    plan = {
        table: ps.sharding_type for module_plan in strategy.dmp.plan.plan.values() for table, ps in module_plan.items()
    }
    val_metric = float(trainer.callback_metrics[case.val_metric])
    _, _, losses_b, _, full_b = fit("b", resume=str(Path(workdir) / "a" / "epoch0.ckpt"))

    # C: the fallback when FBGEMM kernels do not run on the device (forced here): plain DDP, whole tables
    import recsys.distributed.strategy as strategy_module
    from recsys.distributed.env import FALLBACK

    real_path = strategy_module.sharding_path
    strategy_module.sharding_path = lambda requested, device_type: FALLBACK
    try:
        module = case.module(None)
        strategy = TorchRecStrategy(sharding=case.sharding, fused_optimizer=FUSED, process_group_backend="gloo")
        record = Record()
        trainer = pl.Trainer(
            strategy=strategy,
            accelerator="cpu",
            devices=WORLD,
            max_epochs=1,
            logger=False,
            callbacks=[record],
            use_distributed_sampler=False,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=Data())
        fallback = {
            "path": strategy.sharding_path,
            "wrapper": record.wrapper,
            "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        }
    finally:
        strategy_module.sharding_path = real_path  # the group's next case shards again
    return {
        "losses_a": losses_a,
        "losses_b": losses_b,
        "dense": dense_a,
        "full_a": full_a,
        "full_b": full_b,
        "plan": plan,
        "val_metric": val_metric,
        "fallback": fallback,
    }


def launch(case_names: tuple[str, ...], workdir: Path) -> dict[int, dict[str, dict]]:
    """Rank -> case -> the worker's results (one pair of processes for all ``case_names``)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=WORLD,
        run_id=f"test-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    return elastic_launch(config, entrypoint=_worker)(tuple(case_names), str(workdir))


# ---- the single-process reference ------------------------------------------------------------------
def reference(case: Case, init: dict[str, torch.Tensor], train: list) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Global loss per step and final state of the emulated 2-rank run (module docstring, point 3)."""
    from recsys.training.ranking import split_sparse_dense

    module = case.module(None)
    module.load_state_dict(init)
    module.train()
    tables, dense = split_sparse_dense(module.model)
    adam = torch.optim.Adam(dense, lr=DENSE_LR)
    momentum = [torch.zeros(t.shape[0]) for t in tables]
    losses = []
    for _ in range(EPOCHS):
        for step in range(STEPS_PER_EPOCH):
            micro = train[step * WORLD : (step + 1) * WORLD]
            loss = torch.stack([module.compute_losses(b, module.model(b))["total"] for b in micro]).mean()
            adam.zero_grad(set_to_none=True)
            for t in tables:
                t.grad = None
            loss.backward()
            with torch.no_grad():
                for t, m in zip(tables, momentum):  # FBGEMM EXACT_ROWWISE_ADAGRAD (duplicate ids summed)
                    g = t.grad
                    m += g.pow(2).mean(dim=1)
                    t -= FUSED["lr"] * g / (m.sqrt() + FUSED["eps"]).unsqueeze(1)
            adam.step()
            losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- tests -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launched() -> dict[str, tuple]:
    """Group name -> (workdir, rank -> case -> results), filled on first use of each group."""
    return {}


def _launch_group(group: str, tmp_path_factory) -> tuple:
    workdir = tmp_path_factory.mktemp(f"dist-{group}")
    for name in GROUPS[group]:
        torch.manual_seed(0)
        (workdir / name).mkdir()
        torch.save(
            {k: v.detach().clone() for k, v in CASES[name]().module(None).state_dict().items()},
            workdir / name / "init.pt",
        )
    return workdir, launch(GROUPS[group], workdir)


@pytest.fixture(scope="module", params=[name for names in GROUPS.values() for name in names])
def two_rank_run(request, launched, tmp_path_factory):
    group = next(g for g, names in GROUPS.items() if request.param in names)
    if group not in launched:
        launched[group] = _launch_group(group, tmp_path_factory)
    workdir, results = launched[group]
    init = torch.load(workdir / request.param / "init.pt", weights_only=True)
    return CASES[request.param](), init, {r: results[r][request.param] for r in results}, workdir / request.param


@pytest.mark.slow
def test_plan_uses_the_configured_sharding_types(two_rank_run):
    case, _, results, _ = two_rank_run
    assert results[0]["plan"] == case.expected


@pytest.mark.slow
def test_dense_weights_identical_across_ranks(two_rank_run):
    _, _, results, _ = two_rank_run
    assert results[0]["dense"].keys() == results[1]["dense"].keys() and results[0]["dense"]
    for name, value in results[0]["dense"].items():
        assert torch.equal(value, results[1]["dense"][name]), name


@pytest.mark.slow
def test_loss_curve_and_weights_match_single_process(two_rank_run):
    case, init, results, _ = two_rank_run
    train, _ = case.batches()
    ref_losses, ref_state = reference(case, init, train)
    dist_losses = [float(np.mean([results[r]["losses_a"][i] for r in range(WORLD)])) for i in range(len(ref_losses))]
    np.testing.assert_allclose(dist_losses, ref_losses, rtol=0, atol=LOSS_ATOL)
    assert ref_losses[-1] < ref_losses[0]  # it trains
    full = results[0]["full_a"]
    for name, value in ref_state.items():
        skip = any(part in name for part in case.not_compared) or "running_" in name  # BN stats: per rank
        if value.is_floating_point() and not skip:
            torch.testing.assert_close(full[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.slow
def test_resume_from_sharded_checkpoint_matches_uninterrupted_run(two_rank_run):
    _, _, results, workdir = two_rank_run
    ckpt = workdir / "a" / "epoch0.ckpt"
    assert (ckpt / ".metadata").exists() and len(list(ckpt.glob("*.distcp"))) == WORLD
    assert not list((workdir / "a").glob("*.tmp")) and not list((workdir / "a").glob("*.old"))
    for r in range(WORLD):
        np.testing.assert_allclose(results[r]["losses_b"], results[r]["losses_a"][STEPS_PER_EPOCH:], atol=RESUME_ATOL)
    full_a, full_b = results[0]["full_a"], results[0]["full_b"]
    assert full_a.keys() == full_b.keys()
    for name in full_a:
        torch.testing.assert_close(full_b[name], full_a[name], rtol=0, atol=RESUME_ATOL, msg=name)


@pytest.mark.slow
def test_validation_metrics_are_global(two_rank_run):
    """Both ranks log the metric of the whole validation set (rank 1's padded repeat dropped): the value a single
    process computes with the run's final weights on every validation batch once."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    case, _, results, _ = two_rank_run
    assert results[0]["val_metric"] == results[1]["val_metric"]
    _, val = case.batches()
    module = case.module(None)
    module.load_state_dict(results[0]["full_a"])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    single = trainer.validate(module, DataLoader(val, batch_size=None, collate_fn=identity_collate), verbose=False)
    assert results[0]["val_metric"] == pytest.approx(single[0][case.val_metric], abs=1e-6)


@pytest.mark.slow
def test_fallback_without_fbgemm_is_plain_ddp(two_rank_run):
    case, init, results, _ = two_rank_run
    a, b = results[0]["fallback"], results[1]["fallback"]
    assert a["path"] == "unsharded_fallback" and a["wrapper"] == "DistributedDataParallel"
    for name, value in a["state"].items():
        if "running_" not in name:
            assert torch.equal(value, b["state"][name]), name
    assert any(not torch.equal(a["state"][k], init[k]) for k in init if case.dense_key in k)  # it trained


def test_merge_batches_drops_sampler_repeats():
    a = {"user": [np.array([1, 2]), np.array([3])], "pred/click": [np.array([0.1, 0.2]), np.array([0.3])]}
    b = {"user": [np.array([4]), np.array([1, 2])], "pred/click": [np.array([0.4]), np.array([0.15, 0.25])]}
    merged = merge_batches([a, b], identity=["user"])
    assert [u.tolist() for u in merged["user"]] == [[1, 2], [3], [4]]
    assert np.concatenate(merged["pred/click"]).tolist() == [0.1, 0.2, 0.3, 0.4]


# ---- single-process unit tests: config, validation, checkpoint folders -----------------------------
@pytest.mark.parametrize("model", ["sasrec", "mqsa_ted"])
def test_item_matrix_by_lookup_equals_the_weight(model):
    """The sharded models' path to the tied output layer (the collection's lookup of ids 0..I) gives the
    unsharded path's losses, gradients and rankings (single process, TED on for MQSA-TED)."""
    from recsys.models.sequential import last_position_ranks

    case = CASES[f"{model}_tw"]()
    train, val = case.batches()
    torch.manual_seed(0)
    module = case.module(None)
    results = []
    for by_lookup in (False, True):
        module.model.table_by_lookup = by_lookup
        module.model.train().zero_grad(set_to_none=True)
        out = module.model(train[0])
        assert (out.table is module.model.item_table()) != by_lookup
        losses = module.compute_losses(train[0], out)
        losses["total"].backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
        results.append((losses, grads, last_position_ranks(module.model.eval(), val[0])))
    (losses_w, grads_w, ranks_w), (losses_l, grads_l, ranks_l) = results
    assert set(losses_w) == set(losses_l) >= {"rec", "total"}
    for name, value in losses_w.items():
        assert torch.equal(losses_l[name], value), name
    for name, value in grads_w.items():
        torch.testing.assert_close(grads_l[name], value, rtol=0, atol=1e-7, msg=name)
    assert torch.equal(ranks_l, ranks_w)


def test_dmp_trainer_config_composes_and_builds():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from recsys.distributed.run import register_rank_resolver
    from recsys.distributed.strategy import TorchRecStrategy
    from tests.conftest import REPO

    register_rank_resolver()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "recsys=dare",
                "trainer=dmp",
                "trainer.sharding.item=table_wise",
                "+trainer.sharding.att_item=column_wise",
                "trainer.max_epochs=3",
            ],
        )
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.accelerator == "auto"
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    strategy = trainer.strategy
    assert isinstance(strategy, TorchRecStrategy)
    assert strategy.sharding == {
        "item": "table_wise",
        "category": "table_wise",
        "default": "table_wise",
        "att_item": "column_wise",
    }
    assert strategy.fused_optimizer_config["name"] == "row_wise_adagrad"


def test_fused_adam_on_cpu_names_the_option_and_the_choices():
    from recsys.distributed.optim import parse_fused_optimizer

    with pytest.raises(
        ValueError, match=r"trainer.fused_optimizer.name='adam'.*\['sgd', 'adagrad', 'row_wise_adagrad'\]"
    ):
        parse_fused_optimizer({"name": "adam", "lr": 0.01}, "cpu")
    with pytest.raises(ValueError, match="'momentum'.*not accepted by 'sgd'"):
        parse_fused_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}, "cpu")
    assert parse_fused_optimizer({"name": "adam", "lr": 0.01}, "cuda").kwargs == {"lr": 0.01}


def test_sharding_keys_match_tables_and_fail_clearly(caplog):
    from recsys.distributed.planner import build_constraints

    model = _dare_module(torch.device("meta"))
    got = build_constraints(model, {"item": "row_wise", "category": "table_wise"}, "cpu")
    assert {t: c.sharding_types for t, c in got.items()} == {
        "repr_item": ["row_wise"],
        "repr_category": ["table_wise"],
        "att_item": ["row_wise"],
        "att_category": ["table_wise"],
    }
    assert build_constraints(model, {"item": "row_wise", "att_item": "column_wise"}, "cpu")[
        "att_item"
    ].sharding_types == ["column_wise"]
    with caplog.at_level(logging.WARNING, logger="recsys.distributed.planner"):
        assert build_constraints(model, {"itm": "row_wise", "default": "row_wise"}, "cpu")[
            "att_item"
        ].sharding_types == ["row_wise"]
    assert "['itm'] match no table" in caplog.text
    with pytest.raises(ValueError, match="'item' and 'att' both match table 'att_item'|'att' and 'item' both match"):
        build_constraints(model, {"att": "table_wise", "item": "row_wise"}, "cpu")
    with pytest.raises(ValueError, match="EmbeddingCollection on cpu supports"):
        build_constraints(model, {"default": "data_parallel"}, "cpu")


def test_checkpoint_folder_is_replaced_atomically(tmp_path):
    from recsys.distributed import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = tmp_path / "last.ckpt"
    (tmp_path / "last.ckpt.tmp").mkdir()  # leftover of a crashed save
    ckpt.save_sharded({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 1}, path)
    assert (path / ckpt.TRAINER_STATE).exists() and not (tmp_path / "last.ckpt.tmp").exists()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ckpt.save_sharded({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()], "epoch": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    path.rename(tmp_path / "last.ckpt.old")  # a crash between the two renames leaves only .old
    with torch.no_grad():
        model.weight.zero_()
    loaded = ckpt.load_sharded(path, model.state_dict(), [opt.state_dict()])
    assert loaded["epoch"] == 2 and torch.equal(model.weight, first["weight"] + 1.0)
    assert loaded["optimizer_states"][0]["param_groups"][0]["lr"] == 1e-3
    with pytest.raises(CheckpointError, match="not a sharded checkpoint folder"):
        ckpt.load_sharded(tmp_path / "nothing", model.state_dict())


def test_loading_a_checkpoint_of_another_model_names_the_folder(tmp_path):
    from recsys.distributed import checkpoint as ckpt

    ckpt.save_sharded({"state_dict": torch.nn.Linear(3, 2).state_dict()}, tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="a.ckpt: cannot load this sharded checkpoint"):
        ckpt.load_sharded(tmp_path / "a.ckpt", torch.nn.Linear(4, 2).state_dict())
