"""SASRec: causal self-attention over the item sequence, scored against the shared item table.

The layout follows the official MQSA-TED code's SASRec setting (its α = 1, λ_kd = 0;
docs/seqrec.md): inputs ``x_t = Dropout(√d e_{s_t} + p_t)`` (jagged: no padding) with learned absolute
positions (the newest item always at position ``max_len - 1``), one query-pre-LN block per default,
dropout 0.5, the item table (a TorchRec ``EmbeddingCollection``) shared by input and output.

The output layer is tied to the item table: :meth:`SASRec.forward` returns the ``[I + 1, d]`` item matrix
beside the hidden states (``SeqOutput.table``). Unsharded it is the table's weight itself; once
DistributedModelParallel has sharded the table (row- or table-wise) no rank holds the whole weight, so
the matrix comes from the same collection lookup as the inputs: ids ``0..I`` are appended to the batch's
KeyedJaggedTensor as one extra jagged row. One lookup per step keeps TorchRec's fused backward exact (a
row's gradients from input and output are summed before its one optimiser update).

:class:`SASRec` also carries the TED settings (``lambda_kd``, ``tau``, ``kd_span``) so that SASRec + TED is
a valid model; the task computes the losses (``recsys/losses/sequential.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from recsys.compat import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from recsys.data.seq_batch import SEQ_ITEM, SeqBatch
from recsys.errors import ConfigError
from recsys.modules.seq_blocks import Layout, PaddedLayout, SequenceEncoder

if TYPE_CHECKING:  # schema.py imports polars, which the GPU benchmark does not have
    from recsys.data.vocab import Vocab

ITEM_TABLE = "item"


@dataclass
class SeqOutput:
    """What sequential models return.

    Attributes:
        hidden: ``[N, d]`` representation of every input item (jagged, in the batch's ``seq_item`` order,
            so row ``n`` predicts the ``n``-th ``target_item`` of a training batch; ``N = B T`` slots of a padded
            batch, padding included: :meth:`SeqBatch.tokens` marks the real ones), or ``[B, d]`` for each
            row's newest item (``last_only``).
        lengths: ``[B]`` items per row.
        aux_losses: name -> weighted scalar regularisers (MoH load balance), to add to the loss.
        extras: diagnostics, e.g. ``moh_util/<branch>/block<i>`` -> ``[h]`` head utilisation.
        table: ``[I + 1, d]`` item matrix the output layer scores against (row 0 = padding), or ``None``
            when not asked for (``with_table=False``).
    """

    hidden: torch.Tensor
    lengths: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    table: torch.Tensor | None = None


class SASRec(nn.Module):
    """Self-attentive sequential recommender.

    Args:
        vocab: id-space sizes (``vocab.num_items``; the table has ``num_items + 1`` rows, row 0 = padding).
        max_len: longest input (number of position embeddings).
        dim: embedding and hidden width ``d``.
        num_blocks / num_heads / dropout: encoder shape (official: 1 / 1 / 0.5).
        attention: ``"mha"`` or ``"moh"`` (Mixture-of-Head gates; ``moh`` holds shared_heads, routed_topk,
            router, balance_weight and optionally num_heads, which replaces ``num_heads`` under MoH).
        lambda_kd / tau / kd_span: TED distillation weight, temperature and transition span (0 = no TED).
        init_std: N(0, init_std) for the item and position tables (dense layers use Glorot, as the code).
        device: table device (``meta`` for DistributedModelParallel; the position table, a dense weight,
            then stays on the default device, as DMP would re-create meta modules with their own init).

    Attributes:
        table_by_lookup: take the output matrix from the collection lookup even when the table is unsharded
            (the path sharded tables always use; the results are the same, tests compare both).
    """

    def __init__(
        self,
        vocab: Vocab,
        max_len: int,
        dim: int = 64,
        num_blocks: int = 1,
        num_heads: int = 1,
        dropout: float = 0.5,
        attention: str = "mha",
        moh: Mapping | None = None,
        lambda_kd: float = 0.0,
        tau: float = 0.1,
        kd_span: int = 1,
        init_std: float = 0.01,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if tau <= 0 or lambda_kd < 0:
            raise ConfigError(f"need tau > 0 and lambda_kd >= 0, got tau={tau}, lambda_kd={lambda_kd}")
        self.num_items, self.max_len, self.dim, self.dropout = vocab.num_items, max_len, dim, dropout
        self.output_dim = dim
        self.lambda_kd, self.tau, self.kd_span = lambda_kd, tau, kd_span
        moh = dict(moh or {})
        self.balance_weight = float(moh.pop("balance_weight", 0.01))
        moh_heads = moh.pop("num_heads", None)
        if attention == "moh" and moh_heads is not None:
            num_heads = int(moh_heads)
        self._encoder_args = dict(
            dim=dim, num_blocks=num_blocks, num_heads=num_heads, dropout=dropout, attention=attention, moh=moh
        )
        init = partial(nn.init.normal_, mean=0.0, std=init_std)
        self.item_embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=ITEM_TABLE,
                    embedding_dim=dim,
                    num_embeddings=self.num_items + 1,
                    feature_names=[SEQ_ITEM],
                    init_fn=init,
                )
            ],
            device=device,
        )
        self.table_by_lookup = False
        pos_device = None if device is not None and torch.device(device).type == "meta" else device
        self.positions = nn.Embedding(max_len, dim, device=pos_device)
        if self.positions.weight.device.type != "meta":
            init(self.positions.weight)
        self.encoders = nn.ModuleDict({"short": self.make_encoder(window=1)})

    def make_encoder(self, window: int) -> SequenceEncoder:
        return SequenceEncoder(window=window, **self._encoder_args)

    def branch_weights(self) -> dict[str, float]:
        """Mixing weight of each encoder's output (SASRec: the one short-query branch)."""
        return {"short": 1.0}

    @property
    def sharded(self) -> bool:
        """True once DistributedModelParallel has replaced the item collection by its sharded version."""
        return not isinstance(self.item_embeddings, EmbeddingCollection)

    def item_table(self) -> torch.Tensor:
        """``[I + 1, d]`` item embedding parameter (row 0 = padding), shared by input and output; unsharded
        tables only (a sharded model's matrix is ``forward(...).table``)."""
        if self.sharded:
            raise RuntimeError("the item table is sharded: no rank holds its weight; use forward(batch).table")
        return self.item_embeddings.embeddings[ITEM_TABLE].weight

    def lookup(self, batch: SeqBatch, with_table: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input item embeddings ``[N, d]`` (``seq_item`` order; ``N = B T`` slots of a padded batch) and the
        item matrix ``[I + 1, d]`` (``None`` without ``with_table``), from one collection call.

        The matrix is the table's weight when unsharded (the batch's KJT goes in as it is), else (or with
        :attr:`table_by_lookup`) the embeddings of ids ``0..I``, looked up as one extra jagged row after the
        batch's ``B`` rows (a one-key KJT of stride ``B + 1``; a sharded collection always gets one-key KJTs,
        as it fixes its input features at the first call), so its gradient reaches the table through the
        same (fused) backward.
        """
        if batch.padded is not None:  # fixed-shape rows: the local table's module on every slot
            if self.sharded:
                raise ValueError("fixed-shape batches (data.fixed_shape) need the local item table, not a sharded one")
            values = self.item_embeddings.embeddings[ITEM_TABLE](batch.padded.items.reshape(-1))
            return values, self.item_table() if with_table else None
        if not (self.sharded or self.table_by_lookup):
            values = self.item_embeddings(batch.sparse)[SEQ_ITEM].values()
            return values, self.item_table() if with_table else None
        ids, lengths = batch.jagged(SEQ_ITEM)
        if with_table:
            ids = torch.cat([ids, torch.arange(self.num_items + 1, device=ids.device, dtype=ids.dtype)])
            lengths = torch.cat([lengths, lengths.new_full((1,), self.num_items + 1)])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[SEQ_ITEM], values=ids, lengths=lengths)
        values = self.item_embeddings(kjt)[SEQ_ITEM].values()
        if with_table:
            return values[: -(self.num_items + 1)], values[-(self.num_items + 1) :]
        return values, None

    def embed(self, batch: SeqBatch, with_table: bool = True) -> tuple[torch.Tensor, Layout, torch.Tensor | None]:
        """Inputs ``x [N, d] = Dropout(√d e + p)`` (jagged, or the slots of a padded batch), each row's newest item
        at position ``max_len - 1``; their layout; the item matrix ``[I + 1, d]`` or ``None`` (see :meth:`lookup`)."""
        items, table = self.lookup(batch, with_table)
        if batch.padded is not None:
            layout: Layout = PaddedLayout(batch.padded.lengths, batch.padded.items.shape[1])
        else:
            layout = Layout(batch.jagged(SEQ_ITEM)[1], total=items.shape[0])  # the token count is known on the host
        if layout.width > self.max_len:
            raise ValueError(f"a sequence has {layout.width} items, more than max_len={self.max_len}")
        # padding slots (position >= length) take the last position: their outputs are dropped
        slot = layout.position + (self.max_len - layout.lengths)[layout.rows]
        pos = self.positions(slot.clamp_max(self.max_len - 1))
        x = nn.functional.dropout(items * math.sqrt(self.dim) + pos, self.dropout, self.training)
        return x, layout, table

    def forward(self, batch: SeqBatch, last_only: bool = False, with_table: bool = True) -> SeqOutput:
        """Mix the branches' hidden states; ``last_only`` returns ``[B, d]`` for the newest position only;
        ``with_table`` also returns the item matrix of the tied output layer (``SeqOutput.table``)."""
        x, layout, table = self.embed(batch, with_table)
        hidden: torch.Tensor | None = None
        balance, extras = [], {}
        for name, weight in self.branch_weights().items():
            if weight == 0.0:
                continue  # exactly the other branch alone (α = 1 is SASRec)
            enc = self.encoders[name](x, layout, last_only)
            part = enc.hidden if weight == 1.0 else weight * enc.hidden
            hidden = part if hidden is None else hidden + part
            balance += enc.balance
            extras.update({f"moh_util/{name}/{k}": v for k, v in enc.utilisation.items()})
        aux = {}
        if balance and self.training and self.balance_weight > 0:
            aux["moh_balance"] = self.balance_weight * torch.stack(balance).mean()
        return SeqOutput(hidden, layout.lengths, aux, extras, table)
