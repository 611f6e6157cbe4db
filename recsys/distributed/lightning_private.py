"""The one place that touches Lightning's (and DDP's) private API; everything else uses public names.

``TorchRecStrategy`` keeps Lightning's DDP behaviour under manual optimisation, for the DDP that TorchRec's
DistributedModelParallel wraps around the dense part. Lightning does that with private pieces:

* ``pytorch_lightning.strategies.ddp._DDPForwardRedirection``: switches DDP's gradient sync off around the
  inner forward and back on after it (``manual_backward`` syncs instead);
* ``pytorch_lightning.overrides.distributed.prepare_for_backward``: DDP's pre-backward bookkeeping;
* ``DistributedDataParallel.reducer._delay_all_reduce()``: the first static-graph iteration's bucket flush,
  which Lightning's ``DDPStrategy.post_backward`` calls once (flag ``_pl_static_graph_delay_done``).

They were checked against :data:`CHECKED` (tests/test_lightning_private.py fails outside it, and
:func:`check_lightning_version` refuses to run the sharded strategy on another version: re-read
``pytorch_lightning/strategies/ddp.py`` and widen the range only after checking these names still do the same).
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.overrides.distributed import prepare_for_backward
from pytorch_lightning.strategies.ddp import _DDPForwardRedirection
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: Lightning versions (>= low, < high) whose private API above was read and tested.
CHECKED = ((2, 6), (2, 7))

__all__ = ["CHECKED", "DMPForwardRedirection", "check_lightning_version", "flush_first_static_graph_step"]
__all__ += ["prepare_for_backward"]


def version_tuple(version: str) -> tuple[int, int]:
    """``"2.6.6"`` -> ``(2, 6)``."""
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_lightning_version(version: str = pl.__version__) -> None:
    """Raise ``RuntimeError`` when ``version`` is outside :data:`CHECKED`."""
    low, high = CHECKED
    if not low <= version_tuple(version) < high:
        raise RuntimeError(
            f"recsys/distributed/lightning_private.py was checked against pytorch-lightning "
            f">={low[0]}.{low[1]},<{high[0]}.{high[1]}; found {version}. Re-check the private API it uses."
        )


class DMPForwardRedirection(_DDPForwardRedirection):
    """Lightning's DDP forward redirection, pointed at the DDP inside DMP (``inner(wrapper)``)."""

    def __init__(self, inner) -> None:
        super().__init__()
        self._inner = inner

    def on_after_inner_forward(self, wrapper_module: nn.Module, original_module: pl.LightningModule) -> None:
        super().on_after_inner_forward(self._inner(wrapper_module) or wrapper_module, original_module)

    def on_after_outer_forward(self, wrapper_module: nn.Module, original_module: pl.LightningModule) -> None:
        super().on_after_outer_forward(self._inner(wrapper_module) or wrapper_module, original_module)


def flush_first_static_graph_step(ddp: DistributedDataParallel) -> None:
    """What ``DDPStrategy.post_backward`` does once under manual optimisation with ``static_graph=True``."""
    ddp.reducer._delay_all_reduce()
