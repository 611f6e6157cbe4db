"""A profile of a few training steps inside the real run (``pipelines.train``), as a text file beside the run.

    python -m pipelines.train +benchmark=dare_scale trainer=gpu +callbacks.step_profile._target_=\
recsys.tracking.step_profile.StepProfile

Profiles optimiser steps ``[start_step, start_step + steps)`` with ``torch.profiler`` (CPU, and CUDA where the
run is on a GPU) and writes ``<output_dir>/step_profile.txt`` (and logs it to MLflow when the run has an MLflow
logger): a summary — wall time per step, device busy time per step (sum of kernel and copy times), device
kernels and host operator calls per step — then the operators that take most device time (or host time on the
CPU) with their share of the profiled steps, and the named host ranges (the loader's next batch, optimiser steps,
the graph's replay) with their share of the wall time. ``busy / wall`` near 1 means the step is bound by device
work; far below 1, by the host (Python, launches, the loader) — the question the summary is there to answer, and
the host ranges say which part of the host.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _device_time(event: Any) -> float:
    """Self device time (µs) of a profiler aggregate, across torch versions' attribute names."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def _on_device(event: Any) -> bool:
    """A kernel or copy on the GPU's timeline — not a ``record_function`` span mirrored there (``Optimizer.step#...``
    spans cover their kernels, so counting them too would count that time twice)."""
    return getattr(event, "device_type", None) == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


def _host_span(event: Any) -> bool:
    """A named range on the host timeline (``record_function``): the loader's ``__next__``
    (``enumerate(DataLoader)#...``), ``Optimizer.step#...``, the graphed step's ``graphed_step.replay``."""
    return getattr(event, "device_type", None) == DeviceType.CPU and bool(getattr(event, "is_user_annotation", False))


def summarise(prof: profile, steps: int, wall_s: float, on_device: bool, top: int = 20) -> str:
    """The text of ``step_profile.txt`` from a finished profiler over ``steps`` steps taking ``wall_s``."""
    averages = prof.key_averages()
    host_calls = sum(e.count for e in averages if _device_time(e) == 0 or not on_device)
    lines = [f"steps profiled: {steps}", f"wall per step: {1000 * wall_s / steps:.3f} ms"]
    if on_device:
        kernels = [e for e in prof.events() if _on_device(e)]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        lines += [
            f"device busy per step: {busy_us / 1000 / steps:.3f} ms (busy / wall = {busy_us / 1e6 / wall_s:.2f})",
            f"device kernels and copies per step: {len(kernels) / steps:.0f}",
        ]
    lines.append(f"host operator calls per step: {host_calls / steps:.0f}")
    if on_device:  # kernels and copies only (an operator's device time is its kernels': no double count)
        key, pool = _device_time, [e for e in averages if _on_device(e)]
    else:
        key, pool = (lambda e: float(e.self_cpu_time_total)), list(averages)
    ranked = sorted(pool, key=key, reverse=True)
    total = sum(key(e) for e in pool) or 1.0
    what = "device kernels and copies by time" if on_device else "host operators by self time"
    lines += ["", f"top {top} {what} (share of the profiled steps):"]
    for e in ranked[:top]:
        share, ms = 100 * key(e) / total, key(e) / 1000 / steps
        lines.append(f"{share:6.2f} %  {ms:8.3f} ms/step  {e.count / steps:7.1f} calls/step  {e.key[:160]}")
    spans = sorted((e for e in averages if _host_span(e)), key=lambda e: e.cpu_time_total, reverse=True)
    lines += ["", "host spans by wall time (named ranges on the host, nested ones included in their parents):"]
    for e in spans[:8]:
        share, ms = 100 * e.cpu_time_total / 1e6 / wall_s, e.cpu_time_total / 1000 / steps
        lines.append(f"{share:6.2f} %  {ms:8.3f} ms/step  {e.count / steps:7.1f} calls/step  {e.key[:160]}")
    if on_device:  # which calls of an operator cost the time: its rows by input shapes
        by_shape = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
        lines += ["", "top 10 operators by self device time, by input shapes:"]
        for e in sorted(by_shape, key=_device_time, reverse=True)[:10]:
            ms = _device_time(e) / 1000 / steps
            lines.append(f"{ms:8.3f} ms/step  {e.count / steps:5.1f} calls/step  {e.key}  {e.input_shapes}")
    return "\n".join(lines) + "\n"


class StepProfile(pl.Callback):
    """Profile training steps ``[start_step, start_step + steps)`` (counted from 1, after any warm-up)."""

    def __init__(self, start_step: int = 30, steps: int = 10, output_dir: str | None = None) -> None:
        if start_step < 1 or steps < 1:
            raise ValueError(f"need start_step >= 1 and steps >= 1, got {start_step}, {steps}")
        self.start_step, self.steps, self.output_dir = start_step, steps, output_dir
        self.seen = 0
        self._prof: profile | None = None
        self._start = 0.0
        self.report: str | None = None

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if self.seen + 1 == self.start_step and self._prof is None and self.report is None:
            activities = [ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._prof = profile(activities=activities, record_shapes=True)
            self._start = self._sync(pl_module)
            self._prof.__enter__()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int):
        self.seen += 1
        if self._prof is not None and self.seen == self.start_step + self.steps - 1:
            wall = self._sync(pl_module) - self._start
            self._prof.__exit__(None, None, None)
            self.report = summarise(self._prof, self.steps, wall, pl_module.device.type == "cuda")
            self._prof = None
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        folder = Path(self.output_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "step_profile.txt"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.report)
        tmp.replace(path)
        for logger in trainer.loggers:
            experiment, run_id = getattr(logger, "experiment", None), getattr(logger, "run_id", None)
            if run_id is not None and hasattr(experiment, "log_artifact"):
                experiment.log_artifact(run_id, str(path))
