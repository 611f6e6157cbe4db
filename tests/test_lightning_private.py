"""The Lightning private API the sharded strategy uses (recsys/distributed/lightning_private.py) is pinned to the
range it was checked against, and still behaves as the adapter assumes."""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
import torch

from recsys.distributed import lightning_private as private


def test_installed_lightning_is_in_the_checked_range():
    private.check_lightning_version()  # raises outside CHECKED
    assert private.CHECKED == ((2, 6), (2, 7)), "widen CHECKED only after re-reading the private API"
    for bad in ("2.5.9", "2.7.0", "3.0.0"):
        with pytest.raises(RuntimeError, match="checked against pytorch-lightning >=2.6,<2.7"):
            private.check_lightning_version(bad)


def test_ddp_strategy_still_does_what_the_adapter_copies():
    """The adapter mirrors DDPStrategy.post_backward's static-graph flush and the forward redirection's sync
    switch; if Lightning changes them, these source checks fail before a distributed run misbehaves."""
    from pytorch_lightning.strategies.ddp import DDPStrategy, _DDPForwardRedirection

    post = inspect.getsource(DDPStrategy.post_backward)
    assert "reducer._delay_all_reduce()" in post and "_pl_static_graph_delay_done" in post
    assert "require_backward_grad_sync = False" in inspect.getsource(_DDPForwardRedirection.on_after_inner_forward)
    assert "require_backward_grad_sync = True" in inspect.getsource(_DDPForwardRedirection.on_after_outer_forward)


def test_redirection_switches_sync_on_the_inner_ddp():
    class Fake(torch.nn.parallel.DistributedDataParallel):
        def __init__(self):  # no process group: only the flag is used
            torch.nn.Module.__init__(self)
            self.require_backward_grad_sync = True

    inner, wrapper = Fake(), torch.nn.Module()
    module = pl.LightningModule()
    module.automatic_optimization = False
    redirection = private.DMPForwardRedirection(lambda m: inner if m is wrapper else None)
    redirection.on_after_inner_forward(wrapper, module)
    assert inner.require_backward_grad_sync is False
    redirection.on_after_outer_forward(wrapper, module)
    assert inner.require_backward_grad_sync is True
