"""The typed batch of sequential (next-item) models: item ids as one KeyedJaggedTensor, or, for training on a
GPU, at a fixed shape (:class:`PaddedSeq`: what a CUDA graph of the step needs).

Imports only torch and torchrec, so the GPU benchmark (no polars/Lightning) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from recsys.compat import KeyedJaggedTensor
from recsys.data.batch import TARGET_ITEM

SEQ_ITEM, EXCLUDE_ITEM = "seq_item", "exclude_item"
SEQ_KEYS = (SEQ_ITEM, TARGET_ITEM, EXCLUDE_ITEM)


#: the real-token count of a padded batch is rounded up to a multiple of this: the losses' full-softmax runs on the
#: real tokens only (``[C, I]``, not ``[B T, I]``) while the batch keeps one of a few shapes (a CUDA graph each)
TOKEN_QUANTUM = 512


@dataclass
class PaddedSeq:
    """Training sequences at a fixed shape (built by the loader, not in the step: :func:`padded_seq`).

    Shapes: ``items, targets [B, T]`` (``T`` = the dataset's ``max_len`` for every batch; oldest first,
    right-padded with id 0; ``targets[b, t]`` is the item after ``items[b, t]``; int32 when the ids fit),
    ``lengths [B]`` int64 (real slots per row, >= 1), ``real_index [C]`` int64: the flat slots (``b T + t``) of the
    ``R = sum(lengths)`` real tokens, then ``C - R`` zeros (slot 0, real, counted with weight 0), ``C`` = ``R``
    rounded up to a multiple of :data:`TOKEN_QUANTUM` (at most ``B T``).
    """

    items: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    real_index: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedSeq:
        return PaddedSeq(*(t.to(device, non_blocking=non_blocking) for t in vars(self).values()))

    def pin_memory(self) -> PaddedSeq:
        return PaddedSeq(*(t.pin_memory() for t in vars(self).values()))

    def real(self) -> torch.Tensor:
        """``[C]`` bool: which entries of ``real_index`` are real tokens (the first ``sum(lengths)``)."""
        return torch.arange(self.real_index.shape[0], device=self.lengths.device) < self.lengths.sum()


def padded_seq(
    items: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, quantum: int = TOKEN_QUANTUM
) -> PaddedSeq:
    """``items, targets [B, T]`` (right-padded) and ``lengths [B]`` -> :class:`PaddedSeq` with its ``real_index``."""
    width = items.shape[1]
    slots = (torch.arange(width) < lengths.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
    capacity = min(-(-slots.numel() // quantum) * quantum, items.numel())
    real_index = torch.zeros(capacity, dtype=torch.int64)
    real_index[: slots.numel()] = slots
    return PaddedSeq(items, targets, lengths, real_index)


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
        padded: training rows at a fixed shape (:class:`PaddedSeq`) instead of ``sparse`` (``data.fixed_shape``).

    A batch has ``sparse`` or ``padded``; evaluation batches are always ``sparse``.
    """

    sparse: KeyedJaggedTensor | None
    user: torch.Tensor | None = None
    padded: PaddedSeq | None = None

    @property
    def batch_size(self) -> int:
        return self.sparse.stride() if self.sparse is not None else self.padded.lengths.shape[0]

    def tokens(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per token of a training batch's losses: ``(ids [N], real [N] bool or None)`` of ``seq_item`` (the input
        items) or ``target_item`` (the items after them). Jagged batches: ``N = sum(L)`` real tokens, ``real``
        None; padded ones: the ``N = C`` entries of ``real_index``, ``real`` False on the fill."""
        if self.padded is None:
            return self.sparse[key].values(), None
        ids = {SEQ_ITEM: self.padded.items, TARGET_ITEM: self.padded.targets}[key]
        return self.token_rows(ids.reshape(-1)), self.padded.real()

    def token_rows(self, values: torch.Tensor) -> torch.Tensor:
        """The rows of a per-slot tensor ``values [B T, ...]`` (or ``[sum(L), ...]`` when jagged) that
        :meth:`tokens` describes: ``values`` itself when jagged, ``values[real_index]`` when padded."""
        return values if self.padded is None else values[self.padded.real_index]

    def jagged(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [sum(L)], lengths [B])`` of one key."""
        jt = self.sparse[key]
        return jt.values(), jt.lengths()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SeqBatch:
        """Move every tensor to ``device``; Lightning calls this to place batches."""
        sparse = self.sparse
        return replace(
            self,
            sparse=None if sparse is None else sparse.to(device=torch.device(device), non_blocking=non_blocking),
            user=None if self.user is None else self.user.to(device, non_blocking=non_blocking),
            padded=None if self.padded is None else self.padded.to(device, non_blocking),
        )

    def pin_memory(self) -> SeqBatch:
        return replace(
            self,
            sparse=None if self.sparse is None else self.sparse.pin_memory(),
            user=None if self.user is None else self.user.pin_memory(),
            padded=None if self.padded is None else self.padded.pin_memory(),
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
