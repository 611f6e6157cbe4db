"""Building blocks shared by the towers (and the backbones' heads): the BN-MLP and DARE's init, grouped (batched)
linear maps and MLPs, softmax gates, mixing, heads.

A *group* is one of G independent copies of a layer (an expert, a task's gate, a task's head). All
groups run in one batched matmul: inputs are ``[G, B, in]`` (one input per group) or ``[B, in]``
(the same input for every group), outputs ``[G, B, out]``. No tower loops over tasks or experts in Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
NORMS = (None, "none", "batch", "layer")


class MLP(nn.Module):
    """``[B, in_dim] -> [B, hidden[-1]]`` (or ``out_dim`` if given) with optional leading BatchNorm.

    Layers: ``[BatchNorm1d(in_dim)] -> (Linear -> PReLU) * len(hidden) -> [Linear(out_dim)]``,
    as in the DARE/DIN heads (BN first, PReLU, no dropout by default).
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(in_dim)] if batch_norm else []
        width = in_dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.PReLU(size)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def normal_init_(module: nn.Module, std: float) -> None:
    """DARE's init: every non-bias dense parameter ~ N(0, std), BatchNorm scale and PReLU slopes included.

    Embedding tables are left alone (they get their own ``init_fn``), and so are parameters flagged
    ``keep_init`` by their module (e.g. zero-initialised experts, see ``mtl.layers.keep_init``).
    """
    for name, param in module.named_parameters():
        if name.endswith("bias") or name.startswith("tables.") or ".tables." in name:
            continue
        if getattr(param, "keep_init", False):
            continue
        nn.init.normal_(param, mean=0.0, std=std)


def keep_init(*params: nn.Parameter) -> None:
    """Flag parameters whose own initialisation must survive ``RankingModel``'s N(0, init_std) re-init
    (zero-initialised experts, task embeddings); see :func:`mtl.layers.normal_init_`."""
    for p in params:
        p.keep_init = True  # type: ignore[attr-defined]


class GroupedLinear(nn.Module):
    """G independent affine maps: ``[G, B, in]`` or ``[B, in]`` -> ``[G, B, out]``.

    Weights ``[G, in, out]`` and biases ``[G, 1, out]`` start as ``nn.Linear``'s (uniform ±1/√in).
    """

    def __init__(self, groups: int, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(groups, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_dim).uniform_(-bound, bound)) if bias else None
        self.groups, self.in_dim, self.out_dim = groups, in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one input shared by all groups: a single [B, in] x [in, G*out] matmul
            y = (x @ self.weight.permute(1, 0, 2).reshape(self.in_dim, -1)).view(x.shape[0], self.groups, -1)
            y = y.transpose(0, 1)
        else:
            y = torch.bmm(x, self.weight)
        return y if self.bias is None else y + self.bias


class GroupedNorm(nn.Module):
    """Per-group BatchNorm (statistics per group and channel) or LayerNorm (per-group affine) on ``[G, B, d]``."""

    def __init__(self, groups: int, dim: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "batch":
            self.norm = nn.BatchNorm1d(groups * dim)
        elif kind == "layer":
            self.weight = nn.Parameter(torch.ones(groups, 1, dim))
            self.bias = nn.Parameter(torch.zeros(groups, 1, dim))
        else:
            raise ConfigError(f"unknown norm '{kind}'; choose one of {list(NORMS)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "batch":
            g, b, d = x.shape
            return self.norm(x.transpose(0, 1).reshape(b, g * d)).view(b, g, d).transpose(0, 1)
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class GroupedMLP(nn.Module):
    """G independent MLPs in one pass: ``[G, B, in]`` or ``[B, in]`` -> ``[G, B, out]``.

    Per group: ``(Linear -> [norm] -> activation -> [Dropout]) * len(hidden)`` then an optional
    ``Linear(out_dim)``. ``norm``: ``None | "batch" | "layer"`` (per group). With ``hidden=()`` and
    ``out_dim`` it is a grouped linear map.
    """

    def __init__(
        self,
        groups: int,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation '{activation}'; choose one of {sorted(ACTIVATIONS)}")
        if norm not in NORMS:
            raise ConfigError(f"unknown norm '{norm}'; choose one of {list(NORMS)}")
        layers: list[nn.Module] = []
        width = in_dim
        for size in hidden:
            layers.append(GroupedLinear(groups, width, size))
            if norm not in (None, "none"):
                layers.append(GroupedNorm(groups, size, norm))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        if out_dim is not None:
            layers.append(GroupedLinear(groups, width, out_dim))
            width = out_dim
        if not layers:
            raise ValueError("GroupedMLP needs hidden layers or an out_dim")
        self.net = nn.Sequential(*layers)
        self.groups, self.in_dim, self.out_dim = groups, in_dim, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Gates(nn.Module):
    """G softmax gates over E experts: ``[G, B, in]`` or ``[B, in]`` -> weights ``[G, B, E]`` (rows sum to 1)."""

    def __init__(self, groups: int, in_dim: int, num_experts: int) -> None:
        super().__init__()
        self.logits = GroupedLinear(groups, in_dim, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs.

    ``weights [G, B, E]`` with ``experts [E, B, d]`` (every gate sees all experts) or
    ``[G, E, B, d]`` (each gate its own selection) -> ``[G, B, d]``.
    """
    if experts.dim() == 3:
        return torch.einsum("gbe,ebd->gbd", weights, experts)
    return torch.einsum("gbe,gebd->gbd", weights, experts)


class TaskHeads(nn.Module):
    """One MLP head per task, batched: ``[T, B, in]`` (or ``[B, in]`` shared) -> ``{task: [B]}``."""

    def __init__(
        self,
        task_names: Sequence[str],
        in_dim: int,
        hidden: Sequence[int] = (64,),
        norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.mlp = GroupedMLP(
            len(self.task_names), in_dim, hidden, out_dim=1, norm=norm, activation=activation, dropout=dropout
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.mlp(x).squeeze(-1)  # [T, B]
        return {name: out[i] for i, name in enumerate(self.task_names)}


def gate_extras(task_names: Sequence[str], weights: torch.Tensor, group: str = "") -> dict[str, torch.Tensor]:
    """``weights [T, B, E]`` -> ``{"gate/<task>[/<group>]": [B, E]}`` (what the gate-usage plot reads)."""
    suffix = f"/{group}" if group else ""
    return {f"gate/{name}{suffix}": weights[i].detach() for i, name in enumerate(task_names)}
