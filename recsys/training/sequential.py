"""LightningModule for next-item prediction (SASRec, MQSA-TED): losses, manual optimisation, full ranking.

Same base as :class:`~recsys.training.ranking.RankingModule` (:class:`~recsys.training.base.SparseDenseModule`):
manual optimisation with a sparse optimiser (the TorchRec item table) and a dense one (everything else);
under ``trainer=dmp`` DistributedModelParallel shards the item table and swaps in its fused optimiser
(the tied output layer then reads the table through the sharded lookup: ``SASRec.embed``). Losses and
scores come from ``recsys/losses/sequential.py`` (shared with the GPU benchmark's plain loop).

Evaluation ranks every item at each user's newest position, batched, with the user's history items removed
(``exclude_history=True``, config ``eval.exclude_history``: the official MQSA-TED / S3-Rec protocol) or kept
rankable (``False``: RecBole's):
``val/hr@K``, ``val/ndcg@K`` (and ``test/``) for K in ``ks``, over all ranks' users under DDP/DMP; these are the names
Lightning sees
(``checkpoint.monitor``, early stopping, ``trainer.test`` results, e.g. ``val/ndcg@20``). MLflow forbids
``@`` in metric names; Lightning's MLflow logger drops it, so the run stores ``val/ndcg20``, ``test/hr10``, ...
(its warning about the rewrite is silenced here). With MoH attention the mean share of
tokens on which each head is active is logged per layer (``moh/<branch>/block<i>/head<j>``) and plotted
into ``plots/head_utilisation.png`` after each training epoch.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.loggers import MLFlowLogger

from recsys.data.seq_batch import SeqBatch
from recsys.data.transitions import TransitionGraph
from recsys.distributed.collectives import gather_batches
from recsys.errors import ConfigError
from recsys.losses.sequential import sequential_losses
from recsys.metrics.topk import DEFAULT_KS, rank_metrics
from recsys.models.sasrec import SASRec, SeqOutput
from recsys.models.sequential import build_sequential_model, last_position_scores, ranks_under_protocols
from recsys.tracking.head_plots import plot_head_utilisation
from recsys.training.base import OptimizerFactory, SparseDenseModule

_GRAPH_PARTS = ("crow", "col", "weight", "counts")
MODEL_BUILDER = "recsys.models.sequential.build_sequential_model"
warnings.filterwarnings("ignore", message="MLFlow only allows", category=RuntimeWarning)


class SequentialModule(SparseDenseModule):
    """Trains a sequential model (``SASRec`` or a subclass) on :class:`SeqBatch` es.

    Args:
        model: the sequential backbone (owns the item table and the TED settings).
        graph: TED's transition graph (needed when ``model.lambda_kd > 0``); kept as non-persistent buffers.
        sparse_optimizer / dense_optimizer: factories ``params -> Optimizer`` (Hydra ``_partial_``); the
            official L2 (1e-4 · ½Σθ² on all weights) is Adam's ``weight_decay`` (the same gradient).
        ks: cut-offs of HR@K / NDCG@K.
        pad_class: keep the padding id as an extra softmax class with logit 0 (the official code).
        exclude_history: evaluation protocol: remove each user's history items from the full ranking (True,
            the official MQSA-TED / S3-Rec protocol) or keep them rankable (False, RecBole's).
        both_protocols: also rank every validation / test batch under the other protocol, published with the
            protocol's name after the split (``val_history_kept/ndcg@20`` when ``exclude_history``, else
            ``val_history_removed/...``; ``epoch_test_<protocol>/``, ``test_<protocol>/``). The plain names
            (``val/...``) stay the run's protocol, which checkpointing reads; training is not affected, so one run
            gives both protocols' per-epoch validation and test curves (``benchmarks/seqrec.py``).
        cuda_graph / graph_warmup_steps: replay each training step as one CUDA graph
            (:class:`~recsys.training.base.SparseDenseModule`); needs fixed-shape training batches
            (``data.fixed_shape``, the default on one GPU): a jagged batch runs eagerly.
    """

    def __init__(
        self,
        model: SASRec,
        graph: TransitionGraph | None,
        sparse_optimizer: OptimizerFactory,
        dense_optimizer: OptimizerFactory,
        ks: Sequence[int] = DEFAULT_KS,
        pad_class: bool = True,
        exclude_history: bool = True,
        both_protocols: bool = False,
        cuda_graph: bool = False,
        graph_warmup_steps: int = 3,
    ) -> None:
        super().__init__(model, sparse_optimizer, dense_optimizer, cuda_graph, graph_warmup_steps)
        self.ks, self.pad_class = tuple(int(k) for k in ks), pad_class
        self.exclude_history = bool(exclude_history)
        # the other protocol's name and setting, ranked too under both_protocols (None: not ranked)
        self.other_protocol = (
            (protocol_name(not self.exclude_history), not self.exclude_history) if both_protocols else None
        )
        self.model_builder = MODEL_BUILDER  # how a bundle rebuilds ``model`` without Lightning
        self.num_items = model.num_items
        self.has_graph = graph is not None
        for part in _GRAPH_PARTS:
            self.register_buffer(f"graph_{part}", getattr(graph, part) if graph is not None else None, persistent=False)
        self._eval: dict[str, list[np.ndarray]] = defaultdict(list)
        self._epoch_test: dict[str, list[np.ndarray]] = defaultdict(list)  # test split ranked after each epoch
        self._util: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.util_history: list[dict[str, list[float]]] = []

    @property
    def graph(self) -> TransitionGraph | None:
        if not self.has_graph:
            return None
        return TransitionGraph(*(getattr(self, f"graph_{p}") for p in _GRAPH_PARTS), num_items=self.num_items)

    def forward(self, batch: SeqBatch) -> torch.Tensor:
        """``[B, I]`` scores at the newest position (history items at ``-inf`` under ``exclude_history``)."""
        return last_position_scores(self.model, batch, self.exclude_history)

    # ---- training (the step itself: SparseDenseModule.training_step) --------------------------------
    def compute_losses(self, batch: SeqBatch, out: SeqOutput) -> dict[str, torch.Tensor]:
        """``rec`` (+ ``kd``) (+ MoH balance) and their ``total`` (:func:`sequential_losses`)."""
        return sequential_losses(self.model, batch, self.graph, self.pad_class, out=out)

    def on_train_output(self, out: SeqOutput) -> None:
        for key, value in out.extras.items():
            if key.startswith("moh_util/"):
                self._util[key[len("moh_util/") :]].append(value)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self._util:
            return
        usage = {layer: torch.stack(values).mean(0).tolist() for layer, values in sorted(self._util.items())}
        self._util.clear()
        self.util_history.append(usage)
        for layer, heads in usage.items():
            for j, value in enumerate(heads):
                self.log(f"moh/{layer}/head{j}", value, sync_dist=True)
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "plots" / "head_utilisation.png"
            plot = plot_head_utilisation(self.util_history, path, "MoH: mean head utilisation per layer (training)")
            for logger in self.loggers:
                if isinstance(logger, MLFlowLogger) and plot is not None:
                    logger.experiment.log_artifact(logger.run_id, str(plot), "plots")

    # ---- evaluation ---------------------------------------------------------------------------
    def _rank(self, batch: SeqBatch, into: dict[str, list[np.ndarray]] | None = None) -> None:
        into = self._eval if into is None else into
        protocols = [self.exclude_history] + ([] if self.other_protocol is None else [self.other_protocol[1]])
        for key, ranks in zip(("rank", "rank_other"), ranks_under_protocols(self.model, batch, protocols)):
            into[key].append(ranks.cpu().numpy())
        if batch.user is not None:  # identifies a batch the distributed sampler repeated
            into["user"].append(batch.user.cpu().numpy())

    def validation_step(self, batch: SeqBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._rank(batch)
        else:  # the datamodule's test_each_epoch loader: ranked apart, published as epoch_test/*
            self._rank(batch, self._epoch_test)

    def test_step(self, batch: SeqBatch, batch_idx: int) -> None:
        self._rank(batch)

    def evaluation_metrics(self, prefix: str, ranked: dict[str, list[np.ndarray]] | None = None) -> dict[str, float]:
        """HR/NDCG over everything ranked since the last call (then cleared); with several ranks, over all
        ranks' rows (batches the sampler repeated are dropped), so every rank computes the same values."""
        ranked = self._eval if ranked is None else ranked
        identity = ["user"] if "user" in ranked else ["rank"]
        cols = gather_batches(dict(ranked), identity)
        ranked.clear()
        if not cols.get("rank"):
            return {}
        metrics = rank_metrics(torch.from_numpy(np.concatenate(cols["rank"])), self.ks, prefix=f"{prefix}/")
        if cols.get("rank_other"):  # both_protocols: the other protocol under <prefix>_<its name>/
            other = f"{prefix}_{self.other_protocol[0]}/"
            metrics |= rank_metrics(torch.from_numpy(np.concatenate(cols["rank_other"])), self.ks, prefix=other)
        return metrics

    def _publish(self, prefix: str, ranked: dict[str, list[np.ndarray]] | None = None) -> None:
        metrics = self.evaluation_metrics(prefix, ranked)
        if not metrics or self.trainer.sanity_checking:
            return
        headline = f"{prefix}/ndcg@{max(self.ks)}"
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name == headline, sync_dist=True)  # equal on all ranks

    def on_validation_epoch_end(self) -> None:
        self._publish("val")
        if self._epoch_test:
            self._publish("epoch_test", self._epoch_test)

    def on_test_epoch_end(self) -> None:
        self._publish("test")


def protocol_name(exclude_history: bool) -> str:
    """``history_removed`` (``exclude_history=True``) or ``history_kept``: the protocol's name in metric names
    (``val_history_kept/ndcg@20``) and in benchmark results."""
    return "history_removed" if exclude_history else "history_kept"


def build_sequential_module(
    datamodule: Any,
    backbone: Callable[..., SASRec],
    tower: Callable[..., Any] | None = None,
    init_std: float | None = 0.01,
    **task_kwargs: Any,
) -> SequentialModule:
    """:func:`~recsys.models.sequential.build_sequential_model` (no task tower) wrapped in
    :class:`SequentialModule`; TED's transition graph comes from the datamodule's training split."""
    if not hasattr(datamodule, "transition_graph"):
        raise ConfigError(
            "objective=sequential needs sequence data (data=beauty|sports|yelp|seqrec), "
            f"got {type(datamodule).__name__}"
        )
    model = build_sequential_model(datamodule, backbone, tower, init_std)
    graph = datamodule.transition_graph(model.kd_span) if model.lambda_kd > 0 else None
    return SequentialModule(model, graph, **task_kwargs)
