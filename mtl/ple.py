"""PLE / CGC (Tang et al., RecSys 2020): task-specific and shared experts over configurable levels.

Level j, task t: gate ``softmax(W_t x_t)`` over ``[E_t; E_s]`` (task t's experts and the shared ones)
gives task t's input of the next level; a non-final level also has a shared gate over *all* experts
that gives the next shared input. Heads sit on the last level's task outputs. ``num_levels=1`` is CGC.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtl.base import Tower, TowerOutput
from mtl.layers import Gates, GroupedMLP, TaskHeads, gate_extras, mix
from mtl.spec import TaskSpec
from recsys.errors import ConfigError


class CGCLevel(nn.Module):
    """One extraction level.

    ``forward(task_in [T, B, in] | [B, in], shared_in [B, in])`` -> (task outputs ``[T, B, d]``,
    shared output ``[B, d]`` or ``None`` on the last level, task gates ``[T, B, S + H]``,
    shared gate ``[B, T*S + H]`` or ``None``).
    """

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        specific: int,
        shared: int,
        expert_hidden: Sequence[int],
        last: bool,
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if specific < 1 or shared < 1:
            raise ConfigError(f"PLE needs >= 1 task-specific and >= 1 shared expert, got {specific} and {shared}")
        kw = dict(norm=norm, activation=activation, dropout=dropout)
        self.specific = GroupedMLP(num_tasks * specific, in_dim, expert_hidden, **kw)
        self.shared = GroupedMLP(shared, in_dim, expert_hidden, **kw)
        self.task_gates = Gates(num_tasks, in_dim, specific + shared)
        self.shared_gate = None if last else Gates(1, in_dim, num_tasks * specific + shared)
        self.num_tasks, self.num_specific, self.num_shared = num_tasks, specific, shared
        self.out_dim = self.shared.out_dim

    def forward(
        self, task_in: torch.Tensor, shared_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        t, s, h = self.num_tasks, self.num_specific, self.num_shared
        spec_in = task_in if task_in.dim() == 2 else task_in.repeat_interleave(s, dim=0)
        spec = self.specific(spec_in)  # [T*S, B, d]; experts t*S .. t*S+S-1 belong to task t
        shared = self.shared(shared_in)  # [H, B, d]
        b, d = shared.shape[1:]
        candidates = torch.cat([spec.view(t, s, b, d), shared.unsqueeze(0).expand(t, h, b, d)], dim=1)
        task_w = self.task_gates(task_in)  # [T, B, S + H]
        task_out = mix(task_w, candidates)
        if self.shared_gate is None:
            return task_out, None, task_w, None
        shared_w = self.shared_gate(shared_in)  # [1, B, T*S + H]
        shared_out = mix(shared_w, torch.cat([spec, shared], dim=0))[0]
        return task_out, shared_out, task_w, shared_w[0]


class PLETower(Tower):
    """``[B, in_dim]`` -> ``num_levels`` CGC levels -> per-task heads.

    Extras: ``gate/<task>/level<j> [B, S + H]`` (the task's own experts first, then the shared ones).
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        num_levels: int = 1,
        specific_experts: int = 2,
        shared_experts: int = 2,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        if num_levels < 1:
            raise ConfigError(f"num_levels must be >= 1, got {num_levels}")
        levels, width = [], in_dim
        for j in range(num_levels):
            level = CGCLevel(
                width,
                len(self.task_names),
                specific_experts,
                shared_experts,
                expert_hidden,
                last=j == num_levels - 1,
                norm=norm,
                activation=activation,
                dropout=dropout,
            )
            levels.append(level)
            width = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.heads = TaskHeads(self.task_names, width, tower_hidden, activation=activation, dropout=dropout)

    def forward(self, features: torch.Tensor) -> TowerOutput:
        task_x, shared_x, extras = features, features, {}
        for j, level in enumerate(self.levels):
            task_x, shared_x, weights, _ = level(task_x, shared_x)
            extras.update(gate_extras(self.task_names, weights, f"level{j + 1}"))
        return TowerOutput(logits=self.heads(task_x), extras=extras)
