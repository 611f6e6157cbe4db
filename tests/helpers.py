"""Small random CTR tables for unit tests (the realistic synthetic data lives in recsys.data.synthetic)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from recsys.data.schema import SAMPLE_SCHEMA, Vocab


def random_samples(
    rows: int = 64, vocab: Vocab | None = None, max_len: int = 12, seed: int = 0, signal: bool = True
) -> pl.DataFrame:
    """A CTR-sample frame in the documented schema; with ``signal`` the label is 1 iff the target's
    category appears in the history, so a model can learn it."""
    vocab = vocab or Vocab(20, 50, 6)
    rng = np.random.default_rng(seed)
    item_cat = rng.integers(1, vocab.num_categories + 1, size=vocab.num_items + 1)
    lengths = rng.integers(1, max_len + 1, size=rows)
    hist_item = [rng.integers(1, vocab.num_items + 1, size=n).tolist() for n in lengths]
    hist_cat = [item_cat[h].tolist() for h in hist_item]
    item = rng.integers(1, vocab.num_items + 1, size=rows)
    category = item_cat[item]
    if signal:
        label = np.array([int(c in set(h)) for c, h in zip(category, hist_cat)], dtype=np.int8)
    else:
        label = rng.integers(0, 2, size=rows).astype(np.int8)
    frame = pl.DataFrame(
        {
            "user": rng.integers(1, vocab.num_users + 1, size=rows),
            "item": item,
            "category": category,
            "label": label,
            "timestamp": np.arange(rows, dtype=np.int64),
            "hist_item": hist_item,
            "hist_cat": hist_cat,
        }
    )
    return frame.cast(dict(SAMPLE_SCHEMA))


def fit_one_batch(model, tasks, batch, steps: int, lr: float = 0.01) -> tuple[float, float]:
    """Train ``model`` (a ``RankingModel``) on one batch with ``RankingModule``'s losses and Adam for ``steps``
    steps; returns (first loss, last loss) so a test can assert that it learns."""
    import torch

    from recsys.training.ranking import RankingModule

    adam = lambda p: torch.optim.Adam(p, lr=lr)  # noqa: E731
    module = RankingModule(model, tasks, adam, adam)
    opts = module.configure_optimizers()
    model.train()
    losses = []
    for _ in range(steps):
        loss = module.compute_losses(batch, model(batch))["total"]
        losses.append(loss.item())
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        for opt in opts:
            opt.step()
    return losses[0], losses[-1]


def direct_and_training_forward(model, batch, monkeypatch):
    """(direct eval path output, training-order forward output) of a target-attention ``model`` in eval mode,
    with the direct path's slicing exercised (several slices, the last one partial)."""
    from recsys.models.target_attention import TargetAttentionBackbone

    model.backbone.eval_chunk = 64
    assert model.backbone._direct_eval()
    with torch.no_grad():
        fast = model(batch)
        monkeypatch.setattr(TargetAttentionBackbone, "_direct_eval", lambda self: False)
        slow = model(batch)
    return fast, slow


def quiet_trainer(root, **kwargs):
    """A Lightning ``Trainer`` writing under ``root`` with no checkpointing, progress bar or model summary."""
    import pytorch_lightning as pl

    return pl.Trainer(
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kwargs,
    )


def fit_tiny_ranking(root, callbacks, logger=False, max_steps: int = 7, **trainer_kwargs):
    """Seven CPU steps of a small TWIN-style ranking model on 64 random samples (batches of 8), with
    ``callbacks`` (and other ``Trainer`` arguments); returns the trainer."""
    from mtl.single import SingleTower
    from mtl.spec import TaskSpec
    from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader
    from recsys.models.ranking import RankingModel
    from recsys.models.target_attention import TargetAttentionBackbone
    from recsys.training.ranking import RankingModule

    vocab, tasks = Vocab(20, 200, 6), [TaskSpec("click")]
    table = CTRTable.from_frame(random_samples(rows=64, vocab=vocab, seed=5), "mem", {"click": "label"}, vocab)
    backbone = TargetAttentionBackbone(vocab, 12, embedding_dim=4, top_k=3)
    model = RankingModel(backbone, SingleTower(backbone.output_dim, tasks, hidden=(8,)))
    module = RankingModule(model, tasks, lambda p: torch.optim.Adam(p), lambda p: torch.optim.Adam(p))
    trainer = quiet_trainer(
        root, accelerator="cpu", max_steps=max_steps, logger=logger, callbacks=callbacks, **trainer_kwargs
    )
    trainer.fit(module, train_dataloaders=batch_loader(BatchedCTRDataset(table), 64, 8, shuffle=False, seed=0))
    return trainer


#: overrides that make a synthetic-data benchmark run tiny (60 users, CPU)
TINY_SYNTHETIC = ["data.source.generator.num_users=60", "data.batch_size=256", "trainer=cpu"]


def run_benchmark(tmp_path, module, *args):
    """``python -m <module> --results <tmp>/results <args>`` with ``RECSYS_ROOT`` in ``tmp_path``; the rows of its
    ``<--tag>.jsonl``."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "RECSYS_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", module, "--results", str(tmp_path / "results"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (tmp_path / "results" / f"{args[args.index('--tag') + 1]}.jsonl").open()]
