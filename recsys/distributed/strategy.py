"""``TorchRecStrategy``: Lightning's DDP strategy with TorchRec DistributedModelParallel inside.

What differs from :class:`~pytorch_lightning.strategies.DDPStrategy` (docs/distributed.md):

* ``setup`` wraps the LightningModule in DMP in *every* stage (fit, validate, test, predict), so sharded
  checkpoints load anywhere; the wrapper is built once per module and reused by later stages. Before
  wrapping, table parameters get the fused optimiser (``trainer.fused_optimizer``), the planner gets
  per-table constraints (``trainer.sharding``) and topology (``trainer.topology``); after wrapping,
  each shard is initialised with its table's ``init_fn``.
* ``model_to_device`` is a no-op: tables are built on ``meta`` and DMP materialises each shard.
* ``pre_backward``/``post_backward`` and the forward redirection act on ``dmp._dmp_wrapped_module``
  (the DDP that DMP wraps the dense part in). Lightning's versions check ``isinstance(model, DDP)``,
  miss it, and dense weights then drift apart across ranks without any error.
* checkpoints are DCP folders (:mod:`recsys.distributed.checkpoint`): each rank writes its shards and
  their fused optimiser state; loading happens after setup, in place.
* the LightningModule asks :meth:`TorchRecStrategy.sharded_optimizers` for ``[fused, dense]`` optimisers.

Manual optimisation is required: fused optimisers ignore Lightning's closure.

If FBGEMM kernels do not run on the device (:func:`recsys.distributed.env.sharding_path`), every
method falls back to plain DDP with unsharded tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recsys.compat import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
    EmbeddingBagCollection,
    EmbeddingCollection,
    KeyedOptimizer,
    KeyedOptimizerWrapper,
    ShardedModule,
    in_backward_optimizer_filter,
)
from recsys.distributed import checkpoint as ckpt
from recsys.distributed.env import DMP, sharding_path, trainer_device_type, world_info
from recsys.distributed.lightning_private import (
    DMPForwardRedirection,
    check_lightning_version,
    flush_first_static_graph_step,
    prepare_for_backward,
)
from recsys.distributed.optim import FusedOptimizerSpec, apply_fused_optimizer, parse_fused_optimizer
from recsys.distributed.planner import build_constraints, build_plan, sharders

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _inner_ddp(model: nn.Module | None) -> DistributedDataParallel | None:
    """The DDP that DMP wraps around the unsharded part (``None`` when everything is sharded)."""
    if isinstance(model, DistributedModelParallel):
        inner = model._dmp_wrapped_module
        return inner if isinstance(inner, DistributedDataParallel) else None
    return None


def table_modules(module: nn.Module) -> list[nn.Module]:
    """Unsharded TorchRec embedding collections of ``module``."""
    return [m for m in module.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]


def dense_float_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Floating-point buffers outside sharded modules (BatchNorm running statistics, ...)."""
    out: list[torch.Tensor] = []

    def visit(sub: nn.Module) -> None:
        if isinstance(sub, ShardedModule):
            return
        out.extend(b for b in sub.buffers(recurse=False) if b.is_floating_point())
        for child in sub.children():
            visit(child)

    visit(module)
    return out


@torch.no_grad()
def average_buffers(buffers: list[torch.Tensor]) -> None:
    """Collective: replace each buffer by its mean over ranks (one flat all-reduce)."""
    if not buffers or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for b, chunk in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(chunk.view_as(b))


