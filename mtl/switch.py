"""Switch-DiT adapted to tasks (Park et al. 2024, docs/mtl.md): shared blocks whose input each task masks through
a sparse MoE gated on a learned task embedding, plus the window task prior (Jensen–Shannon, Hungarian).

Per block i and task t: ``p_i(e_t) = softmax(Linear(SiLU(e_t)))`` over M experts; ``g_i`` = the top-k
raw probabilities (not renormalised), zeros elsewhere; experts are zero-initialised linear maps d -> d;
``mask = 1 + Σ_j g_ij E_ij(z)``; the shared residual block ``z + Δ(z)`` runs on ``u = z ⊙ mask`` and
``(1 - mask) ⊙ z`` is added back, i.e. the output is ``z + Δ(z ⊙ mask)``. Zero experts give mask 1: a
plain residual MLP. The T task copies of the features run through the blocks together as ``[T, B, d]``.

Task prior: units U = N·M (all blocks' experts), window length n = k·N; task t (in data-config order,
e.g. funnel depth) gets the window starting at ``round((t/(T-1))^α · (U - n))``. The top-k indicators of
all gates are matched to the prior's columns by Hungarian assignment (cost Σ_t |Q[t,a] - P[t,b]|, columns
randomly permuted first to break ties), and the loss is ``λ_dp · mean_t JS(p_tot(e_t)/N, w_t^prior[π]/(kN))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from mtl.base import Tower, TowerOutput
from mtl.layers import ACTIVATIONS, TaskHeads, gate_extras, keep_init
from mtl.spec import TaskSpec
from recsys.errors import ConfigError


def window_prior(num_tasks: int, num_blocks: int, num_experts: int, top_k: int, alpha: float = 4.0) -> torch.Tensor:
    """``[T, N·M]`` 0/1 windows of length ``int(N·M·k/M)`` starting at ``round((t/(T-1))^α (U - n))``."""
    units = num_blocks * num_experts
    length = int(units * top_k / num_experts)
    prior = torch.zeros(num_tasks, units)
    for t in range(num_tasks):  # prior construction only (a constant), not the forward pass
        frac = t / (num_tasks - 1) if num_tasks > 1 else 0.0
        start = int(round((frac**alpha) * (units - length)))
        prior[t, start : start + length] = 1.0
    return prior


@torch.no_grad()
def match_prior(indicator: torch.Tensor, prior: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hungarian assignment of gate units to prior units.

    ``indicator [T, U]`` (top-k 0/1 of every gate), ``prior [T, U]`` -> ``π [U]``: the prior column matched
    to each gate column, minimising ``Σ_a Σ_t |Q[t, a] - P[t, π(a)]|``. Both sides' columns are randomly
    permuted first, so ties are broken at random (as in Switch-DiT).
    """
    units = indicator.shape[1]
    perm_q = torch.randperm(units, generator=generator)
    perm_p = torch.randperm(units, generator=generator)
    q, p = indicator.float().cpu()[:, perm_q], prior.float().cpu()[:, perm_p]
    cost = (q[:, :, None] - p[:, None, :]).abs().sum(0)  # [U, U]
    rows, cols = linear_sum_assignment(cost.numpy())
    matched = torch.empty(units, dtype=torch.long)
    matched[perm_q[torch.as_tensor(rows)]] = perm_p[torch.as_tensor(cols)]
    return matched.to(indicator.device)


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-wise ``½Σ p log(p/m) + ½Σ q log(q/m)``, ``m = (p+q)/2``, logs taken of ``x + eps``."""
    m = 0.5 * (p + q)
    log_m = torch.log(m + eps)
    return 0.5 * (p * (torch.log(p + eps) - log_m)).sum(-1) + 0.5 * (q * (torch.log(q + eps) - log_m)).sum(-1)


def prior_loss(
    probs: torch.Tensor,
    indicator: torch.Tensor,
    prior: torch.Tensor,
    num_blocks: int,
    top_k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``mean_t JS(probs[t]/N, prior[t, π]/(kN))``; ``probs``/``indicator``/``prior`` are ``[T, N·M]``."""
    matched = match_prior(indicator, prior, generator)
    return js_divergence(probs / num_blocks, prior[:, matched] / (top_k * num_blocks)).mean()


