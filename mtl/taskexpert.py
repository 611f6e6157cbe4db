"""TaskExpert (Ye & Xu, ICCV 2023), as this package reads it (docs/mtl.md).

For layers ℓ = 1..L over a shared representation x^ℓ (x^1 = backbone features, x^{ℓ+1} = trunk_ℓ(x^ℓ),
a Linear -> LayerNorm -> activation layer): n experts ``e_i = E_i(x^ℓ)`` (Linear -> LayerNorm -> activation,
width d_m) decompose x^ℓ; task t's gate ``a_t = softmax(G_t(x^ℓ)) ∈ R^{n+1}`` reads
``F_t = Σ_i a_ti e_i + a_t,n+1 · M_t^{ℓ-1}`` (the task's memory as an extra expert) and writes the memory:
``replace`` (M_t^ℓ = F_t) or ``residual`` (M_t^ℓ = LN(M_t^{ℓ-1} + F_t)). M_t^0 = 0 (``memory_init: zero``)
or a per-task projection of x^1 (``project``). Task t's head reads M_t^L. With the memory slot's gate
forced to zero a layer is exactly an MMoE layer (:class:`mtl.mmoe.MixtureOfExperts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl.base import Tower, TowerOutput
from mtl.layers import GroupedLinear, GroupedMLP, TaskHeads, gate_extras
from mtl.mmoe import MixtureOfExperts
from mtl.spec import TaskSpec
from recsys.errors import ConfigError

MEMORY_UPDATES = ("replace", "residual")
MEMORY_INITS = ("zero", "project")


class TaskExpertTower(Tower):
    """``[B, in_dim]`` -> L memorial-MoE layers (memory ``[T, B, d_m]``) -> per-task heads on the final memory.

    Extras: ``gate/<task>/layer<ℓ> [B, n + 1]`` (last column = the memory slot).
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        num_layers: int = 2,
        num_experts: int = 4,
        expert_dim: int = 64,
        trunk_dim: int = 64,
        memory_update: str = "residual",
        memory_init: str = "zero",
        tower_hidden: Sequence[int] = (32,),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        if memory_update not in MEMORY_UPDATES:
            raise ConfigError(
                f"mtl=taskexpert: memory_update must be one of {list(MEMORY_UPDATES)}, got '{memory_update}'"
            )
        if memory_init not in MEMORY_INITS:
            raise ConfigError(f"mtl=taskexpert: memory_init must be one of {list(MEMORY_INITS)}, got '{memory_init}'")
        if num_layers < 1:
            raise ConfigError(f"mtl=taskexpert: num_layers must be >= 1, got {num_layers}")
        num_tasks = len(self.task_names)
        kw = dict(norm="layer", activation=activation, dropout=dropout)
        self.layers, self.trunk = nn.ModuleList(), nn.ModuleList()
        width = in_dim
        for layer in range(num_layers):
            self.layers.append(MixtureOfExperts(width, num_experts, num_tasks, (expert_dim,), extra_slots=1, **kw))
            if layer < num_layers - 1:
                self.trunk.append(GroupedMLP(1, width, (trunk_dim,), **kw))
                width = trunk_dim
        self.memory_norms = (
            nn.ModuleList(nn.LayerNorm(expert_dim) for _ in range(num_layers)) if memory_update == "residual" else None
        )
        self.memory_proj = GroupedLinear(num_tasks, in_dim, expert_dim) if memory_init == "project" else None
        self.heads = TaskHeads(self.task_names, expert_dim, tower_hidden, activation=activation, dropout=dropout)
        self.expert_dim = expert_dim

    def initial_memory(self, features: torch.Tensor) -> torch.Tensor:
        """``M^0 [T, B, d_m]``."""
        if self.memory_proj is not None:
            return self.memory_proj(features)
        return features.new_zeros(len(self.task_names), features.shape[0], self.expert_dim)

    def forward(self, features: torch.Tensor) -> TowerOutput:
        x, memory, extras = features, self.initial_memory(features), {}
        for layer, moe in enumerate(self.layers):
            read, weights = moe(x, extra=memory)  # [T, B, d_m], [T, B, n + 1]
            memory = read if self.memory_norms is None else self.memory_norms[layer](memory + read)
            extras.update(gate_extras(self.task_names, weights, f"layer{layer + 1}"))
            if layer < len(self.trunk):
                x = self.trunk[layer](x)[0]
        return TowerOutput(logits=self.heads(memory), extras=extras)