class TorchRecStrategy(DDPStrategy):
    """See the module docstring.

    Args:
        sharding: table key -> sharding type (or ``{sharding_types, compute_kernels}``); see
            :mod:`recsys.distributed.planner`.
        fused_optimizer: ``{name, lr, ...}`` for the tables; see :mod:`recsys.distributed.optim`.
        compute_kernel: default kernel of sharded tables (``fused``; on CUDA also ``fused_uvm_caching``...).
        topology: extra planner ``Topology`` arguments (``hbm_cap``, ``ddr_cap``, ... in bytes).
        static_graph / find_unused_parameters: for the DDP around the dense part
            (``find_unused_parameters=True`` when some heads skip batches).
        **kwargs: :class:`DDPStrategy` arguments (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "torchrec_dmp"

    def __init__(
        self,
        sharding: Mapping[str, Any] | None = None,
        fused_optimizer: Mapping[str, Any] | None = None,
        compute_kernel: str = "fused",
        topology: Mapping[str, Any] | None = None,
        static_graph: bool = False,
        find_unused_parameters: bool = False,
        **kwargs: Any,
    ) -> None:
        check_lightning_version()  # the private Lightning API in lightning_private.py was checked for a range
        super().__init__(**kwargs)
        self._forward_redirection = DMPForwardRedirection(_inner_ddp)
        self.sharding = dict(sharding or {"default": "table_wise"})
        self.fused_optimizer_config = dict(fused_optimizer or {"name": "row_wise_adagrad", "lr": 0.05})
        self.compute_kernel = compute_kernel
        self.topology = dict(topology or {})
        self.static_graph, self.find_unused_parameters = static_graph, find_unused_parameters
        self._dmp: DistributedModelParallel | None = None
        self._static_graph_flushed = False
        self._fused_spec: FusedOptimizerSpec | None = None

    # ---- which path ---------------------------------------------------------------------------
    @property
    def sharding_path(self) -> str:
        """``dmp`` or ``unsharded_fallback`` for this strategy's device (decided once per device type)."""
        return sharding_path(True, self.root_device.type)

    @property
    def shards_tables(self) -> bool:
        return self.sharding_path == DMP

    @property
    def dmp(self) -> DistributedModelParallel | None:
        return self._dmp

    # ---- setup --------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        if not self.shards_tables:
            rank_zero_info("TorchRecStrategy: unsharded tables (plain DDP), FBGEMM kernels missing on the device")
            return super().setup(trainer)
        assert self.accelerator is not None and self.lightning_module is not None
        if self.lightning_module.automatic_optimization:
            raise ValueError(
                "TorchRecStrategy needs manual optimisation (automatic_optimization=False): "
                "fused table optimisers ignore Lightning's closure"
            )
        self.accelerator.setup(trainer)
        self.model = self._wrap(self.precision_plugin.convert_module(self.lightning_module))
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            if not any(opt is self._dmp.fused_optimizer for opt in self.optimizers):
                raise ValueError(
                    f"{type(self.lightning_module).__name__} does not support trainer=dmp: its configure_optimizers "
                    "must return TorchRecStrategy.sharded_optimizers(...) (see recsys.training.base.SparseDenseModule)"
                )
        self.setup_precision_plugin()

    def _wrap(self, module: pl.LightningModule) -> DistributedModelParallel:
        """Fuse table optimisers, plan, shard; reuse the wrapper a previous stage built for ``module``."""
        if self._dmp is not None and self._dmp.module is module:
            return self._dmp
        device_type = self.root_device.type
        self._fused_spec = parse_fused_optimizer(self.fused_optimizer_config, device_type)
        collections = table_modules(module)
        init_fns = {c.name: c.init_fn for m in collections for c in m.embedding_configs() if c.init_fn is not None}
        constraints = build_constraints(module, self.sharding, device_type, self.compute_kernel)
        apply_fused_optimizer((p for m in collections for p in m.parameters()), self._fused_spec)
        module_sharders = sharders()
        plan = build_plan(
            module, constraints, module_sharders, self.world_size, self.num_processes, device_type, self.topology
        )
        dmp = DistributedModelParallel(
            module,
            device=self.root_device,
            plan=plan,
            sharders=module_sharders,
            data_parallel_wrapper=DefaultDataParallelWrapper(
                static_graph=self.static_graph, find_unused_parameters=self.find_unused_parameters
            ),
        )
        ckpt.init_sharded_tables(dmp.module, init_fns, seed=torch.initial_seed())
        rank_zero_info(
            f"TorchRecStrategy: sharded {len(constraints)} tables over {self.world_size} rank(s), "
            f"fused {self._fused_spec.name} {self._fused_spec.kwargs}\n{plan}"
        )
        self._dmp = dmp
        return dmp

    def model_to_device(self) -> None:
        if not self.shards_tables:
            super().model_to_device()

    def sharded_optimizers(self, dense_optimizer: OptimizerFactory) -> list[torch.optim.Optimizer]:
        """``[fused table optimiser, KeyedOptimizerWrapper(dense_optimizer) over the other parameters]``.

        Stepping the fused one only refreshes its learning rate (so LR schedulers work); the table update
        itself happened during backward.
        """
        if self._dmp is None:
            raise RuntimeError("sharded_optimizers() is available after TorchRecStrategy.setup()")
        dense = {n: p for n, p in in_backward_optimizer_filter(self._dmp.named_parameters()) if p.requires_grad}
        optimizers: list[torch.optim.Optimizer] = [self._dmp.fused_optimizer]
        if dense:
            optimizers.append(KeyedOptimizerWrapper(dense, dense_optimizer))
        return optimizers

    # ---- backward hooks on the DDP inside DMP -------------------------------------------------
    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        if not self.shards_tables:
            return super().pre_backward(closure_loss)
        ddp = _inner_ddp(self.model)
        if ddp is not None and not self.lightning_module.automatic_optimization:
            prepare_for_backward(ddp, closure_loss)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        if not self.shards_tables:
            return super().post_backward(closure_loss)
        ddp = _inner_ddp(self.model)
        if ddp is None or not ddp.static_graph or self._static_graph_flushed:
            return
        flush_first_static_graph_step(ddp)  # first static-graph iteration under manual optimisation
        self._static_graph_flushed = True

    # ---- dense buffers ------------------------------------------------------------------------
    # DMP's DDP does not broadcast buffers, so BatchNorm running statistics drift apart across ranks.
    # They are averaged (like synchronised BatchNorm statistics) before every evaluation and checkpoint,
    # so all ranks evaluate the same model and a checkpoint does not depend on which rank DCP saved.
    def _sync_buffers(self) -> None:
        if self.shards_tables and self.lightning_module is not None:
            average_buffers(dense_float_buffers(self.lightning_module))

    def on_validation_start(self) -> None:
        self._sync_buffers()

    def on_test_start(self) -> None:
        self._sync_buffers()

    def on_predict_start(self) -> None:
        self._sync_buffers()

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # load into the sharded module and the live optimisers, in place
        return self.shards_tables

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self.shards_tables:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self._sync_buffers()  # the checkpoint's state_dict tensors share storage with the buffers
        ckpt.save_sharded(checkpoint, filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        if not self.shards_tables:
            return super().load_checkpoint(checkpoint_path, weights_only)
        assert self.lightning_module is not None
        optimizer_states = None
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
            for opt in self.optimizers:
                if isinstance(opt, KeyedOptimizer) and opt is not self._dmp.fused_optimizer and not opt.state:
                    opt.init_state()  # lazy state (Adam moments) must exist to be loaded in place
            optimizer_states = [opt.state_dict() for opt in self.optimizers]
        return ckpt.load_sharded(checkpoint_path, self.lightning_module.state_dict(), optimizer_states)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self.shards_tables:
            return super().load_model_state_dict(checkpoint, strict)
        # already loaded in place by load_checkpoint (DCP reports missing keys itself)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if not self.shards_tables:
            return super().load_optimizer_state_dict(checkpoint)
        # already loaded in place by load_checkpoint

    def remove_checkpoint(self, filepath: Any) -> None:
        if not self.shards_tables:
            return super().remove_checkpoint(filepath)
        ckpt.remove_sharded(filepath)

    # ---- teardown -----------------------------------------------------------------------------
    def teardown(self) -> None:
        if not self.shards_tables:
            return super().teardown()
        # keep the sharded module where DMP placed it (no .cpu()) and keep the wrapper for later stages
        self.model = self.lightning_module
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def build_trainer(
    sharding: Mapping[str, Any] | None = None,
    fused_optimizer: Mapping[str, Any] | None = None,
    compute_kernel: str = "fused",
    topology: Mapping[str, Any] | None = None,
    backend: str | None = None,
    static_graph: bool = False,
    find_unused_parameters: bool = False,
    devices: Any = "auto",
    num_nodes: int | None = None,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """A :class:`pytorch_lightning.Trainer` on :class:`TorchRecStrategy` (``configs/trainer/dmp.yaml``).

    ``devices``/``num_nodes`` default to the torchrun layout (``LOCAL_WORLD_SIZE`` processes per node);
    ``backend`` null picks gloo on CPU and nccl on CUDA. The fused optimiser is validated here, so a bad
    option fails before any data is read.
    """
    info = world_info()
    if devices in (None, "auto"):
        devices = info.local_world_size
    if num_nodes is None:
        num_nodes = max(1, info.world_size // max(1, info.local_world_size))
    parse_fused_optimizer(
        dict(fused_optimizer or {"name": "row_wise_adagrad", "lr": 0.05}), trainer_device_type(trainer_kwargs)
    )
    strategy = TorchRecStrategy(
        sharding=sharding,
        fused_optimizer=fused_optimizer,
        compute_kernel=compute_kernel,
        topology=topology,
        static_graph=static_graph,
        find_unused_parameters=find_unused_parameters,
        process_group_backend=backend,
    )
    return pl.Trainer(strategy=strategy, devices=devices, num_nodes=num_nodes, **trainer_kwargs)
