"""Causal self-attention blocks of SASRec / MQSA-TED (docs/seqrec.md), on jagged tokens.

Layout of one block (the official code): ``q = LN(query_in)``; keys and values from the un-normalised
input ``x``; ``o = LN(Attn(q, x) + q)``; ``h = o + FFN(o)``; the encoder ends with a LayerNorm.
``FFN = Dropout(W_2 Dropout(ReLU(W_1 o)))``, width ``d``; dropout also on the attention weights; no
output projection after the heads (as in the official code).

Tokens stay jagged (``[N, d]``, ``N = Σ L_b`` real items, oldest first per row): every per-token op runs
on real items only. Only the attention pads, right-aligned to ``[B, T]`` with :mod:`recsys.ops.jagged`
(FBGEMM where available): there a plain causal mask also hides the padding from every real query.
``last_only`` computes the final block for each row's newest item alone (evaluation).
A :class:`PaddedLayout` holds the tokens already right-padded (``N = B T`` slots, the fixed shape of a graphed
GPU step): the same ops run on every slot, padding slots included, and the caller drops them
(:attr:`Layout.real`); a real query still sees only its own row's earlier items.

The query input is ``x`` itself (SASRec, window 1) or the causal mean of the last ``window`` inputs of
the same row (MQSA's long query). ``attention="moh"`` gates the heads with
:class:`~recsys.modules.moh.HeadRouter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError
from recsys.modules.moh import HeadRouter
from recsys.ops.jagged import dense_to_jagged, jagged_to_padded_dense, lengths_to_offsets, padding_mask

ATTENTIONS = ("mha", "moh")
LN_EPS = 1e-8


class Layout:
    """Where jagged tokens sit in a right-padded ``[B, T]`` batch (``T`` = longest row).

    ``total``: the number of tokens ``sum(lengths)`` when the caller knows it on the host (the jagged values'
    length): then only ``T`` is read from the device (one sync per batch), not the token count as well.
    """

    def __init__(self, lengths: torch.Tensor, total: int | None = None) -> None:
        self.lengths = lengths
        self.offsets = lengths_to_offsets(lengths)
        self.width = max(int(lengths.max()), 1) if lengths.numel() else 1
        self.total = int(self.offsets[-1]) if total is None else total

    @property
    def batch(self) -> int:
        return self.lengths.numel()

    @property
    def real(self) -> torch.Tensor | None:
        """``[N]`` bool, True on real tokens; ``None`` when every token is real (jagged tokens)."""
        return None

    @cached_property
    def rows(self) -> torch.Tensor:
        """``[N]`` row of each token."""
        batch = torch.arange(self.batch, device=self.lengths.device)
        return torch.repeat_interleave(batch, self.lengths, output_size=self.total)

    @cached_property
    def position(self) -> torch.Tensor:
        """``[N]`` index of each token within its row (0 = oldest)."""
        return torch.arange(self.total, device=self.lengths.device) - self.offsets[:-1][self.rows]

    @cached_property
    def last(self) -> torch.Tensor:
        """``[B]`` flat index of each row's newest token."""
        return self.offsets[1:] - 1

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [B, T, D]``, zeros after each row's end."""
        return jagged_to_padded_dense(values, self.offsets, self.width)

    def unpad(self, dense: torch.Tensor) -> torch.Tensor:
        """``[B, T, D] -> [N, D]``."""
        return dense_to_jagged(dense, self.offsets, self.total)