class SwitchBlock(nn.Module):
    """Shared pre-LN residual MLP block with a task-gated, zero-initialised sparse MoE input mask.

    ``gating(e [T, D_e])`` -> (probabilities ``[T, M]``, top-k gates ``[T, M]``, top-k indicator ``[T, M]``);
    ``forward(z [T, B, d], gates [T, M])`` -> ``[T, B, d]`` = ``z + Δ(z ⊙ (1 + m(z)))``.
    """

    def __init__(
        self,
        dim: int,
        task_dim: int,
        num_experts: int,
        top_k: int,
        hidden: int,
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.SiLU(), nn.Linear(task_dim, num_experts))
        self.expert_weight = nn.Parameter(torch.zeros(num_experts, dim, dim))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, dim))
        keep_init(self.expert_weight)
        self.delta = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )
        self.top_k = top_k

    def gating(self, task_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(task_embedding), dim=-1)
        index = probs.topk(self.top_k, dim=-1).indices
        indicator = torch.zeros_like(probs).scatter(-1, index, 1.0)
        return probs, probs * indicator, indicator

    def mask(self, z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``1 + Σ_j g_j E_j(z)``; per task the gated experts collapse into one matrix, so it is one bmm."""
        weight = torch.einsum("tm,mij->tij", gates, self.expert_weight)  # [T, d, d]
        bias = gates @ self.expert_bias  # [T, d]
        return 1.0 + torch.bmm(z, weight) + bias.unsqueeze(1)

    def forward(self, z: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        mask = self.mask(z, gates)
        u = z * mask
        return u + self.delta(u) + (1.0 - mask) * z


class SwitchTower(Tower):
    """``[B, in_dim]`` -> Linear(dim) -> T task copies ``[T, B, dim]`` -> N switch blocks -> per-task heads.

    Args:
        dim: width of the shared blocks; ``block_hidden``: their MLP width.
        num_blocks / num_experts / top_k: N, M, k (Switch-DiT: M = 3, k = 2).
        task_dim: width of the learned task embedding e_t (N(0, 1) init).
        prior_weight: λ_dp (aux loss ``switch_prior`` is already multiplied by it); 0 disables the prior.
        prior_alpha: α of the window starts.
    Extras: ``gate/<task>/block<i> [B, M]`` gate probabilities (the same for every row of a task).
    """

    def __init__(
        self,
        in_dim: int,
        tasks: Sequence[TaskSpec],
        dim: int = 64,
        num_blocks: int = 3,
        num_experts: int = 3,
        top_k: int = 2,
        block_hidden: int = 128,
        task_dim: int = 16,
        prior_weight: float = 1.0,
        prior_alpha: float = 4.0,
        tower_hidden: Sequence[int] = (32,),
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, tasks)
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"mtl=switch: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_blocks < 1:
            raise ConfigError(f"mtl=switch: num_blocks must be >= 1, got {num_blocks}")
        num_tasks = len(self.task_names)
        self.task_embedding = nn.Parameter(torch.randn(num_tasks, task_dim))
        keep_init(self.task_embedding)
        self.input = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            SwitchBlock(dim, task_dim, num_experts, top_k, block_hidden, activation, dropout) for _ in range(num_blocks)
        )
        self.heads = TaskHeads(self.task_names, dim, tower_hidden, activation="relu", dropout=dropout)
        self.register_buffer(
            "prior", window_prior(num_tasks, num_blocks, num_experts, top_k, prior_alpha), persistent=False
        )
        self.num_blocks, self.top_k, self.prior_weight = num_blocks, top_k, prior_weight

    def forward(self, features: torch.Tensor) -> TowerOutput:
        z = self.input(features)
        z = z.unsqueeze(0).expand(len(self.task_names), -1, -1)  # [T, B, d]: the task copies, batched
        probs, indicators, extras = [], [], {}
        for i, block in enumerate(self.blocks):
            p, gates, indicator = block.gating(self.task_embedding)
            z = block(z, gates)
            probs.append(p)
            indicators.append(indicator)
            extras.update(gate_extras(self.task_names, p.unsqueeze(1).expand(-1, z.shape[1], -1), f"block{i + 1}"))
        aux: dict[str, torch.Tensor] = {}
        if self.prior_weight > 0:
            loss = prior_loss(torch.cat(probs, -1), torch.cat(indicators, -1), self.prior, self.num_blocks, self.top_k)
            aux["switch_prior"] = self.prior_weight * loss
        return TowerOutput(logits=self.heads(z), aux_losses=aux, extras=extras)
