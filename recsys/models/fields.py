"""Embedding-fields backbone for tabular data: one TorchRec EmbeddingBag table per categorical field + dense features.

``TabularBatch`` -> features ``[B, C·D + n_dense]`` = concat(field embeddings (one id per field, SUM-pooled
bags of length 1), dense features). Tables are built on ``device`` (``meta`` for sharded builds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from recsys.compat import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from recsys.data.batch import TabularBatch
from recsys.errors import ConfigError
from recsys.models.target_attention import BackboneOutput


class FieldsBackbone(nn.Module):
    """Args:
    categorical: field -> number of table rows (ids ``0..rows-1``; 0 = unseen value).
    dense: names of the dense features (``batch.dense`` columns, in order).
    embedding_dim: width D of every field table.
    init_std: N(0, init_std) table init; ``None`` = TorchRec's default (uniform ±1/√rows).
    dropout: dropout on the concatenated features.
    device: table device.
    """

    def __init__(
        self,
        categorical: Mapping[str, int],
        dense: Sequence[str] = (),
        embedding_dim: int = 8,
        init_std: float | None = None,
        dropout: float = 0.0,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not categorical and not dense:
            raise ConfigError("FieldsBackbone needs at least one categorical field or dense feature")
        init = None if init_std is None else partial(nn.init.normal_, mean=0.0, std=init_std)
        configs = [
            EmbeddingBagConfig(
                name=f"field_{name}",
                embedding_dim=embedding_dim,
                num_embeddings=int(rows),
                feature_names=[name],
                pooling=PoolingType.SUM,
                init_fn=init,
            )
            for name, rows in categorical.items()
        ]
        self.tables = EmbeddingBagCollection(tables=configs, device=device) if configs else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fields, self.dense_names = list(categorical), list(dense)
        self.output_dim = len(configs) * embedding_dim + len(self.dense_names)

    def forward(self, batch: TabularBatch) -> BackboneOutput:
        parts = [self.tables(batch.sparse).values()] if self.tables is not None else []
        if self.dense_names:
            parts.append(batch.dense)
        return BackboneOutput(features=self.dropout(torch.cat(parts, dim=-1)))
