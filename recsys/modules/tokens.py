"""Behaviour tokens: item ⊕ category (⊕ position) embeddings on TorchRec EmbeddingCollection tables."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Optional

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batch import HIST_CAT, HIST_ITEM, TARGET_CAT, TARGET_ITEM
from recsys.data.vocab import Vocab
from recsys.ops.jagged import jagged_to_padded_dense, lengths_to_offsets, padding_mask


@dataclass
class Tokens:
    """Target and history tokens of one role, split into a semantic and a position part.

    Shapes: ``target_sem [B, Ds]``, ``hist_sem [B, L, Ds]``, ``target_pos [B, Dp]``,
    ``hist_pos [B, L, Dp]`` (both ``None`` without position features), ``mask [B, L]`` (True = real slot).
    """

    target_sem: torch.Tensor
    hist_sem: torch.Tensor
    target_pos: Optional[torch.Tensor]
    hist_pos: Optional[torch.Tensor]
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
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        init = partial(nn.init.normal_, mean=0.0, std=init_std)
        configs: List[EmbeddingConfig] = []
        for feature, rows, hist, target in (
            ("item", vocab.num_items + 1, HIST_ITEM, TARGET_ITEM),
            ("category", vocab.num_categories + 1, HIST_CAT, TARGET_CAT),
        ):
            groups = [("hist", [hist]), ("target", [target])] if split_target else [("", [hist, target])]
            for suffix, features in groups:
                name = "_".join(p for p in (role, feature, suffix) if p)
                configs.append(
                    EmbeddingConfig(name=name, embedding_dim=dim, num_embeddings=rows,
                                    feature_names=features, init_fn=init)
                )
        self.tables = EmbeddingCollection(tables=configs, device=device)
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

    def forward(self, sparse: KeyedJaggedTensor) -> Tokens:
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

    def forward(self, sem: torch.Tensor, pos: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        item, category = sem.split(self.dim, dim=-1)
        sem = torch.cat([self.item(item), self.category(category)], dim=-1)
        if pos is not None and self.position is not None:
            pos = self.position(pos)
        return sem, pos
