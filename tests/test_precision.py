"""Mixed precision through Lightning under manual optimisation: ``trainer.precision=bf16-mixed`` runs the
forward under autocast (bf16 matmuls), while tables, dense weights and optimiser state stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.ops.sparse_update import LazyAdam, RowWiseAdagrad
from recsys.training.ranking import RankingModule
from tests.helpers import fit_tiny_ranking, random_samples

VOCAB = Vocab(20, 200, 6)
TASKS = [TaskSpec("click")]


@pytest.mark.parametrize(
    "precision, sparse_optimizer, sparse_grad",
    [
        ("bf16-mixed", lambda p: torch.optim.Adam(p, lr=0.01), False),
        ("bf16-mixed", lambda p: RowWiseAdagrad(p, lr=0.05), True),
        ("bf16-mixed", lambda p: LazyAdam(p, lr=0.01), True),
        ("32-true", lambda p: torch.optim.Adam(p, lr=0.01), False),
    ],
)
def test_precision_casts_the_forward_only(tmp_path, precision, sparse_optimizer, sparse_grad):
    table = CTRTable.from_frame(random_samples(rows=64, vocab=VOCAB, seed=4), "mem", {"click": "label"}, VOCAB)
    torch.manual_seed(0)
    backbone = TargetAttentionBackbone(
        VOCAB, 12, embedding_dim=8, attention_dim=4, decoupled=True, top_k=4, sparse_grad=sparse_grad
    )
    model = RankingModel(backbone, SingleTower(backbone.output_dim, TASKS, hidden=(16,)))
    module = RankingModule(model, TASKS, sparse_optimizer, lambda p: torch.optim.Adam(p, lr=0.01))
    seen: list[torch.dtype] = []
    model.tower.register_forward_hook(lambda mod, args, out: seen.append(next(iter(out.logits.values())).dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = batch_loader(BatchedCTRDataset(table, pad_to=12), len(table), 16, shuffle=True, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=loader)
    assert seen and set(seen) == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "tables" in n)
    for opt in trainer.optimizers:
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    assert value.dtype == torch.float32
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))


class _Recorder(pl.loggers.Logger):
    name, version = "recorder", "0"

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_throughput_callback_logs_windows_and_the_steady_rate(tmp_path):
    from recsys.tracking.throughput import Throughput

    recorder, meter = _Recorder(), Throughput(every_n_steps=2, warmup_steps=1)
    trainer = fit_tiny_ranking(tmp_path, [meter], logger=recorder)
    windows = [m for _, m in recorder.metrics if "perf/samples_per_s" in m]
    assert len(windows) == 3 and all(m["perf/samples_per_s"] > 0 and m["perf/step_ms"] > 0 for m in windows)
    assert meter.samples == 6 * 8  # the 6 steps after the warm-up step
    steady = [m["perf/steady_samples_per_s"] for _, m in recorder.metrics if "perf/steady_samples_per_s" in m]
    assert steady == [meter.steady] and meter.steady > 0
    assert meter.window_rates == [m["perf/samples_per_s"] for m in windows]
    key = "perf/median_window_samples_per_s"
    median = [m[key] for _, m in recorder.metrics if key in m]
    assert median == [sorted(meter.window_rates)[1]]  # the middle one of the 3 windows
    assert float(trainer.callback_metrics[key]) == pytest.approx(median[0])
    # no bar, no per-step progress-bar metrics (Lightning would read the loss to the host every step)
    assert "train/loss" not in trainer.progress_bar_metrics and "train/loss" in trainer.callback_metrics
