"""Training losses: epoch means summed on the device, ``self.log`` only on the steps the logger writes.

The epoch mean logged (``train/loss_epoch``, ``train/<loss>``) is the batch-size-weighted mean of the epoch's step
losses, also for an epoch cut by ``max_steps``; ``train/loss_step`` reaches the logger at Lightning's
``log_every_n_steps`` cadence; and no step in between calls ``self.log`` (each call was host work every step)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger

from recsys.training.loss_means import LossMeans
from tests.helpers import fit_tiny_ranking


def test_loss_means_are_batch_size_weighted_and_reset_on_pop():
    means = LossMeans()
    means.add({"total": torch.tensor(1.0), "task/a": torch.tensor(3.0)}, rows=1)
    means.add({"total": torch.tensor(4.0), "task/a": torch.tensor(0.0)}, rows=3)
    out = means.pop()
    assert list(out) == ["total", "task/a"]
    torch.testing.assert_close(out["total"], torch.tensor((1.0 + 12.0) / 4))
    torch.testing.assert_close(out["task/a"], torch.tensor(3.0 / 4))
    assert means.pop() == {} and means.rows == 0


def test_a_step_with_other_losses_is_a_programming_error():
    means = LossMeans()
    means.add({"total": torch.tensor(1.0)}, rows=2)
    with pytest.raises(RuntimeError, match=r"a step's losses \('total', 'l2'\) differ from the epoch's \('total',\)"):
        means.add({"total": torch.tensor(1.0), "l2": torch.tensor(0.1)}, rows=2)


class Recorder(Logger):
    """Every ``log_metrics`` call: (step, metrics)."""

    name, version = "recorder", "0"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


class StepLosses(pl.Callback):
    """The loss each training step returned, and the module's ``self.log`` calls per step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.log_calls: list[tuple[int, str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        log = pl_module.log

        def counting(name, *args, **kwargs):
            self.log_calls.append((trainer.global_step, name))
            return log(name, *args, **kwargs)

        pl_module.log = counting

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def test_epoch_means_step_cadence_and_no_log_call_between_logger_steps(tmp_path):
    recorder, steps = Recorder(), StepLosses()
    # 64 rows in batches of 8: 8 steps an epoch; 11 steps = one whole epoch and one cut by max_steps
    trainer = fit_tiny_ranking(tmp_path, [steps], logger=recorder, max_steps=11, log_every_n_steps=3)
    assert trainer.global_step == 11 and len(steps.losses) == 11
    epochs = [m for _, m in recorder.calls if "train/loss_epoch" in m]
    assert len(epochs) == 2
    for logged, losses in zip(epochs, (steps.losses[:8], steps.losses[8:]), strict=True):
        assert logged["train/loss_epoch"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        assert "train/task/click" in logged  # every other loss's epoch mean beside it
    step_logs = [step for step, m in recorder.calls if "train/loss_step" in m]
    assert step_logs and all((step + 1) % 3 == 0 for step in step_logs[:-1])
    # self.log ran on the logger's steps and at the two epoch ends, never on the steps between
    called = {step for step, name in steps.log_calls if name == "train/loss_step"}  # global_step after the step
    assert {step - 1 for step in called} == set(step_logs)
    assert {step for step, _ in steps.log_calls} <= called | {8, 11}
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(epochs[-1]["train/loss_epoch"], rel=1e-6)
