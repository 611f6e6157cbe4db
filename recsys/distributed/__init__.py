"""Scaling out: TorchRec DistributedModelParallel under Lightning (see docs/distributed.md).

- :mod:`~recsys.distributed.env`: launcher environment, the DMP-or-unsharded decision (``sharding`` tag);
- :mod:`~recsys.distributed.planner`: per-table sharding constraints and the plan, from Hydra;
- :mod:`~recsys.distributed.optim`: fused (in-backward) table optimisers;
- :mod:`~recsys.distributed.checkpoint`: crash-safe DCP checkpoint folders, full <-> sharded state;
- :mod:`~recsys.distributed.dcp_reader`: reads DCP folders without unpickling anything but DCP metadata;
- :mod:`~recsys.distributed.collectives`: gathering evaluation outputs across ranks;
- :mod:`~recsys.distributed.strategy`: ``TorchRecStrategy`` and ``build_trainer`` (``trainer=dmp``).

Import the strategy from its module (``recsys.distributed.strategy``); this package stays light so the
LightningModule and pipeline can use the helpers without pulling in Lightning's strategy machinery.
"""
