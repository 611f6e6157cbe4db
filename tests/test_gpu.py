"""CUDA equals CPU: every backbone (configs/recsys/*) and tower (configs/mtl/*), the DARE/TWIN eval path, sequential
full ranking, and a checkpoint written on CUDA resumed on CPU.

Marked ``gpu``: skipped where ``torch.cuda.is_available()`` is False (tests/conftest.py), run with ``pytest -m gpu``.
They hold with or without FBGEMM's CUDA kernels (with ``fbgemm-gpu-cpu`` on a CUDA torch the jagged ops take the
torch path; docs/gpu.md).

Tolerance (float32, TF32 off, same initial weights, same batch, same seed): outputs and losses
``|cuda - cpu| <= 1e-5 + 1e-4 |cpu|``; gradients ``<= 1e-5 + 1e-3 |cpu|`` (summation order differs between the
devices and embedding-row gradients are sums over the batch); top-k indices identical.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import polars
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from mtl.spec import TaskSpec
from recsys.data.ctr_table import CTRTable
from recsys.data.schema import Vocab
from recsys.data.seq_batch import SeqBatch, make_seq_kjt
from recsys.data.tabular import TabularTable
from recsys.data.transitions import build_transition_graph
from recsys.tracking.resume import check_checkpoint
from tests.conftest import REPO
from tests.helpers import direct_and_training_forward, random_samples

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
OUT_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = dict(rtol=1e-3, atol=1e-5)

CTR_VOCAB = Vocab(20, 500, 6)
CTR_MAX_LEN = 12
TASKS = [TaskSpec("click", label="label"), TaskSpec("like", label="like")]
SEQ_VOCAB = Vocab(64, 200, 0)
SEQ_MAX_LEN = 20
BACKBONES = ["dare", "din", "fields", "mqsa_ted", "sasrec", "twin", "twin_4e", "twin_proj"]
TOWERS = ["esmm", "mmoe", "ple", "shared_bottom", "single", "switch", "taskexpert"]
DIRECT_EVAL = ["dare", "twin", "twin_4e"]  # backbones with the direct (no token tensor) eval path


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would make CUDA matmuls differ from CPU by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------- data + builders
def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def ctr_data() -> tuple[SimpleNamespace, object]:
    frame = random_samples(rows=256, vocab=CTR_VOCAB, max_len=CTR_MAX_LEN, seed=2)
    like = np.random.default_rng(3).integers(0, 2, frame.height).astype(np.int8)
    frame = frame.with_columns(polars.Series("like", like))
    labels = {t.name: t.label for t in TASKS}
    table = CTRTable.from_frame(frame, "mem", labels, CTR_VOCAB, binary_labels=("label", "like"))
    data = SimpleNamespace(backbone_inputs=lambda: {"vocab": CTR_VOCAB, "max_len": CTR_MAX_LEN}, tasks=TASKS)
    return data, table


def tabular_data() -> tuple[SimpleNamespace, object]:
    rng = np.random.default_rng(4)
    categorical, n = {"a": 11, "b": 7, "c": 30}, 256
    ids = np.stack([rng.integers(0, rows, n) for rows in categorical.values()], axis=1)
    labels = {t.name: rng.integers(0, 2, n).astype(np.float32) for t in TASKS}
    table = TabularTable(list(categorical), ids, rng.standard_normal((n, 3)).astype(np.float32), labels)
    inputs = {"categorical": categorical, "dense": ["x0", "x1", "x2"]}
    return SimpleNamespace(backbone_inputs=lambda: dict(inputs), tasks=TASKS), table


def _pack(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([i for r in rows for i in r], dtype=torch.long)
    return values, torch.tensor([len(r) for r in rows], dtype=torch.long)


def seq_data() -> tuple[SimpleNamespace, SeqBatch, SeqBatch]:
    """64 users' random sequences: a training batch (next item at every position), an evaluation batch
    (input = all but the last item, target = the last, the input's items excluded), and the TED graph."""
    rng = np.random.default_rng(5)
    seqs = [rng.integers(1, SEQ_VOCAB.num_items + 1, rng.integers(3, SEQ_MAX_LEN + 2)).tolist() for _ in range(64)]
    users = torch.arange(len(seqs))
    inputs = [s[:-1][-SEQ_MAX_LEN:] for s in seqs]
    nexts = [s[1:][-SEQ_MAX_LEN:] for s in seqs]
    train = SeqBatch(make_seq_kjt(_pack(inputs), _pack(nexts), _pack([[] for _ in seqs])), users)
    # evaluation target: an item outside the (excluded) input, so every rank is finite
    targets = [[int(rng.choice(np.setdiff1d(np.arange(1, SEQ_VOCAB.num_items + 1), s)))] for s in inputs]
    evaluate = SeqBatch(make_seq_kjt(_pack(inputs), _pack(targets), _pack(inputs)), users)
    src = torch.tensor([a for s in inputs for a in s[:-1]])
    dst = torch.tensor([b for s in inputs for b in s[1:]])
    graph = build_transition_graph(src, dst, SEQ_VOCAB.num_items)
    data = SimpleNamespace(
        backbone_inputs=lambda: {"vocab": SEQ_VOCAB, "max_len": SEQ_MAX_LEN},
        tasks=[],
        transition_graph=lambda span=1: graph,
    )
    return data, train, evaluate


def build_module(data: SimpleNamespace, *overrides: str):
    """What ``pipelines.train.build`` assembles, on CPU, from the configs, for an in-memory ``data``."""
    cfg = _compose(*overrides)
    torch.manual_seed(0)
    return instantiate(cfg.objective)(
        datamodule=data,
        backbone=instantiate(cfg.recsys),
        tower=instantiate(cfg.mtl) if cfg.get("mtl") is not None else None,
        init_std=cfg.model.init_std,
    )


def _case(recsys: str, mtl: str | None = None):
    """(module on CPU, training batch) for ``recsys=<recsys>`` (+ ``mtl=<mtl>``), dropout off."""
    overrides = [f"recsys={recsys}"] + ([f"mtl={mtl}"] if mtl else [])
    if recsys in ("sasrec", "mqsa_ted"):
        data, batch, _ = seq_data()
        return build_module(data, *overrides, "recsys.dropout=0", "recsys.dim=16"), batch
    if recsys == "fields":
        data, table = tabular_data()
    else:
        data, table = ctr_data()
    return build_module(data, *overrides), table.batch(np.arange(len(table)))


def train_step(module, batch, device: torch.device):
    """One training forward + backward on ``device`` (same seed): losses, gradients and extras, on CPU."""
    module, batch = module.to(device).train(), batch.to(device)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = module.model(batch)
    losses = module.compute_losses(batch, out)
    losses["total"].backward()
    grads = {n: p.grad.detach().cpu() for n, p in module.named_parameters() if p.grad is not None}
    extras = {k: v.detach().cpu() for k, v in (getattr(out, "extras", None) or {}).items() if torch.is_tensor(v)}
    return {k: v.detach().cpu() for k, v in losses.items()}, grads, extras


def ties_only(cpu_index: torch.Tensor, gpu_index: torch.Tensor, weights: torch.Tensor, tol: float = 1e-6) -> bool:
    """Top-K indices ``[B, K]`` that differ only where the selection was a tie: each differing slot's attention
    weight is shared by another slot of its row (tied scores) or is 0 (a masked / padded slot)."""
    for row, col in (cpu_index != gpu_index).nonzero().tolist():
        w = weights[row]
        tied = int(((w - w[col]).abs() <= tol).sum()) > 1
        if not tied and float(w[col].abs()) > tol:
            return False
    return True


def assert_same_step(module, batch) -> None:
    gpu = copy.deepcopy(module)
    cpu_losses, cpu_grads, cpu_extras = train_step(module, batch, CPU)
    gpu_losses, gpu_grads, gpu_extras = train_step(gpu, batch, CUDA)
    assert set(gpu_losses) == set(cpu_losses) and set(gpu_grads) == set(cpu_grads)
    assert cpu_grads, "no parameter received a gradient"
    for name, value in cpu_losses.items():
        torch.testing.assert_close(gpu_losses[name], value, **OUT_TOL, msg=lambda m, n=name: f"loss {n}: {m}")
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, **GRAD_TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    for name, value in cpu_extras.items():
        if name == "topk_index":  # equal up to the order of tied scores (checked on the attention weights)
            assert ties_only(value, gpu_extras[name], cpu_extras["attention"]), (value, gpu_extras[name])
        elif value.dtype in (torch.int64, torch.int32, torch.bool):
            assert torch.equal(gpu_extras[name], value), name
        else:
            torch.testing.assert_close(gpu_extras[name], value, **OUT_TOL, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("recsys", BACKBONES)
def test_backbone_forward_and_backward_on_cuda_equal_cpu(recsys):
    module, batch = _case(recsys)
    assert_same_step(module, batch)


@pytest.mark.parametrize("mtl", TOWERS)
def test_tower_forward_and_backward_on_cuda_equal_cpu(mtl):
    module, batch = _case("din", mtl)
    assert_same_step(module, batch)


@pytest.mark.parametrize("recsys", DIRECT_EVAL)
def test_direct_eval_path_equals_the_training_forward_on_cuda(recsys, monkeypatch):
    module, batch = _case(recsys)
    model, batch = module.model.to(CUDA).eval(), batch.to(CUDA)
    fast, slow = direct_and_training_forward(model, batch, monkeypatch)
    for task in fast.logits:
        torch.testing.assert_close(fast.logits[task], slow.logits[task], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.extras["attention"], slow.extras["attention"], rtol=0, atol=1e-5)
    assert torch.equal(fast.extras["topk_index"], slow.extras["topk_index"])


@pytest.mark.parametrize("recsys", ["sasrec", "mqsa_ted"])
def test_sequential_full_ranking_metrics_equal_on_cpu_and_cuda(recsys):
    data, _, evaluate = seq_data()
    module = build_module(data, f"recsys={recsys}", "recsys.dim=16").eval()
    gpu = copy.deepcopy(module).to(CUDA)
    ranks, metrics = {}, {}
    for name, mod, device in (("cpu", module, CPU), ("cuda", gpu, CUDA)):
        with torch.no_grad():
            mod._rank(evaluate.to(device))
        ranks[name] = np.concatenate(mod._eval["rank"])
        metrics[name] = mod.evaluation_metrics("test")
    assert len(ranks["cpu"]) == evaluate.batch_size and set(metrics["cpu"]) == set(metrics["cuda"])
    assert np.isfinite(ranks["cpu"]).all() and np.isfinite(ranks["cuda"]).all()
    # ranks count items scored above the target: identical unless two scores tie to float rounding, which may
    # move one user by one place (changes any metric by at most 1/64)
    differ = ranks["cpu"] != ranks["cuda"]
    assert differ.sum() <= 1 and np.abs(ranks["cpu"] - ranks["cuda"]).max() <= 1, (ranks["cpu"], ranks["cuda"])
    for key, value in metrics["cpu"].items():
        tol = 1e-6 if not differ.any() else 1.0 / evaluate.batch_size
        assert abs(metrics["cuda"][key] - value) <= tol, (key, value, metrics["cuda"][key])


def test_checkpoint_written_on_cuda_resumes_on_cpu(tmp_path):
    data, table = ctr_data()
    module = build_module(data, "recsys=dare")
    batches = [table.batch(np.arange(i, min(i + 64, len(table)))) for i in range(0, len(table), 64)]
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    common = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    common.update(limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path), max_epochs=10)

    class Where(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            self.device = next(pl_module.parameters()).device.type

    where = Where()
    gpu_trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=3, callbacks=[where], **common)
    gpu_trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "cuda.ckpt"
    gpu_trainer.save_checkpoint(path)
    trained = {k: v.detach().cpu().clone() for k, v in module.model.state_dict().items()}
    assert where.device == "cuda"  # trained on the GPU (Lightning moves the module back to the CPU at the end)

    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    fresh = build_module(data, "recsys=dare")
    check_checkpoint(str(path), fresh)  # the pipeline's pre-resume check accepts it

    class Loaded(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            self.devices = {p.device.type for p in pl_module.parameters()}
            self.optimizer_devices = {
                v.device.type
                for opt in trainer.optimizers
                for s in opt.state.values()
                for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0
            }

    seen = Loaded()
    cpu_trainer = pl.Trainer(accelerator="cpu", max_steps=5, callbacks=[seen], **common)
    cpu_trainer.fit(fresh, train_dataloaders=loader, ckpt_path=str(path), weights_only=True)
    assert seen.devices == {"cpu"} and seen.optimizer_devices == {"cpu"}
    for key, value in trained.items():
        assert torch.equal(seen.weights[key], value), key
    assert cpu_trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
