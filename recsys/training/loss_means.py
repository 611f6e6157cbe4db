"""Epoch means of a training step's named losses, summed on the device.

Lightning's ``self.log(..., on_epoch=True)`` keeps such means too, but each call costs host work (it moves the
result metric to the value's device and updates it: four calls a step were the largest host item of the graphed
DARE step at Taobao scale, ``benchmarks/results/scale.md``). Here a step adds its losses with one stacked
device op and nothing reaches the host until the epoch's means are asked for. Plain torch.
"""

from __future__ import annotations

import torch


class LossMeans:
    """Batch-size-weighted running sums of ``{name: scalar loss}``, one ``[n]`` tensor on the losses' device.

    The names (and their order) are fixed by the first :meth:`add` after a reset; a step with other names is a
    programming error.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.names: tuple[str, ...] = ()
        self.sums: torch.Tensor | None = None
        self.rows = 0

    def add(self, losses: dict[str, torch.Tensor], rows: int) -> None:
        """Add one step's scalar losses (each weighted by the step's ``rows``)."""
        names = tuple(losses)
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]) * rows
        if self.sums is None:
            self.names, self.sums = names, values
        elif names != self.names:
            raise RuntimeError(f"a step's losses {names} differ from the epoch's {self.names}")
        else:
            self.sums = self.sums + values
        self.rows += rows

    def pop(self) -> dict[str, torch.Tensor]:
        """The means so far (``{}`` if nothing was added), then start again."""
        if self.sums is None or self.rows == 0:
            return {}
        means = self.sums / self.rows
        out = {name: means[i] for i, name in enumerate(self.names)}
        self.reset()
        return out
