"""The typed batches models consume: id features as one KeyedJaggedTensor, labels (and dense features) as dense
tensors. Plain torch + TorchRec (no polars), so the model core can import them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from recsys.compat import KeyedJaggedTensor

HIST_ITEM, HIST_CAT, TARGET_ITEM, TARGET_CAT = "hist_item", "hist_cat", "target_item", "target_cat"
CTR_KEYS = (HIST_ITEM, HIST_CAT, TARGET_ITEM, TARGET_CAT)


def _move(t: torch.Tensor | None, device: torch.device | str, non_blocking: bool) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=non_blocking)


def _pin(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.pin_memory()


@dataclass
class PaddedHistory:
    """The CTR ids at a fixed shape (the sync-free GPU path; built by the loader, not in the step).

    Shapes: ``hist_item, hist_cat [B, L]`` (oldest first, right-padded with id 0; ``L`` is the dataset's
    ``max_len``, the same for every batch; int32 when the ids fit, to halve the copy), ``lengths [B]`` (real
    slots per row), ``target_item, target_cat [B]``.
    """

    hist_item: torch.Tensor
    hist_cat: torch.Tensor
    lengths: torch.Tensor
    target_item: torch.Tensor
    target_cat: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PaddedHistory:
        return PaddedHistory(*(_move(t, device, non_blocking) for t in vars(self).values()))

    def pin_memory(self) -> PaddedHistory:
        return PaddedHistory(*(_pin(t) for t in vars(self).values()))


@dataclass
class CTRBatch:
    """One mini-batch of CTR samples.

    Attributes:
        sparse: KJT with keys ``hist_item, hist_cat`` (jagged, oldest first, lengths ``[B]``)
            and ``target_item, target_cat`` (one id per row); ``None`` in fixed-shape batches.
        labels: task name -> ``[B]`` float tensor of 0/1 (or real-valued for regression tasks).
        user: ``[B]`` int64 user ids (for GAUC and scoring output).
        dense: optional ``[B, F]`` float features (tabular backbones).
        padded: the ids at a fixed shape (:class:`PaddedHistory`), when the loader builds them
            (``data.fixed_shape``); backbones with local tables read them instead of ``sparse``.

    A batch has ``sparse``, ``padded`` or both.
    """

    sparse: KeyedJaggedTensor | None
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    user: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    padded: PaddedHistory | None = None

    @property
    def batch_size(self) -> int:
        return self.sparse.stride() if self.sparse is not None else self.padded.lengths.shape[0]

    @property
    def target_category(self) -> torch.Tensor:
        """``[B]`` category id of each target (for GAUC by category)."""
        return self.sparse[TARGET_CAT].values() if self.sparse is not None else self.padded.target_cat

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CTRBatch:
        """Move every tensor to ``device``; Lightning calls this to place batches."""
        return replace(
            self,
            sparse=None
            if self.sparse is None
            else self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            user=_move(self.user, device, non_blocking),
            dense=_move(self.dense, device, non_blocking),
            padded=None if self.padded is None else self.padded.to(device, non_blocking),
        )

    def pin_memory(self) -> CTRBatch:
        return replace(
            self,
            sparse=None if self.sparse is None else self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            user=_pin(self.user),
            dense=_pin(self.dense),
            padded=None if self.padded is None else self.padded.pin_memory(),
        )


def make_ctr_kjt(
    hist_item: torch.Tensor,
    hist_cat: torch.Tensor,
    hist_lengths: torch.Tensor,
    target_item: torch.Tensor,
    target_cat: torch.Tensor,
) -> KeyedJaggedTensor:
    """Pack flat history values (``[sum(L)]``) and ``[B]`` targets into the CTR KJT layout."""
    return ctr_kjt_from_values(torch.cat([hist_item, hist_cat, target_item, target_cat]), hist_lengths)


def ctr_kjt_from_values(values: torch.Tensor, hist_lengths: torch.Tensor) -> KeyedJaggedTensor:
    """The CTR KJT over ``values [2 sum(L) + 2B]`` already laid out as ``hist_item, hist_cat, target_item,
    target_cat`` (no copy), with history ``hist_lengths [B]``."""
    ones = torch.ones_like(hist_lengths)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(CTR_KEYS), values=values, lengths=torch.cat([hist_lengths, hist_lengths, ones, ones])
    )


@dataclass
class TabularBatch:
    """One mini-batch of tabular samples.

    Attributes:
        sparse: KJT with one key per categorical field, exactly one id per row (lengths all 1).
        dense: ``[B, D]`` float features (``D`` may be 0).
        labels: task name -> ``[B]`` float tensor.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.dense.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TabularBatch:
        """Move every tensor to ``device``; Lightning calls this to place batches."""
        return replace(
            self,
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            dense=self.dense.to(device, non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
        )

    def pin_memory(self) -> TabularBatch:
        return replace(
            self,
            sparse=self.sparse.pin_memory(),
            dense=self.dense.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
        )
