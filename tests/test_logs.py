"""Logs a person can read: third-party noise filtered, no limit_* announcements, plain progress lines in a file."""

from __future__ import annotations

import io
import logging
import warnings

import pytorch_lightning as pl
import torch
import yaml

from recsys.tracking.progress import LineProgress, wants_line_progress
from recsys.tracking.quiet import quiet_third_party_logs
from tests.conftest import REPO


def test_noise_is_dropped_and_the_rest_kept(caplog):
    quiet_third_party_logs()
    with caplog.at_level(logging.INFO):
        logging.info("Successfully loaded: 'fbgemm_gpu_tbe_training_backward.so'")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("💡 Tip: try installing litlogger")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False")
        logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both ...")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party_logs()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_trainer_config_leaves_batch_limits_to_lightning(caplog):
    config = yaml.safe_load((REPO / "configs" / "trainer" / "default.yaml").read_text())
    limits = {k: v for k, v in config.items() if k.startswith("limit_") or k == "val_check_interval"}
    assert limits and all(v is None for v in limits.values())
    with caplog.at_level(logging.INFO):
        pl.Trainer(**limits, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not [r for r in caplog.records if "was configured so" in r.getMessage()]


def test_line_progress_prints_plain_lines(tmp_path):
    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/loss", loss, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    out = io.StringIO()
    assert wants_line_progress(out) and not wants_line_progress(type("T", (), {"isatty": lambda self: True})())
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[LineProgress(every_percent=25, stream=out)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 2)), batch_size=4)
    trainer.fit(Tiny(), data)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and all(len(line) < 200 for line in lines)
    assert lines[:3] == ["epoch 1/2: 30% (3/10 batches, 0 s)", "epoch 1/2: 50% (5/10 batches, 0 s)", lines[2]]
    assert sum(line.startswith("epoch 1/2 done in") for line in lines) == 1
    assert any(line.startswith("epoch 2/2 done in") and "train/loss=" in line for line in lines)
