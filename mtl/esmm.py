"""ESMM (Ma et al., SIGIR 2018): pCTCVR = pCTR × pCVR, both trained over the entire impression space.

The data config lists exactly two binary tasks, in funnel order: first the CTR task (label = click),
then the CTCVR task (label = click·conversion over all impressions, e.g. ``like`` in ``data=ml100k_mtl``
or ``ctcvr`` in ``data=ali_ccp``). The tower returns the CTR logit for the first task and the logit of
pCTR·pCVR for the second, so the ranking task's ordinary per-task BCE gives exactly ESMM's loss
``BCE(click, pCTR) + BCE(click·conv, pCTCVR)`` with no direct CVR loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mtl.base import Tower, TowerOutput
from mtl.layers import TaskHeads
from mtl.spec import TaskSpec
from recsys.errors import ConfigError


def product_logit(logit_a: torch.Tensor, logit_b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``logit(σ(a)·σ(b))`` computed in log space: ``log p - log(1 - p)`` with ``log p = logσ(a) + logσ(b)``."""
    log_p = (F.logsigmoid(logit_a) + F.logsigmoid(logit_b)).clamp(max=-eps)
    return log_p - torch.log(-torch.expm1(log_p))


class ESMMTower(Tower):
    """``[B, in_dim]`` -> CTR and CVR MLP heads -> ``{ctr_task: logit pCTR, ctcvr_task: logit pCTR·pCVR}``.

    Extras: ``esmm/cvr [B]`` (pCVR, the conversion rate given a click).
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        tower_hidden: Sequence[int] = (64, 32),
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        if len(tasks) != 2 or any(t.loss != "binary" for t in tasks):
            got = [(t.name, t.label, t.loss) for t in tasks]
            raise ConfigError(
                "mtl=esmm needs exactly two binary tasks in data.tasks, in funnel order: the CTR task "
                "(label = click) then the CTCVR task (label = click*conversion over all impressions); "
                f"got (name, label, loss) = {got}"
            )
        self.ctr_task, self.ctcvr_task = self.task_names
        self.heads = TaskHeads(["ctr", "cvr"], in_dim, tower_hidden, norm=norm, activation=activation, dropout=dropout)

    def forward(self, features: torch.Tensor) -> TowerOutput:
        out = self.heads(features)
        logits = {self.ctr_task: out["ctr"], self.ctcvr_task: product_logit(out["ctr"], out["cvr"])}
        return TowerOutput(logits=logits, extras={"esmm/cvr": torch.sigmoid(out["cvr"]).detach()})
