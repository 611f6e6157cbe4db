"""A whole training step (forward, losses, backward, every optimiser) replayed as one CUDA graph.

At Taobao scale the DARE step issues ~600 kernels from ~2,800 host operator calls (``step_profile.txt`` of
``+benchmark=dare_scale``): the host, not the GPU, sets the pace. A CUDA graph records the step's kernels once and
replays them with one launch, so the host's work per step shrinks to copying the next batch into the recorded
input buffers.

:class:`GraphedStep` wraps ``step(batch) -> outputs``:

1. the first ``warmup`` calls run eagerly (lazy state: optimiser moments, cuBLAS handles, Triton autotuning);
2. the next call copies its batch into *static* buffers, records ``step(static)`` into a graph (recording runs
   nothing) and replays it once — that replay is this batch's step;
3. later calls copy their batch into the buffers and replay; the outputs are the same static tensors, refreshed.

One graph is recorded per batch *signature* (the tensors' shapes, dtypes and devices), up to ``max_graphs``: the
last, partial batch of an epoch, or sequence batches whose token count is rounded to a few sizes, each get their
own; a batch of yet another signature runs eagerly, as does everything when recording failed (the step
synchronised with the host, or the batch holds something other than tensors in dataclasses, dicts, lists and
tuples — a KJT): one warning, then eager steps, never a failed run.

Requirements on ``step``: it sets gradients to ``None`` before its backward (so the recorded backward allocates
them from the graph's pool), its optimisers keep their step counts on the device
(``torch.optim.Adam(capturable=True)``, :class:`recsys.ops.sparse_update.LazyAdam`) and learning rates do not
change after recording (no LR scheduler).

Plain torch; the ``graph`` factory is injectable so the bookkeeping is tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of a batch (dataclasses, dicts, lists and tuples, nested), in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensor_leaves(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in tensor_leaves(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensor_leaves(v)]
    return []


PLAIN = (type(None), bool, int, float, str)


def static_copy(obj: Any) -> Any:
    """A structural copy of ``obj`` whose tensors are fresh clones (the recorded input buffers). Anything else that
    could hold tensors (a KeyedJaggedTensor, say) raises ``TypeError``: a graph would keep reading the recorded
    batch's values through it, so such batches are not graphed."""
    if isinstance(obj, PLAIN):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: static_copy(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, dict):
        return {k: static_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(static_copy(v) for v in obj)
    raise TypeError(f"a batch field of type {type(obj).__name__} cannot be copied into the graph's input buffers")


def signature(leaves: list[torch.Tensor]) -> tuple:
    """What must match for a batch to be copied into the recorded buffers."""
    return tuple((tuple(t.shape), t.dtype, t.device) for t in leaves)


@dataclass
class Recorded:
    """One recorded graph: its input buffers (in :func:`tensor_leaves` order) and its output tensors."""

    graph: Any
    inputs: list[torch.Tensor]
    outputs: Any


class GraphedStep:
    """Eager for ``warmup`` calls, then one recorded graph per batch signature, replayed per call (see the module
    docstring).

    Args:
        step: ``step(batch) -> outputs`` (a full training step).
        warmup: eager calls before recording (>= 1).
        max_graphs: how many signatures get a graph (each holds its own memory pool); later ones run eagerly.
        graph: factory of the graph object (``torch.cuda.CUDAGraph``); with ``context(graph)`` the recording
            context (``torch.cuda.graph``). Injected by tests.

    Attributes: ``replays`` (graph steps so far), ``eager`` (eager steps after the warm-up), ``failed`` (the reason
    recording failed, or ``None``), ``graphs`` (signature -> :class:`Recorded`).
    """

    def __init__(
        self,
        step: Callable[[Any], Any],
        warmup: int = 3,
        max_graphs: int = 8,
        graph: Callable[[], Any] | None = None,
        context: Callable[[Any], Any] | None = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (lazy state is created eagerly), got {warmup}")
        self.step, self.warmup, self.max_graphs = step, warmup, max_graphs
        self._graph_factory = graph or torch.cuda.CUDAGraph
        # thread_local: the loader's pin-memory thread may allocate page-locked memory while the step records
        self._context = context or (lambda g: torch.cuda.graph(g, capture_error_mode="thread_local"))
        self.calls = self.replays = self.eager = 0
        self.failed: str | None = None
        self.graphs: dict[tuple, Recorded] = {}

    @property
    def recorded(self) -> bool:
        return bool(self.graphs)

    def __call__(self, batch: Any) -> Any:
        self.calls += 1
        if self.calls <= self.warmup or self.failed is not None:
            if self.calls > self.warmup:
                self.eager += 1
            return self.step(batch)
        leaves = tensor_leaves(batch)
        key = signature(leaves)
        recorded = self.graphs.get(key)
        if recorded is None:
            if len(self.graphs) >= self.max_graphs:
                self.eager += 1
                return self.step(batch)
            return self._record(batch, key)
        with torch.profiler.record_function("graphed_step.replay"):  # a named host range in StepProfile
            for buffer, value in zip(recorded.inputs, leaves):
                buffer.copy_(value, non_blocking=True)
            recorded.graph.replay()
        self.replays += 1
        return recorded.outputs

    def _record(self, batch: Any, key: tuple) -> Any:
        graph = self._graph_factory()
        try:
            static = static_copy(batch)
            with self._context(graph):
                outputs = self.step(static)
        except Exception as err:  # noqa: BLE001 - any recording failure falls back to eager steps
            self.failed = f"{type(err).__name__}: {err}"
            log.warning("training step not graphed (recording failed: %s); running it eagerly", self.failed)
            self.eager += 1
            return self.step(batch)
        self.graphs[key] = Recorded(graph, tensor_leaves(static), outputs)
        graph.replay()  # recording ran nothing: this replay is the batch's step
        self.replays += 1
        return outputs
