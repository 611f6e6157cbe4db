"""What every training LightningModule shares: a *sparse* optimiser (TorchRec embedding tables) and a *dense* one
(everything else) under manual optimisation, so TorchRec's DistributedModelParallel can replace the sparse
one with its fused optimiser (fused optimisers update the tables inside the backward and ignore Lightning's closure,
so automatic optimisation cannot drive them; docs/distributed.md).

:class:`SparseDenseModule` owns ``configure_optimizers`` (plain or through
:meth:`~recsys.distributed.strategy.TorchRecStrategy.sharded_optimizers` under ``trainer=dmp``) and the
training step; a task supplies :meth:`SparseDenseModule.compute_losses`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from recsys.compat import EmbeddingBagCollection, EmbeddingCollection, ShardedModule
from recsys.training.cuda_graph import GraphedStep
from recsys.training.loss_means import LossMeans

log = logging.getLogger(__name__)

# the module's non-blocking batch copy below is meant to replace the datamodule's default
warnings.filterwarnings("ignore", message="You have overridden `transfer_batch_to_device`")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def split_sparse_dense(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameters of TorchRec embedding collections, sharded or not (sparse), and all others (dense),
    each in ``module.parameters()`` order."""
    sparse: list[nn.Parameter] = []
    dense: list[nn.Parameter] = []
    seen: set[int] = set()

    def visit(sub: nn.Module, in_table: bool) -> None:
        in_table = in_table or isinstance(sub, (EmbeddingCollection, EmbeddingBagCollection, ShardedModule))
        for p in sub.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (sparse if in_table else dense).append(p)
        for child in sub.children():
            visit(child, in_table)

    visit(module, False)
    return sparse, dense


@contextmanager
def uncounted(optimizer: Any) -> Iterator[None]:
    """Step ``optimizer`` without advancing Lightning's step counter.

    Under manual optimisation Lightning counts every ``LightningOptimizer.step()`` as one global step, so two
    optimisers would make ``trainer.global_step`` advance twice per batch (``max_steps`` and every step-based
    interval off by 2x). Lightning injects the counting into each ``LightningOptimizer`` as its
    ``_on_before_step`` / ``_on_after_step`` hooks for the duration of a batch; swapping them for no-ops around
    all but one ``step()`` keeps one step = one batch. The step itself still goes through the strategy and the
    precision plugin (gradient scaling, DMP).
    """
    before, after = getattr(optimizer, "_on_before_step", None), getattr(optimizer, "_on_after_step", None)
    if before is None or after is None:  # a plain torch optimiser (no trainer): nothing is counted
        yield
        return
    optimizer._on_before_step = optimizer._on_after_step = _do_nothing
    try:
        yield
    finally:
        optimizer._on_before_step, optimizer._on_after_step = before, after


def _do_nothing() -> None:
    return None


def count_step(optimizer: Any) -> None:
    """Advance Lightning's step counter by one without stepping ``optimizer`` (the counting hooks of
    :func:`uncounted`, called directly): for steps whose optimisers ran inside a replayed CUDA graph."""
    before, after = getattr(optimizer, "_on_before_step", None), getattr(optimizer, "_on_after_step", None)
    if before is not None and after is not None:
        before()
        after()


