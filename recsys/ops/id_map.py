"""Raw ids -> embedding-table rows on any device: the torch twin of :class:`recsys.bundle.IdMapper`.

Plain torch (no numpy, no polars), so the lookup can run where the model runs, on the batch already copied
there. Built from a bundle's id map by :meth:`recsys.bundle.IdMapper.to_torch`.
"""

from __future__ import annotations

import torch


class DeviceIdMap(torch.nn.Module):
    """Raw ids -> table rows, unseen ids -> -1, in one of the three forms of ``IdMapper``.

    * dense (``dense`` given): ``dense [high - low + 3]`` int64, the row of raw id ``r`` at slot
      ``r - low + 1``; slots ``0`` and ``-1`` hold ``-1`` and catch the ids below ``low`` / above ``high``.
    * sorted (``raw`` and ``rows`` given): ``raw [K]`` sorted int64 raw ids, ``rows [K]`` their table rows;
      looked up with ``torch.searchsorted`` (for raw id ranges too wide for a dense table).
    * identity (neither): ids are table rows already; those outside ``[1, limit]`` are unseen.

    The tables are buffers: ``.to(device)`` moves them.
    """

    def __init__(
        self,
        dense: torch.Tensor | None = None,
        low: int = 0,
        high: int = 0,
        raw: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        limit: int = 0,
    ) -> None:
        super().__init__()
        self.low, self.high, self.limit = low, high, limit
        self.register_buffer("dense", dense, persistent=False)
        self.register_buffer("raw", raw, persistent=False)
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (any integer dtype, any shape) -> int64 rows of the same shape, ``-1`` where unseen."""
        ids = ids.long()
        if self.dense is not None:
            return self.dense[ids.clamp(self.low - 1, self.high + 1) - (self.low - 1)]
        if self.raw is None:  # identity map
            return torch.where((ids >= 1) & (ids <= self.limit), ids, -1)
        if self.raw.numel() == 0:
            return torch.full_like(ids, -1)
        pos = torch.searchsorted(self.raw, ids).clamp(0, self.raw.numel() - 1)
        return torch.where(self.raw[pos] == ids, self.rows[pos], -1)
