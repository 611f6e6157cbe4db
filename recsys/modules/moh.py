"""Mixture-of-Head (MoH) gates for multi-head attention (Jin et al. 2024; docs/seqrec.md).

``h`` heads = ``h_s`` shared heads (always on) + ``h_r = h - h_s`` routed heads, of which ``k`` are active
per token. The gates multiply each head's output before the heads are concatenated; all heads are still
computed (as in the reference code, routing saves no FLOPs).

Learned router (per token ``x [d]``):
  r = softmax(W_r x) [h_r];  S = top-k(r);  ĝ_j = r_j 1[j∈S] / Σ_S r  (= softmax of W_r x over S)
  s = softmax(W_s x) [h_s]   (a constant 1 when h_s = 1)
  [α_1, α_2] = 2 softmax(W_h x)
  gates: shared α_1 h_s s_i, routed α_2 k ĝ_j  (all 1 when W_r, W_s, W_h are zero)
``routed_topk = 0`` is the dense-weighted mode: every head shared, gates ``h softmax(W_s x)``.
q-norm router (parameter-free, MoH-LLaMA3): routed logits ``‖q_j‖₂`` divided by their std across the
routed heads, softmax, top-k -> binary gates (shared heads 1).

Load balance (routed heads, valid tokens only): ``P_j = mean r_j``, ``f_j = mean 1[j∈S]`` (no gradient),
``L_b = h_r Σ_j P_j f_j`` (= k under uniform routing). The model adds ``balance_weight`` × the mean over layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from recsys.errors import ConfigError

ROUTERS = ("learned", "qnorm")
_EPS = 1e-6


@dataclass
class HeadGates:
    """``gates [B, T, h]`` (0 on inactive heads), ``balance`` scalar (unweighted ``L_b``; 0 when nothing is routed)."""

    gates: torch.Tensor
    balance: torch.Tensor


class HeadRouter(nn.Module):
    """Per-token head gates.

    Args:
        dim: token width ``d``.
        num_heads: ``h``.
        shared_heads: ``h_s`` (always-on heads), ``0 <= h_s <= h``.
        routed_topk: ``k`` active routed heads per token, ``0 <= k <= h - h_s``; 0 = dense-weighted mode.
        router: ``"learned"`` (W_r, W_s, W_h, zero-initialised) or ``"qnorm"`` (parameter-free, binary gates).
    """

    def __init__(self, dim: int, num_heads: int, shared_heads: int, routed_topk: int, router: str = "learned") -> None:
        super().__init__()
        if router not in ROUTERS:
            raise ConfigError(f"unknown MoH router '{router}'; choose one of {list(ROUTERS)}")
        if not 0 <= shared_heads <= num_heads:
            raise ConfigError(f"shared_heads={shared_heads} must lie in [0, num_heads={num_heads}]")
        routed = num_heads - shared_heads
        if not 0 <= routed_topk <= routed or (routed_topk == 0 and router == "qnorm"):
            raise ConfigError(f"routed_topk={routed_topk} must lie in [1, {routed}] (0 = dense, learned router only)")
        self.num_heads, self.routed_topk, self.router = num_heads, routed_topk, router
        self.shared = num_heads if routed_topk == 0 else shared_heads
        self.routed = num_heads - self.shared
        learned = router == "learned"
        self.w_routed = nn.Linear(dim, self.routed, bias=False) if learned and self.routed else None
        self.w_shared = nn.Linear(dim, self.shared, bias=False) if learned and self.shared > 1 else None
        self.w_group = nn.Linear(dim, 2, bias=False) if learned and self.shared and self.routed else None
        for layer in (self.w_routed, self.w_shared, self.w_group):
            if layer is not None:
                nn.init.zeros_(layer.weight)

    def forward(
        self, x: torch.Tensor, queries: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> HeadGates:
        """``x [..., d]`` router input per token; ``queries [..., h, d_h]`` (qnorm router only);
        ``mask [...]`` True on real tokens (padding is left out of the balance loss; default: all real).

        Returns :class:`HeadGates` with ``gates [..., h]``.
        """
        if self.routed == 0:  # dense-weighted (or all heads shared)
            return HeadGates(self._shared(x), x.new_zeros(()))
        if self.router == "qnorm":
            if queries is None:
                raise ValueError("the qnorm router needs the per-head queries")
            logits = queries[..., self.shared :, :].norm(dim=-1)  # [..., h_r]
            logits = logits / logits.std(dim=-1, keepdim=True).clamp_min(_EPS)
        else:
            logits = self.w_routed(x)
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, self.routed_topk, dim=-1).indices
        selected = torch.zeros_like(probs).scatter_(-1, top, 1.0)
        if self.router == "qnorm":
            routed = selected
            shared = x.new_ones(*x.shape[:-1], self.shared)
        else:
            # r_j / Σ_S r = softmax of the logits over S (exact 1/k when routing is uniform)
            routed = self.routed_topk * torch.softmax(logits.masked_fill(selected == 0, float("-inf")), dim=-1)
            shared = self._shared(x)
            if self.w_group is not None:
                group = 2.0 * torch.softmax(self.w_group(x), dim=-1)
                shared, routed = group[..., :1] * shared, group[..., 1:] * routed
        return HeadGates(torch.cat([shared, routed], dim=-1), self._balance(probs, selected, mask))

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, h_s]`` shared-head weights ``h_s softmax(W_s x)`` (1 when there is one shared head)."""
        if self.w_shared is None:
            return x.new_ones(*x.shape[:-1], self.shared)
        return self.shared * torch.softmax(self.w_shared(x), dim=-1)

    def _balance(self, probs: torch.Tensor, selected: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``L_b = h_r Σ_j P_j f_j`` over the real tokens of ``probs/selected [..., h_r]``."""
        probs, selected = probs.reshape(-1, self.routed), selected.reshape(-1, self.routed)
        count = max(probs.shape[0], 1)
        if mask is not None:  # weights, not boolean indexing: no host sync
            weight = mask.reshape(-1, 1).to(probs.dtype)
            probs, selected, count = probs * weight, selected * weight, weight.sum().clamp_min(1.0)
        return self.routed * (probs.sum(0) / count * selected.sum(0).detach() / count).sum()