class SparseDenseModule(pl.LightningModule):
    """Base of the training tasks: ``self.model``, two optimisers, one manual training step.

    Args:
        model: the trained network; its TorchRec tables are the sparse parameters.
        sparse_optimizer / dense_optimizer: factories ``params -> Optimizer`` (Hydra ``_partial_``). Under
            ``TorchRecStrategy`` (``trainer=dmp``) the sparse one is replaced by DMP's fused table optimiser.

        cuda_graph: replay the whole training step as one CUDA graph (:mod:`recsys.training.cuda_graph`) when
            training on one GPU in 32-bit precision with no LR scheduler (otherwise one warning, eager steps).
            Graphed steps call the optimisers directly, so Lightning's ``on_before_backward`` /
            ``on_after_backward`` / ``on_before_optimizer_step`` hooks do not run for them.
        graph_warmup_steps: eager steps before the graph is recorded.

    Subclasses implement :meth:`compute_losses` and may override :meth:`on_train_output`.
    """

    def __init__(
        self,
        model: nn.Module,
        sparse_optimizer: OptimizerFactory,
        dense_optimizer: OptimizerFactory,
        cuda_graph: bool = False,
        graph_warmup_steps: int = 3,
    ) -> None:
        super().__init__()
        self.model = model
        self.sparse_optimizer, self.dense_optimizer = sparse_optimizer, dense_optimizer
        self.automatic_optimization = False
        self.cuda_graph, self.graph_warmup_steps = cuda_graph, graph_warmup_steps
        self.graphed_step: GraphedStep | None = None
        self.loss_means = LossMeans()

    def compute_losses(self, batch: Any, out: Any) -> dict[str, torch.Tensor]:
        """Named scalar losses of ``out = self.model(batch)``; ``total`` is the one optimised."""
        raise NotImplementedError

    def on_train_output(self, out: Any) -> None:
        """Hook: read diagnostics from the model output of a training step (default: nothing)."""

    # ---- optimisers ---------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if getattr(strategy, "shards_tables", False):
            # TorchRecStrategy: [DMP's fused table optimiser (updates during backward; its step() only
            # refreshes the lr), KeyedOptimizerWrapper(dense_optimizer) over the unsharded parameters]
            return strategy.sharded_optimizers(self.dense_optimizer)
        sparse, dense = split_sparse_dense(self.model)
        return [
            factory(params)
            for factory, params in ((self.sparse_optimizer, sparse), (self.dense_optimizer, dense))
            if params
        ]

    def _optimizers(self) -> list[Any]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def optimisation_step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backpropagate ``loss`` (fused table updates happen here), step all optimisers.

        One call is one *step*: ``trainer.global_step`` (hence ``max_steps``, ``checkpoint.every_n_steps`` and
        checkpoint step counters) advances by 1, not by the number of optimisers (see :func:`uncounted`).
        """
        opts = self._optimizers()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for i, opt in enumerate(opts):
            if i == len(opts) - 1:
                opt.step()
            else:
                with uncounted(opt):
                    opt.step()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Batch dataclasses (``.to(device, non_blocking)``) are copied to a GPU without blocking the host
        (the loader pins them on CUDA), so the next step is queued while the copy runs; Lightning's default
        copies non-tensor objects blocking."""
        if device.type == "cuda" and not isinstance(batch, torch.Tensor) and hasattr(batch, "to"):
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- CUDA graph -----------------------------------------------------------------------------
    def graph_blocker(self) -> str | None:
        """Why this run's steps cannot be graphed (``None``: they can)."""
        trainer = self._trainer
        if self.device.type != "cuda":
            return f"the device is {self.device.type}"
        if trainer is None:
            return "no trainer"
        if str(trainer.precision) != "32-true":
            return f"precision {trainer.precision} (graphs need 32-true)"
        if trainer.world_size != 1 or getattr(trainer.strategy, "shards_tables", False):
            return "more than one device"
        if trainer.lr_scheduler_configs:
            return "an LR scheduler changes the learning rate the graph would freeze"
        return None

    def on_train_start(self) -> None:
        self.graphed_step = None
        blocker = self.graph_blocker() if self.cuda_graph else None
        if blocker is not None:
            log.warning("cuda_graph=true but the training step runs eagerly: %s", blocker)
        graphing = self.cuda_graph and blocker is None
        self._capturable_optimizers(graphing)
        if graphing:
            self.graphed_step = GraphedStep(self._raw_step, warmup=self.graph_warmup_steps)

    def _capturable_optimizers(self, on: bool) -> None:
        """``torch.optim.Adam`` & co. with their step counts on the parameters' device (``on``: what a graph needs)
        or back on the host (the default; also for a graphed run's checkpoint resumed eagerly, e.g. on a CPU, where
        ``capturable=True`` is refused); ``fused=True`` optimisers keep them on the device, as they need."""
        for opt in self._optimizers():
            raw = getattr(opt, "optimizer", opt)
            groups = [g for g in raw.param_groups if "capturable" in g]
            if not groups or (not on and not any(g["capturable"] for g in groups)):
                continue
            for group in groups:
                group["capturable"] = on
                on_device = on or group.get("fused")  # fused optimisers keep their steps on the device anyway
                for p in group["params"]:
                    step = raw.state[p].get("step") if p in raw.state else None
                    if isinstance(step, torch.Tensor):
                        raw.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)

    def on_train_end(self) -> None:
        """``perf/graph_replays`` (steps that ran as the CUDA graph) into the run's metrics."""
        if self.graphed_step is not None and self._trainer is not None:
            step = self.graphed_step
            log.info("CUDA graph: %d steps replayed, %d eager after the warm-up", step.replays, step.eager)
            self._trainer.callback_metrics["perf/graph_replays"] = torch.tensor(float(step.replays))

    def _raw_step(self, batch: Any) -> tuple[dict[str, torch.Tensor], Any]:
        """One step with the optimisers called directly (what the graph records); counted by the caller."""
        out = self.model(batch)
        losses = self.compute_losses(batch, out)
        opts = [getattr(opt, "optimizer", opt) for opt in self._optimizers()]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        for opt in opts:
            opt.step()
        return losses, out

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.graphed_step is not None:
            losses, out = self.graphed_step(batch)
            count_step(self._optimizers()[-1])
        else:
            out = self.model(batch)
            losses = self.compute_losses(batch, out)
            self.optimisation_step(losses["total"])
        bs = batch.batch_size
        self.loss_means.add(losses, bs)  # epoch means summed on the device: no self.log per loss per step
        bar = self._shows_bar()
        if bar or self._logger_writes_this_step():
            # sync_dist: with several ranks the logged training losses are means over ranks (no-op on one)
            self.log("train/loss_step", losses["total"], on_step=True, on_epoch=False, prog_bar=bar, sync_dist=True)
        if self._last_step_of_epoch(batch_idx):
            self._log_epoch_means()
        self.on_train_output(out)
        return losses["total"]

    def _shows_bar(self) -> bool:
        """prog_bar only with a bar: Lightning turns progress-bar metrics into Python floats every step (a host
        read of the loss, i.e. a device sync), whether a bar shows them or not."""
        return getattr(self._trainer, "progress_bar_callback", None) is not None

    def _logger_writes_this_step(self) -> bool:
        """Whether Lightning sends step metrics to the loggers after this step (every ``log_every_n_steps``)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def _last_step_of_epoch(self, batch_idx: int) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        return batch_idx + 1 >= trainer.num_training_batches or 0 <= trainer.max_steps <= trainer.global_step

    def _log_epoch_means(self) -> None:
        """``train/loss_epoch`` and ``train/<name>`` for every other loss: the epoch's batch-size-weighted means,
        logged once an epoch (``train/loss``, the same mean, for callbacks only)."""
        bar = self._shows_bar()
        for name, mean in self.loss_means.pop().items():
            key = "train/loss_epoch" if name == "total" else f"train/{name}"
            self.log(key, mean, on_step=False, on_epoch=True, prog_bar=bar and name == "total", sync_dist=True)
            if name == "total":
                self.log("train/loss", mean, on_step=False, on_epoch=True, logger=False, sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self.loss_means.reset()  # a resumed epoch's means cover the batches trained since the resume

    def on_train_epoch_end(self) -> None:
        """An epoch cut short (early stopping inside it, ``trainer.should_stop``): its means so far."""
        self._log_epoch_means()
