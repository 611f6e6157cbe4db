"""The step profiler writes its summary for exactly the steps it was asked for (CPU; the CUDA columns run on the
GPU machine through benchmarks/gpu_pipeline.py)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.tracking.step_profile import StepProfile
from recsys.training.ranking import RankingModule
from tests.helpers import random_samples

VOCAB = Vocab(20, 200, 6)
TASKS = [TaskSpec("click")]


def test_step_profile_summarises_the_requested_steps(tmp_path):
    table = CTRTable.from_frame(random_samples(rows=64, vocab=VOCAB, seed=5), "mem", {"click": "label"}, VOCAB)
    backbone = TargetAttentionBackbone(VOCAB, 12, embedding_dim=4, top_k=3)
    model = RankingModel(backbone, SingleTower(backbone.output_dim, TASKS, hidden=(8,)))
    module = RankingModule(model, TASKS, lambda p: torch.optim.Adam(p), lambda p: torch.optim.Adam(p))
    profiler = StepProfile(start_step=3, steps=2, output_dir=str(tmp_path / "run"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=7,
        logger=False,
        callbacks=[profiler],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=batch_loader(BatchedCTRDataset(table), 64, 8, shuffle=False, seed=0))
    text = (tmp_path / "run" / "step_profile.txt").read_text()
    assert text.startswith("steps profiled: 2\n")
    assert "wall per step:" in text and "host operator calls per step:" in text
    ranked = [line for line in text.splitlines() if " ms/step " in line]
    assert 0 < len(ranked) <= 20
    # the top rows are the model's own operators, with a share each and shares in descending order
    shares = [float(line.split("%")[0]) for line in ranked]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    assert profiler.report == text
