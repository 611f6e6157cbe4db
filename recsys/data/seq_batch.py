"""The typed batch of sequential (next-item) models: item ids as one KeyedJaggedTensor.

Imports only torch and torchrec, so the GPU benchmark (no polars/Lightning) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from recsys.compat import KeyedJaggedTensor
from recsys.data.batch import TARGET_ITEM

SEQ_ITEM, EXCLUDE_ITEM = "seq_item", "exclude_item"
SEQ_KEYS = (SEQ_ITEM, TARGET_ITEM, EXCLUDE_ITEM)


@dataclass
class SeqBatch:
    """One mini-batch of user sequences.

    Attributes:
        sparse: KJT with three keys, each jagged over the ``B`` rows:
            ``seq_item``: the model input, oldest first, ``1 <= L_b <= max_len``;
            ``target_item``: the next item after each input position (training rows: ``L_b`` targets,
            aligned with ``seq_item``) or after the last position only (evaluation rows: 1 target);
            ``exclude_item``: items removed from the ranking at evaluation (empty for training rows).
        user: ``[B]`` int64 user ids.
    """

    sparse: KeyedJaggedTensor
    user: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.sparse.stride()

    def jagged(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [sum(L)], lengths [B])`` of one key."""
        jt = self.sparse[key]
        return jt.values(), jt.lengths()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SeqBatch:
        """Move every tensor to ``device``; Lightning calls this to place batches."""
        return replace(
            self,
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            user=None if self.user is None else self.user.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> SeqBatch:
        return replace(
            self, sparse=self.sparse.pin_memory(), user=None if self.user is None else self.user.pin_memory()
        )


def make_seq_kjt(
    seq: tuple[torch.Tensor, torch.Tensor],
    target: tuple[torch.Tensor, torch.Tensor],
    exclude: tuple[torch.Tensor, torch.Tensor],
) -> KeyedJaggedTensor:
    """Pack three ``(values [sum(L)], lengths [B])`` pairs into the :data:`SEQ_KEYS` layout."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SEQ_KEYS),
        values=torch.cat([seq[0], target[0], exclude[0]]),
        lengths=torch.cat([seq[1], target[1], exclude[1]]),
    )
