"""MMoE (Ma et al., KDD 2018): n shared experts, one softmax gate per task over them, a head per task.

``f^t(x) = Σ_i g^t(x)_i f_i(x)``, ``g^t(x) = softmax(W_t x)``, ``y_t = h_t(f^t(x))`` (Ma et al. 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl.base import Tower, TowerOutput
from mtl.layers import Gates, GroupedMLP, TaskHeads, gate_extras, mix
from mtl.spec import TaskSpec
from recsys.errors import ConfigError


class MixtureOfExperts(nn.Module):
    """One MMoE layer: ``x [B, in]`` -> per-gate mixtures ``[G, B, d]`` and gate weights ``[G, B, n + extra]``.

    Args:
        in_dim: input width.
        num_experts: n experts, each ``GroupedMLP`` layers ``expert_hidden`` (output width ``expert_hidden[-1]``).
        num_gates: G gates (one per task).
        extra_slots: additional gate slots for *external* experts passed to :meth:`forward` per gate
            (TaskExpert's memory); 0 = plain MMoE.
    """

    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        num_gates: int,
        expert_hidden: Sequence[int],
        extra_slots: int = 0,
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {num_experts}")
        self.experts = GroupedMLP(num_experts, in_dim, expert_hidden, norm=norm, activation=activation, dropout=dropout)
        self.gates = Gates(num_gates, in_dim, num_experts + extra_slots)
        self.num_experts, self.extra_slots = num_experts, extra_slots
        self.out_dim = self.experts.out_dim

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, in]``; ``extra [G, B, d]`` or ``[G, extra_slots, B, d]`` (values of the extra slots per gate).

        Returns (mixture ``[G, B, d]``, gate weights ``[G, B, n + extra_slots]``).
        """
        experts = self.experts(x)  # [n, B, d]
        weights = self.gates(x)  # [G, B, n + extra]
        out = mix(weights[..., : self.num_experts], experts)
        if self.extra_slots:
            if extra is None:
                raise ValueError("this MixtureOfExperts has extra gate slots: pass their values as `extra`")
            extra = extra.unsqueeze(1) if extra.dim() == 3 else extra  # [G, slots, B, d]
            out = out + mix(weights[..., self.num_experts :], extra)
        return out, weights


class MMoETower(Tower):
    """``[B, in_dim]`` -> n experts -> per-task gates -> per-task MLP heads.

    Extras: ``gate/<task> [B, n]`` gate weights.
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        num_experts: int = 8,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        self.moe = MixtureOfExperts(
            in_dim, num_experts, len(self.task_names), expert_hidden, norm=norm, activation=activation, dropout=dropout
        )
        self.heads = TaskHeads(self.task_names, self.moe.out_dim, tower_hidden, activation=activation, dropout=dropout)

    def forward(self, features: torch.Tensor) -> TowerOutput:
        mixed, weights = self.moe(features)
        return TowerOutput(logits=self.heads(mixed), extras=gate_extras(self.task_names, weights))
