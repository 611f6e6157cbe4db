"""The item-transition graph of TED (docs/seqrec.md), built with sparse tensor ops.

``A[i, j]`` = how often item ``j`` follows item ``i`` within ``span`` steps in the *training* sequences
(already truncated to the last ``max_len`` items); no reverse edges. The teacher reads each row scaled by
its maximum, ``Ã[i, :] = A[i, :] / max_j A[i, j]`` in [0, 1]. Stored as CSR over ids ``0..num_items``
(row and column 0, the padding id, stay empty). Only torch is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from recsys.errors import ConfigError


def transition_pairs(
    history: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, span: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination ids of every pair at distance ``1..span`` inside each training row.

    A training row holds ``history = s[:-1]`` and ``targets = s[1:]`` (jagged, same ``lengths [R]``), so
    the pair ``(s[p], s[p + d])`` is ``(history[p], targets[p + d - 1])`` for ``p + d - 1 < L``.
    Vectorised over rows and positions; the only loop is over ``d``. Returns two ``[P]`` int64 tensors.
    """
    if span < 1:
        raise ConfigError(f"span must be >= 1, got {span}")
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(history.numel(), device=history.device) - starts[rows]
    src, dst = [], []
    for d in range(1, span + 1):
        keep = pos + d - 1 < lengths[rows]
        idx = torch.nonzero(keep).squeeze(1)
        src.append(history[idx])
        dst.append(targets[idx + d - 1])
    return torch.cat(src), torch.cat(dst)


@dataclass
class TransitionGraph:
    """Row-max-normalised transition counts as CSR: ``crow [I + 2]``, ``col [nnz]``, ``weight [nnz]`` in (0, 1].

    ``counts [nnz]`` keeps the raw counts (same order); ``num_items`` excludes the padding id.
    """

    crow: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor
    num_items: int

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def to(self, device: torch.device | str) -> TransitionGraph:
        return TransitionGraph(
            self.crow.to(device), self.col.to(device), self.weight.to(device), self.counts.to(device), self.num_items
        )

    def row_ids(self) -> torch.Tensor:
        """``[nnz]`` row (source item) of each non-zero, the COO companion of ``col`` (no host sync)."""
        rows = torch.arange(self.num_items + 1, device=self.col.device)
        return torch.repeat_interleave(rows, self.crow[1:] - self.crow[:-1], output_size=self.nnz)

    def dense(self) -> torch.Tensor:
        """``[I + 1, I + 1]`` dense Ã (tests and small examples only)."""
        size = self.num_items + 1
        out = torch.zeros(size, size, dtype=self.weight.dtype, device=self.weight.device)
        out[self.row_ids(), self.col] = self.weight
        return out


def build_transition_graph(src: torch.Tensor, dst: torch.Tensor, num_items: int) -> TransitionGraph:
    """Coalesce ``(src, dst)`` pairs into counts, scale each row by its maximum, return CSR.

    ``src``/``dst``: ``[P]`` int64 ids in ``1..num_items``. One sparse coalesce, one scatter-amax, one bincount;
    no loops.
    """
    size = num_items + 1
    if src.numel() and (
        int(torch.minimum(src.min(), dst.min())) < 1 or int(torch.maximum(src.max(), dst.max())) > num_items
    ):
        raise ValueError(f"transition pairs must hold ids in [1, {num_items}]")
    coo = torch.sparse_coo_tensor(
        torch.stack([src, dst]), torch.ones(src.numel()), (size, size), check_invariants=False
    ).coalesce()  # sorted by (row, col): CSR order
    row, col = coo.indices()
    counts = coo.values()
    row_max = torch.zeros(size).scatter_reduce(0, row, counts, reduce="amax", include_self=False)
    crow = torch.zeros(size + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(row, minlength=size), 0, out=crow[1:])
    return TransitionGraph(
        crow=crow, col=col.contiguous(), weight=counts / row_max[row], counts=counts, num_items=num_items
    )
