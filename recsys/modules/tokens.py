"""Behaviour tokens: item ⊕ category (⊕ position) embeddings on TorchRec EmbeddingCollection tables."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from recsys.compat import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from recsys.data.batch import HIST_CAT, HIST_ITEM, TARGET_CAT, TARGET_ITEM, CTRBatch, PaddedHistory
from recsys.data.vocab import Vocab
from recsys.ops.gather_rows import gather_rows, target_and_history_rows
from recsys.ops.jagged import jagged_to_padded_dense, lengths_to_offsets, padding_mask


@dataclass
class Tokens:
    """Target and history tokens of one role, split into a semantic and a position part.

    Shapes: ``target_sem [B, Ds]``, ``hist_sem [B, L, Ds]``, ``target_pos [B, Dp]``,
    ``hist_pos [B, L, Dp]`` (both ``None`` without position features), ``mask [B, L]`` (True = real slot).
    """

    target_sem: torch.Tensor
    hist_sem: torch.Tensor
    target_pos: torch.Tensor | None
    hist_pos: torch.Tensor | None
    mask: torch.Tensor

    @property
    def target(self) -> torch.Tensor:
        """``[B, Ds + Dp]``: the whole target token."""
        if self.target_pos is None:
            return self.target_sem
        return torch.cat([self.target_sem, self.target_pos], dim=-1)

    @property
    def history(self) -> torch.Tensor:
        """``[B, L, Ds + Dp]``: the whole history tokens."""
        if self.hist_pos is None:
            return self.hist_sem
        return torch.cat([self.hist_sem, self.hist_pos], dim=-1)


def history_positions(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, L]`` position ids: newest behaviour 1, older ones 2, 3, ...; padding slots 0 (the target's id)."""
    slots = torch.arange(max_len, device=lengths.device).unsqueeze(0)
    return (lengths.unsqueeze(1) - slots).clamp(min=0)


