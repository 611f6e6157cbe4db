"""LightningModule for CTR / multi-task ranking: losses, evaluation metrics.

Manual optimisation with a *sparse* optimiser (embedding tables) and a *dense* one (everything else), so
TorchRec's DistributedModelParallel can replace the sparse one with its fused optimiser; both the
optimisers and the training step live in :class:`~recsys.training.base.SparseDenseModule`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl.spec import TaskSpec
from recsys.data.batch import CTRBatch
from recsys.distributed.collectives import gather_batches
from recsys.metrics.ranking import auc, gauc, logloss, rmse
from recsys.models.ranking import RankingModel, RankingOutput, build_ranking_model
from recsys.training.base import OptimizerFactory, SparseDenseModule, split_sparse_dense  # noqa: F401 (re-exported)

# how scoring jobs rebuild the trained nn.Module without Lightning (stored in the model bundle)
MODEL_BUILDER = "recsys.models.ranking.build_ranking_model"


def l2_weights(module: nn.Module) -> list[nn.Parameter]:
    """The dense weights the L2 term covers: no biases, no embedding tables, no 1-D parameters."""
    _, dense = split_sparse_dense(module)
    names = {id(p): n for n, p in module.named_parameters()}
    return [p for p in dense if not names[id(p)].endswith("bias") and p.dim() > 1]


def l2_penalty(module: nn.Module, weights: list[nn.Parameter] | None = None) -> torch.Tensor:
    """Σ‖θ‖² over :func:`l2_weights` (or the given ``weights``), as the DARE code regularises."""
    terms = [p.pow(2).sum() for p in (l2_weights(module) if weights is None else weights)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class RankingModule(SparseDenseModule):
    """Trains a :class:`RankingModel` on :class:`CTRBatch` es.

    Args:
        model: backbone + tower.
        tasks: the data config's tasks; the first binary task also trains the backbone's aux heads.
        sparse_optimizer / dense_optimizer: factories ``params -> Optimizer`` (Hydra ``_partial_``).
        aux_loss_weight: weight of each backbone auxiliary head's BCE (DARE: 1).
        l2_weight: coefficient of :func:`l2_penalty` (DARE: 1e-6).
        cuda_graph / graph_warmup_steps: see :class:`~recsys.training.base.SparseDenseModule`.

    Logged per epoch: ``train/loss``, ``val/auc`` (mean over binary tasks), ``val/<task>/auc``,
    ``val/<task>/logloss``, ``val/<task>/gauc_user``, ``val/<task>/gauc_category`` (and ``/rmse`` for
    regression tasks), and the same under ``test/``.
    """

    def __init__(
        self,
        model: RankingModel,
        tasks: list[TaskSpec],
        sparse_optimizer: OptimizerFactory,
        dense_optimizer: OptimizerFactory,
        aux_loss_weight: float = 1.0,
        l2_weight: float = 1e-6,
        cuda_graph: bool = False,
        graph_warmup_steps: int = 3,
    ) -> None:
        super().__init__(model, sparse_optimizer, dense_optimizer, cuda_graph, graph_warmup_steps)
        self.tasks = list(tasks)
        self.aux_loss_weight, self.l2_weight = aux_loss_weight, l2_weight
        self.model_builder = MODEL_BUILDER
        binary = [t for t in self.tasks if t.loss == "binary"]
        self.primary = binary[0].name if binary else None
        self._eval: dict[str, list[np.ndarray]] = defaultdict(list)
        self._l2_weights: list[nn.Parameter] | None = None

    def forward(self, batch: CTRBatch) -> RankingOutput:
        return self.model(batch)

    # ---- losses -------------------------------------------------------------------------------
    def compute_losses(self, batch: CTRBatch, out: RankingOutput) -> dict[str, torch.Tensor]:
        """Per-task losses, aux-head and tower regularisers, L2; ``total`` is the weighted sum."""
        losses: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        for task in self.tasks:
            logit, label = out.logits[task.name], batch.labels[task.name].float()
            if task.loss == "binary":
                loss = F.binary_cross_entropy_with_logits(logit, label)
            else:
                loss = F.mse_loss(logit, label)
            losses[f"task/{task.name}"] = loss
            total = total + task.weight * loss
        if self.primary is not None:
            label = batch.labels[self.primary].float()
            for name, logit in out.aux_logits.items():
                loss = F.binary_cross_entropy_with_logits(logit, label)
                losses[f"aux/{name}"] = loss
                total = total + self.aux_loss_weight * loss
        for name, loss in out.aux_losses.items():
            losses[f"aux/{name}"] = loss
            total = total + loss
        if self.l2_weight > 0:
            if self._l2_weights is None:  # once, after the strategy has wrapped the model (not every step)
                self._l2_weights = l2_weights(self.model)
            losses["l2"] = self.l2_weight * l2_penalty(self.model, self._l2_weights).to(total.device)
            total = total + losses["l2"]
        losses["total"] = total
        return losses

    # ---- evaluation ---------------------------------------------------------------------------
    def _collect(self, batch: CTRBatch) -> RankingOutput:
        out = self.model(batch)
        for task in self.tasks:
            pred = out.logits[task.name]
            pred = torch.sigmoid(pred) if task.loss == "binary" else pred
            self._eval[f"pred/{task.name}"].append(pred.detach().float().cpu().numpy())
            self._eval[f"label/{task.name}"].append(batch.labels[task.name].float().cpu().numpy())
        if getattr(batch, "user", None) is not None:  # tabular batches have no user/category: no GAUC
            self._eval["user"].append(batch.user.cpu().numpy())
            self._eval["category"].append(batch.target_category.cpu().numpy())
        return out

    def validation_step(self, batch: CTRBatch, batch_idx: int) -> RankingOutput:
        return self._collect(batch)  # callbacks read the output's extras (gate usage)

    def test_step(self, batch: CTRBatch, batch_idx: int) -> None:
        self._collect(batch)

    def evaluation_metrics(self, prefix: str) -> dict[str, float]:
        """Metrics over everything collected since the last call (then cleared); with several ranks,
        over all ranks' batches (every rank computes the same global values)."""
        identity = [k for k in self._eval if not k.startswith("pred/")]
        cols = {k: np.concatenate(v) for k, v in gather_batches(dict(self._eval), identity).items()}
        self._eval.clear()
        if not cols:
            return {}
        metrics: dict[str, float] = {}
        aucs, losses = [], []
        for task in self.tasks:
            pred, label = cols[f"pred/{task.name}"], cols[f"label/{task.name}"]
            if task.loss == "binary":
                metrics[f"{prefix}/{task.name}/auc"] = auc(pred, label)
                metrics[f"{prefix}/{task.name}/logloss"] = logloss(pred, label)
                if "user" in cols:
                    metrics[f"{prefix}/{task.name}/gauc_user"] = gauc(pred, label, cols["user"])
                    metrics[f"{prefix}/{task.name}/gauc_category"] = gauc(pred, label, cols["category"])
                aucs.append(metrics[f"{prefix}/{task.name}/auc"])
                losses.append(metrics[f"{prefix}/{task.name}/logloss"])
            else:
                metrics[f"{prefix}/{task.name}/rmse"] = rmse(pred, label)
        if aucs:
            metrics[f"{prefix}/auc"] = float(np.mean(aucs))
            metrics[f"{prefix}/logloss"] = float(np.mean(losses))
            if "user" in cols:
                metrics[f"{prefix}/gauc_user"] = float(metrics[f"{prefix}/{self.primary}/gauc_user"])
                metrics[f"{prefix}/gauc_category"] = float(metrics[f"{prefix}/{self.primary}/gauc_category"])
        return metrics

    def _log_evaluation(self, prefix: str) -> None:
        metrics = self.evaluation_metrics(prefix)
        headline = f"{prefix}/auc"
        if headline in metrics:
            self.log(headline, metrics.pop(headline), prog_bar=True, sync_dist=True)  # equal on all ranks
        if metrics:
            self.log_dict(metrics, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")


def build_ranking_module(
    datamodule: Any,
    backbone: Callable[..., nn.Module],
    tower: Callable[..., nn.Module],
    init_std: float | None = 0.01,
    **task_kwargs: Any,
) -> RankingModule:
    """Assemble :func:`build_ranking_model` -> :class:`RankingModule` (the ``objective=ranking`` builder)."""
    model = build_ranking_model(datamodule, backbone, tower, init_std)
    return RankingModule(model, datamodule.tasks, **task_kwargs)