class PaddedLayout(Layout):
    """Tokens already right-padded to ``[B, width]`` and flattened (``N = B width`` slots, row-major): a fixed
    shape, nothing read from the device. ``lengths [B]``: real slots per row (>= 1)."""

    def __init__(self, lengths: torch.Tensor, width: int) -> None:
        self.lengths, self.width, self.total = lengths, width, lengths.numel() * width

    @cached_property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.batch, device=self.lengths.device).repeat_interleave(self.width)

    @cached_property
    def position(self) -> torch.Tensor:
        return torch.arange(self.width, device=self.lengths.device).repeat(self.batch)

    @cached_property
    def last(self) -> torch.Tensor:
        return torch.arange(self.batch, device=self.lengths.device) * self.width + self.lengths - 1

    @cached_property
    def real(self) -> torch.Tensor:
        return self.position < self.lengths[self.rows]

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(self.batch, self.width, -1)

    def unpad(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(self.total, -1)


def causal_window_mean(x: torch.Tensor, layout: Layout, window: int) -> torch.Tensor:
    """``x̄_t = mean of x_{t-window+1..t}`` within each row (fewer at a row's start): ``x [N, d] -> [N, d]``."""
    if window == 1:
        return x
    total = x
    count = torch.ones_like(layout.position, dtype=x.dtype)
    index = torch.arange(x.shape[0], device=x.device)
    for shift in range(1, window):  # a loop over the window, not over data
        valid = layout.position >= shift
        total = total + torch.where(valid.unsqueeze(1), x[(index - shift).clamp_min(0)], x.new_zeros(()))
        count = count + valid.to(x.dtype)
    return total / count.unsqueeze(1)


def masked_mean(values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean over the rows of ``values [N, ...]`` that ``real [N]`` marks (all rows when None), without
    boolean indexing (no host sync)."""
    if real is None:
        return values.mean(0)
    weight = real.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * weight).sum(0) / weight.sum().clamp_min(1.0)


@dataclass
class BlockOutput:
    """``hidden [Nq, d]``; ``balance`` (MoH ``L_b``) and ``utilisation [h]`` (share of tokens on which each
    head is active) when the block routes heads."""

    hidden: torch.Tensor
    balance: torch.Tensor | None = None
    utilisation: torch.Tensor | None = None


class CausalAttentionBlock(nn.Module):
    """One block. ``moh``: keyword arguments of :class:`HeadRouter` (shared_heads, routed_topk, router)."""

    def __init__(
        self, dim: int, num_heads: int = 1, dropout: float = 0.5, attention: str = "mha", moh: dict | None = None
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"unknown attention '{attention}'; choose one of {list(ATTENTIONS)}")
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.query_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.router = HeadRouter(dim, num_heads, **(moh or {})) if attention == "moh" else None
        for layer in (self.q, self.k, self.v, self.ff1, self.ff2):  # tf.layers.dense defaults
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T, d] -> [B, h, T, d/h]``."""
        b, n, d = t.shape
        return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def _attend(self, queries: torch.Tensor, x: torch.Tensor, layout: Layout, last_only: bool) -> torch.Tensor:
        """Multi-head attention of ``queries [Nq, d]`` over the row's keys: ``-> [Nq, h, d/h]``."""
        dim = x.shape[1]
        keys, values = layout.pad(torch.cat([self.k(x), self.v(x)], dim=1)).split(dim, dim=2)
        dropout = self.dropout if self.training else 0.0
        if last_only:  # one query per row, at its newest slot: mask the padding only
            mask = padding_mask(layout.lengths, layout.width)[:, None, None, :]
            out = F.scaled_dot_product_attention(
                self._heads(queries.unsqueeze(1)),
                self._heads(keys),
                self._heads(values),
                attn_mask=mask,
                dropout_p=dropout,
            )
            return out.squeeze(2)
        out = F.scaled_dot_product_attention(
            self._heads(layout.pad(queries)), self._heads(keys), self._heads(values), dropout_p=dropout, is_causal=True
        )  # [B, h, T, d/h]
        return layout.unpad(out.transpose(1, 2).flatten(2)).view(-1, self.num_heads, dim // self.num_heads)

    def forward(self, query_in: torch.Tensor, x: torch.Tensor, layout: Layout, last_only: bool = False) -> BlockOutput:
        """``query_in [Nq, d]`` (every token, or each row's newest if ``last_only``), ``x [N, d]``."""
        q = self.query_norm(query_in)
        queries = self.q(q)
        heads = self._attend(queries, x, layout, last_only)  # [Nq, h, d/h]
        out = BlockOutput(hidden=q)
        if self.router is not None:
            real = None if last_only else layout.real
            routed = self.router(q, queries.view_as(heads), real)
            heads = heads * routed.gates.unsqueeze(-1)
            out.balance = routed.balance
            out.utilisation = masked_mean((routed.gates > 0).float(), real).detach()
        o = self.attn_norm(heads.flatten(1) + q)
        ff = F.dropout(
            self.ff2(F.dropout(F.relu(self.ff1(o)), self.dropout, self.training)), self.dropout, self.training
        )
        out.hidden = o + ff
        return out


@dataclass
class EncoderOutput:
    """``hidden [Nq, d]``; ``balance``: MoH ``L_b`` per routed block; ``utilisation``: block name -> ``[h]``."""

    hidden: torch.Tensor
    balance: list[torch.Tensor] = field(default_factory=list)
    utilisation: dict[str, torch.Tensor] = field(default_factory=dict)


class SequenceEncoder(nn.Module):
    """``num_blocks`` causal blocks + a final LayerNorm; ``window`` = the query length L (1 = SASRec)."""

    def __init__(
        self,
        dim: int,
        num_blocks: int = 1,
        num_heads: int = 1,
        dropout: float = 0.5,
        window: int = 1,
        attention: str = "mha",
        moh: dict | None = None,
    ) -> None:
        super().__init__()
        if window < 1 or num_blocks < 1:
            raise ConfigError(f"window and num_blocks must be >= 1, got {window} and {num_blocks}")
        self.window = window
        self.blocks = nn.ModuleList(
            CausalAttentionBlock(dim, num_heads, dropout, attention, moh) for _ in range(num_blocks)
        )
        self.final_norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, layout: Layout, last_only: bool = False) -> EncoderOutput:
        """Jagged ``x [N, d]`` -> hidden ``[N, d]`` (``[B, d]``, each row's newest item, if ``last_only``)."""
        out = EncoderOutput(hidden=x)
        for i, block in enumerate(self.blocks):
            query_in = causal_window_mean(x, layout, self.window)
            final = last_only and i == len(self.blocks) - 1
            step = block(query_in[layout.last] if final else query_in, x, layout, last_only=final)
            x = step.hidden
            if step.balance is not None:
                out.balance.append(step.balance)
                out.utilisation[f"block{i}"] = step.utilisation
        out.hidden = self.final_norm(x)
        return out