def pad_ids(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """Jagged ids ``[sum(L)]`` with ``offsets [B + 1]`` -> ``[B, max_len]`` right-padded with 0 (a view when
    every row is full)."""
    batch = offsets.numel() - 1
    if values.numel() == batch * max_len:  # every row has max_len ids
        return values.view(batch, max_len)
    if values.numel() == 0:
        return values.new_zeros(batch, max_len)
    lengths = offsets[1:] - offsets[:-1]
    slots = offsets[:-1].unsqueeze(1) + torch.arange(max_len, device=values.device).unsqueeze(0)
    return values[slots.clamp(max=values.numel() - 1)].masked_fill(~padding_mask(lengths, max_len), 0)


@dataclass
class HistoryIds:
    """A batch's ids laid out for direct table lookups (the input of every forward on local tables).

    Shapes: ``hist_item, hist_cat, positions, mask [B, L]`` (padding slots: id 0, position 0, mask False),
    ``target_item, target_cat [B]``. ``L`` is the batch's longest history (:meth:`from_kjt`, one host sync)
    or the loader's fixed width (:meth:`from_padded`, no sync).
    """

    hist_item: torch.Tensor
    hist_cat: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    target_item: torch.Tensor
    target_cat: torch.Tensor

    @classmethod
    def of(cls, batch: CTRBatch) -> HistoryIds:
        """The fixed-shape ids when the loader built them (``batch.padded``), else those of the KJT."""
        return cls.from_padded(batch.padded) if batch.padded is not None else cls.from_kjt(batch.sparse)

    @classmethod
    def from_padded(cls, padded: PaddedHistory) -> HistoryIds:
        """Shape-static (no host sync): positions and mask computed from ``lengths`` on the device."""
        width = padded.hist_item.shape[1]
        return cls(
            padded.hist_item.long(),  # the loader sends int32 ids when they fit (half the copy)
            padded.hist_cat.long(),
            history_positions(padded.lengths, width),
            padding_mask(padded.lengths, width),
            padded.target_item,
            padded.target_cat,
        )

    @classmethod
    def from_kjt(cls, sparse: KeyedJaggedTensor) -> HistoryIds:
        hist = sparse[HIST_ITEM]
        lengths = hist.lengths()
        max_len = max(int(lengths.max()), 1) if lengths.numel() else 1
        offsets = lengths_to_offsets(lengths)
        return cls(
            pad_ids(hist.values(), offsets, max_len),
            pad_ids(sparse[HIST_CAT].values(), offsets, max_len),
            history_positions(lengths, max_len),
            padding_mask(lengths, max_len),
            sparse[TARGET_ITEM].values(),
            sparse[TARGET_CAT].values(),
        )

    def split(self, rows: int) -> list[HistoryIds]:
        """Consecutive batch slices of at most ``rows`` rows (views)."""
        return [HistoryIds(*parts) for parts in zip(*(t.split(rows) for t in vars(self).values()))]

    def select(self, index: torch.Tensor) -> HistoryIds:
        """The history slots ``index [B, K]`` of each row (targets unchanged)."""
        hist = [t.gather(1, index) for t in (self.hist_item, self.hist_cat, self.positions, self.mask)]
        return HistoryIds(*hist, self.target_item, self.target_cat)


def _join(sem: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return sem if pos is None else torch.cat([sem, pos], dim=-1)


def gathered_dot(weight: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` dot products ``<weight[ids[b, l]], query[b]>`` for ``weight [rows, D]``, ``ids [B, L]``,
    ``query [B, D]``.

    Small tables (``rows <= 8 L``): a ``[B, rows]`` matmul of all dots, then a gather; larger tables:
    gathered rows ``[B, L, D]`` times the query, summed (measured faster than a batched matmul).
    """
    if weight.shape[0] <= 8 * ids.shape[1]:
        return (query @ weight.T).gather(1, ids)
    return (gather_rows(weight, ids) * query.unsqueeze(1)).sum(-1)


class TokenEmbedding(nn.Module):
    """Embeds the CTR KJT into :class:`Tokens` for one role ("att" or "repr").

    Args:
        role: table-name prefix, so two roles (DARE's attention and representation) get separate tables.
        vocab: id-space sizes (tables get ``num + 1`` rows; row 0 is padding, trainable but masked).
        dim: width of the item and of the category table (the semantic part is ``2 * dim``).
        pos_dim: width of the position table (0 = no position feature, as in DIN).
        max_positions: largest position id (the longest history).
        split_target: separate tables for target and history tokens (TWIN-4E's query/key split).
        init_std: N(0, init_std) initialisation of every table.
        device: where the EmbeddingCollection tables are built; ``torch.device("meta")`` lets
            DistributedModelParallel materialise each shard on its rank (position tables stay real).
        sparse_grad: direct lookups (:meth:`lookup`) give the tables sparse gradients (the rows a batch
            touched, for a sparse optimiser such as :class:`recsys.ops.sparse_update.RowWiseAdagrad`).
    """

    def __init__(
        self,
        role: str,
        vocab: Vocab,
        dim: int,
        pos_dim: int,
        max_positions: int,
        split_target: bool = False,
        init_std: float = 0.01,
        device: torch.device | None = None,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        self.sparse_grad = sparse_grad
        init = partial(nn.init.normal_, mean=0.0, std=init_std)
        configs: list[EmbeddingConfig] = []
        for feature, rows, hist, target in (
            ("item", vocab.num_items + 1, HIST_ITEM, TARGET_ITEM),
            ("category", vocab.num_categories + 1, HIST_CAT, TARGET_CAT),
        ):
            groups = [("hist", [hist]), ("target", [target])] if split_target else [("", [hist, target])]
            for suffix, features in groups:
                name = "_".join(p for p in (role, feature, suffix) if p)
                configs.append(
                    EmbeddingConfig(
                        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=features, init_fn=init
                    )
                )
        self.tables = EmbeddingCollection(tables=configs, device=device)
        self._table_of = {feature: c.name for c in configs for feature in c.feature_names}
        self._item_gram: torch.Tensor | None = None  # eval cache, see _item_dots
        self._item_gram_key: tuple = ()
        self.sem_dim, self.pos_dim = 2 * dim, pos_dim
        self.positions = nn.ModuleList()
        # Position tables are tiny dense weights (trained data-parallel, never sharded): under a sharded
        # build (device=meta) they stay on the default device, because DMP would re-create meta modules
        # with reset_parameters() (N(0, 1)) instead of N(0, init_std).
        pos_device = None if device is not None and torch.device(device).type == "meta" else device
        if pos_dim > 0:
            for _ in range(2 if split_target else 1):
                table = nn.Embedding(max_positions + 1, pos_dim, device=pos_device)
                init(table.weight)
                self.positions.append(table)

    @property
    def token_dim(self) -> int:
        return self.sem_dim + self.pos_dim

    @property
    def direct_lookup(self) -> bool:
        """True when the tables are plain local weights (not sharded), so the eval path can index them."""
        return type(self.tables) is EmbeddingCollection

    def _weight(self, feature: str) -> torch.Tensor:
        """``[rows, dim]``: the weight of the table that embeds ``feature``."""
        return self.tables.embeddings[self._table_of[feature]].weight

    def _embed(self, ids: torch.Tensor, feature: str) -> torch.Tensor:
        return gather_rows(self._weight(feature), ids, sparse=self.sparse_grad)

    def _target_parts(self, ids: HistoryIds) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Target tokens ``(sem [B, Ds], pos [B, Dp] or None)``; the target sits at position 0."""
        sem = torch.cat([self._embed(ids.target_item, TARGET_ITEM), self._embed(ids.target_cat, TARGET_CAT)], dim=-1)
        return sem, self._target_pos(sem.shape[0])

    def _target_pos(self, rows: int) -> torch.Tensor | None:
        """``[rows, Dp]``: the target's position token (position 0), or ``None`` without positions."""
        return self.positions[-1].weight[0].expand(rows, -1) if self.pos_dim > 0 else None

    def _history_pos(self, ids: HistoryIds) -> torch.Tensor | None:
        """``[B, L, Dp]``: the history slots' position tokens, or ``None`` without positions."""
        return gather_rows(self.positions[0].weight, ids.positions) if self.pos_dim > 0 else None

    def _history_parts(self, ids: HistoryIds) -> tuple[torch.Tensor, torch.Tensor | None]:
        """History tokens ``(sem [B, L, Ds], pos [B, L, Dp] or None)`` of the slots in ``ids``; padding slots get a
        zero semantic part (as the padded KJT path) and position 0."""
        sem = torch.cat([self._embed(ids.hist_item, HIST_ITEM), self._embed(ids.hist_cat, HIST_CAT)], dim=-1)
        return sem * ids.mask.unsqueeze(-1), self._history_pos(ids)

    def target_tokens(self, ids: HistoryIds) -> torch.Tensor:
        """``[B, token_dim]``: the whole target tokens (``Tokens.target`` of :meth:`lookup`)."""
        return _join(*self._target_parts(ids))

    def history_tokens(self, ids: HistoryIds) -> torch.Tensor:
        """``[B, K, token_dim]``: the whole history tokens of the slots in ``ids`` (``Tokens.history``)."""
        return _join(*self._history_parts(ids))

    def _target_and_history(
        self, ids: HistoryIds, target: torch.Tensor, hist: torch.Tensor, target_feature: str, hist_feature: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``target [B]``, ``hist [B, L]`` ids -> rows ``[B, D]``, ``[B, L, D]`` (padding slots of ``ids.mask``
        zero); one lookup when both features share a table, so the table gets one sparse gradient per step (two
        would be summed, and the sum of sparse gradients coalesces: a host sync)."""
        if self._table_of[target_feature] != self._table_of[hist_feature]:
            return self._embed(target, target_feature), self._embed(hist, hist_feature) * ids.mask.unsqueeze(-1)
        return target_and_history_rows(self._weight(hist_feature), target, hist, ids.mask, sparse=self.sparse_grad)

    def lookup(self, ids: HistoryIds) -> Tokens:
        """:class:`Tokens` by direct lookups in local tables: the same values as :meth:`forward` on the KJT,
        with no jagged op and, for fixed-shape ids, no host sync (one lookup per table)."""
        t_item, h_item = self._target_and_history(ids, ids.target_item, ids.hist_item, TARGET_ITEM, HIST_ITEM)
        t_cat, h_cat = self._target_and_history(ids, ids.target_cat, ids.hist_cat, TARGET_CAT, HIST_CAT)
        target_sem = torch.cat([t_item, t_cat], dim=-1)
        hist_sem = torch.cat([h_item, h_cat], dim=-1)
        return Tokens(target_sem, hist_sem, self._target_pos(target_sem.shape[0]), self._history_pos(ids), ids.mask)

    GRAM_LIMIT = 1 << 25  # entries of the cached target x history item dot table (128 MiB of float32)

    def _item_dots(self, ids: HistoryIds, query: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` item parts ``<q_item, k_item>`` of the scores (``query [B, dim]`` = the target items' rows).

        Without autograd and for item tables of at most ``GRAM_LIMIT`` target x history rows, they are read
        from the table of all target-history dots ``G = W_target W_hist^T``, computed once per weight version
        (a gather per slot instead of a ``dim``-wide row gather and product). Weights created under
        ``torch.inference_mode`` have no version counter, so they take the gathered-rows path.
        """
        hist_w, target_w = self._weight(HIST_ITEM), self._weight(TARGET_ITEM)
        if (
            torch.is_grad_enabled()
            or hist_w.is_inference()
            or target_w.is_inference()
            or hist_w.shape[0] * target_w.shape[0] > self.GRAM_LIMIT
        ):
            return gathered_dot(hist_w, ids.hist_item, query)
        key = tuple((w.data_ptr(), w._version) for w in (target_w, hist_w))
        if key != self._item_gram_key:
            self._item_gram, self._item_gram_key = target_w @ hist_w.T, key
        return self._item_gram.index_select(0, ids.target_item).gather(1, ids.hist_item)

    def dot_scores(self, ids: HistoryIds) -> torch.Tensor:
        """``[B, L]`` target-to-history scores ``<q_sem, k_sem>/sqrt(D_sem) + <q_pos, k_pos>/sqrt(D_pos)``
        (:class:`DotScorer` on this role's tokens) without building the ``[B, L, token_dim]`` history."""
        query = self.target_tokens(ids)
        dim = self.sem_dim // 2
        sem = self._item_dots(ids, query[:, :dim]) + gathered_dot(
            self._weight(HIST_CAT), ids.hist_cat, query[:, dim : self.sem_dim]
        )
        scores = sem / math.sqrt(self.sem_dim)
        if self.pos_dim > 0:
            pos = gathered_dot(self.positions[0].weight, ids.positions, query[:, self.sem_dim :])
            scores = scores + pos / math.sqrt(self.pos_dim)
        return scores

    def forward(self, sparse: KeyedJaggedTensor) -> Tokens:
        """:class:`Tokens` through the collection's own lookup (the path of sharded tables)."""
        out = self.tables(sparse)
        hist = out[HIST_ITEM]
        lengths = hist.lengths()
        max_len = max(int(lengths.max()), 1) if lengths.numel() else 1
        hist_values = torch.cat([hist.values(), out[HIST_CAT].values()], dim=-1)
        # offsets through recsys.ops (torchrec's own call needs FBGEMM kernels on the device)
        hist_sem = jagged_to_padded_dense(hist_values, lengths_to_offsets(lengths), max_len)
        target_sem = torch.cat([out[TARGET_ITEM].values(), out[TARGET_CAT].values()], dim=-1)
        target_pos = hist_pos = None
        if self.pos_dim > 0:
            hist_table, target_table = self.positions[0], self.positions[-1]
            hist_pos = hist_table(history_positions(lengths, max_len))
            target_pos = target_table.weight[0].expand(target_sem.shape[0], -1)
        return Tokens(target_sem, hist_sem, target_pos, hist_pos, padding_mask(lengths, max_len))


class PartProjection(nn.Module):
    """Bias-free square maps applied separately to the item, category and position parts of tokens.

    One instance per (role, side): TWIN w/ proj. uses four (att-target, att-history, repr-target,
    repr-history), i.e. 12 matrices with three parts.
    """

    def __init__(self, dim: int, pos_dim: int) -> None:
        super().__init__()
        self.item = nn.Linear(dim, dim, bias=False)
        self.category = nn.Linear(dim, dim, bias=False)
        self.position = nn.Linear(pos_dim, pos_dim, bias=False) if pos_dim > 0 else None
        self.dim = dim

    def forward(self, sem: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        item, category = sem.split(self.dim, dim=-1)
        sem = torch.cat([self.item(item), self.category(category)], dim=-1)
        if pos is not None and self.position is not None:
            pos = self.position(pos)
        return sem, pos
