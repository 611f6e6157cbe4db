"""The typed batch every model consumes: id features as one KeyedJaggedTensor, labels as dense tensors."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from recsys.compat import KeyedJaggedTensor

HIST_ITEM, HIST_CAT, TARGET_ITEM, TARGET_CAT = "hist_item", "hist_cat", "target_item", "target_cat"
CTR_KEYS = (HIST_ITEM, HIST_CAT, TARGET_ITEM, TARGET_CAT)


@dataclass
class CTRBatch:
    """One mini-batch of CTR samples.

    Attributes:
        sparse: KJT with keys ``hist_item, hist_cat`` (jagged, oldest first, lengths ``[B]``)
            and ``target_item, target_cat`` (one id per row).
        labels: task name -> ``[B]`` float tensor of 0/1 (or real-valued for regression tasks).
        user: ``[B]`` int64 user ids (for GAUC and scoring output).
        dense: optional ``[B, F]`` float features (tabular backbones).
    """

    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor] = field(default_factory=dict)
    user: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.sparse.stride()

    @property
    def target_category(self) -> torch.Tensor:
        """``[B]`` category id of each target (for GAUC by category)."""
        return self.sparse[TARGET_CAT].values()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CTRBatch:
        """Move every tensor to ``device``; Lightning calls this to place batches."""
        return replace(
            self,
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            user=None if self.user is None else self.user.to(device, non_blocking=non_blocking),
            dense=None if self.dense is None else self.dense.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> CTRBatch:
        return replace(
            self,
            sparse=self.sparse.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            user=None if self.user is None else self.user.pin_memory(),
            dense=None if self.dense is None else self.dense.pin_memory(),
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
