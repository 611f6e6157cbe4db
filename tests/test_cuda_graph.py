"""The graphed training step (recsys/training/cuda_graph.py).

CPU: the bookkeeping of :class:`GraphedStep` with an injected stand-in for ``torch.cuda.CUDAGraph`` (warm-up calls
eager, one recording, buffers refreshed per call, eager fallbacks on a new shape or a failed recording).
GPU (marked ``gpu``): DARE trained through Lightning with ``cuda_graph=True`` reaches the same weights as the eager
step, and the graph really replays.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch

from mtl.single import SingleTower
from mtl.spec import TaskSpec
from recsys.data.ctr_table import BatchedCTRDataset, CTRTable, batch_loader
from recsys.data.schema import Vocab
from recsys.models.ranking import RankingModel
from recsys.models.target_attention import TargetAttentionBackbone
from recsys.ops.sparse_update import LazyAdam
from recsys.training.cuda_graph import GraphedStep, static_copy, tensor_leaves
from recsys.training.ranking import RankingModule
from tests.helpers import fit_tiny_ranking, quiet_trainer, random_samples


@dataclass
class _Inner:
    ids: torch.Tensor


@dataclass
class _Batch:
    x: torch.Tensor
    inner: _Inner
    labels: dict


def _batch(value: float, rows: int = 4) -> _Batch:
    return _Batch(torch.full((rows,), value), _Inner(torch.arange(rows)), {"b": torch.ones(rows), "a": torch.zeros(1)})


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: recording runs the step once (a real graph runs nothing; the test's
    step only reads its input), replay re-runs it on the recorded buffers and refreshes the recorded outputs."""

    def __init__(self, owner: dict) -> None:
        self.owner = owner
        self.static = self.outputs = None

    def replay(self) -> None:
        if self.static is None:  # the first replay follows this graph's recording: its buffers are the owner's now
            self.static, self.outputs = self.owner["static"], self.owner["outputs"]
        fresh = self.owner["step"](self.static)
        self.outputs["y"].copy_(fresh["y"])


def _fake(owner: dict, fail: bool = False):
    @contextlib.contextmanager
    def context(graph):
        owner["recording"] = True
        try:
            if fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            yield
        finally:
            owner["recording"] = False

    return (lambda: _FakeGraph(owner)), context


def test_tensor_leaves_and_static_copy_follow_the_batch_structure():
    batch = _batch(1.0)
    leaves = tensor_leaves(batch)
    assert [t.shape for t in leaves] == [(4,), (4,), (1,), (4,)]  # x, inner.ids, labels a then b
    static = static_copy(batch)
    assert isinstance(static, _Batch) and isinstance(static.inner, _Inner)
    assert all(torch.equal(s, t) and s.data_ptr() != t.data_ptr() for s, t in zip(tensor_leaves(static), leaves))


def test_graphed_step_warms_up_records_once_then_replays_with_each_batch():
    owner: dict = {"recording": False}
    seen: list[tuple[bool, float]] = []

    def step(batch):
        if owner["recording"]:
            owner["static"] = batch
        seen.append((owner["recording"], float(batch.x[0])))
        out = {"y": batch.x * 2 + batch.labels["b"]}
        if owner["recording"]:
            owner["outputs"] = out  # what the graph's replays refresh
        return out

    owner["step"] = step
    graph, context = _fake(owner)
    graphed = GraphedStep(step, warmup=2, max_graphs=2, graph=graph, context=context)
    results = []
    for value in (1.0, 2.0, 3.0, 4.0, 5.0):
        results.append(float(graphed(_batch(value))["y"][0]))
    assert results == [3.0, 5.0, 7.0, 9.0, 11.0]  # every call computed its own batch
    assert [r for r, _ in seen].count(True) == 1  # one recording (the third call)
    assert (graphed.replays, graphed.eager, graphed.failed) == (3, 0, None)
    # the replays ran on the recorded buffers, refreshed with each batch
    four = next(iter(graphed.graphs.values()))
    assert four.inputs[0].tolist() == [5.0] * 4
    # a batch of another shape (an epoch's last, partial batch) records its own graph and leaves the first in place
    out = graphed(_batch(6.0, rows=3))
    assert out["y"].tolist() == [13.0] * 3 and graphed.eager == 0 and len(graphed.graphs) == 2
    assert [r for r, _ in seen].count(True) == 2
    assert float(graphed(_batch(7.0))["y"][0]) == 15.0 and graphed.replays == 5
    assert four.inputs[0].tolist() == [7.0] * 4
    assert graphed(_batch(8.0, rows=3))["y"].tolist() == [17.0] * 3 and graphed.replays == 6
    # max_graphs reached: a third shape runs eagerly, no recording
    assert graphed(_batch(9.0, rows=2))["y"].tolist() == [19.0] * 2 and graphed.eager == 1
    assert [r for r, _ in seen].count(True) == 2 and len(graphed.graphs) == 2


def test_a_failed_recording_falls_back_to_eager_steps_for_good(caplog):
    owner: dict = {"recording": False}
    calls = []

    def step(batch):
        calls.append(float(batch.x[0]))
        return {"y": batch.x + 1}

    graph, context = _fake(owner, fail=True)
    graphed = GraphedStep(step, warmup=1, graph=graph, context=context)
    values = [float(graphed(_batch(v))["y"][0]) for v in (1.0, 2.0, 3.0)]
    assert values == [2.0, 3.0, 4.0] and calls == [1.0, 2.0, 3.0]
    assert graphed.failed.startswith("RuntimeError") and graphed.replays == 0 and graphed.eager == 2
    assert "not graphed" in caplog.text


def test_a_batch_with_an_opaque_tensor_holder_is_never_graphed(caplog):
    """A KJT-like object would be shared by reference with the recorded buffers, and every replay would read the
    recorded batch: such batches run eagerly."""

    class Opaque:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

    owner: dict = {"recording": False}
    graph, context = _fake(owner)
    graphed = GraphedStep(lambda b: {"y": b["ids"].t + 1}, warmup=1, graph=graph, context=context)
    values = [float(graphed({"ids": Opaque(torch.tensor([v]))})["y"][0]) for v in (1.0, 2.0, 3.0)]
    assert values == [2.0, 3.0, 4.0] and not graphed.recorded and graphed.failed.startswith("TypeError")
    assert "not graphed" in caplog.text


def test_warmup_must_be_positive():
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(lambda b: b, warmup=0)


def test_lazy_adam_keeps_its_step_on_the_device_and_resumes_from_an_integer_step():
    weight = torch.nn.Parameter(torch.randn(10, 3))
    opt = LazyAdam([weight], lr=0.1)
    for _ in range(2):
        weight.grad = torch.randn(10, 3)
        opt.step()
    state = opt.state[weight]
    assert isinstance(state["step"], torch.Tensor) and float(state["step"]) == 2.0
    # a state saved by the older optimiser (a Python int step) continues from that count
    legacy = torch.nn.Parameter(weight.detach().clone())
    other = LazyAdam([legacy], lr=0.1)
    other.state[legacy] = {k: (int(v) if k == "step" else v.clone()) for k, v in state.items()}
    same = torch.randn(10, 3)
    weight.grad, legacy.grad = same.clone(), same.clone()
    opt.step()
    other.step()
    assert torch.allclose(weight, legacy) and float(other.state[legacy]["step"]) == 3.0


VOCAB = Vocab(50, 400, 8)
TASKS = [TaskSpec("click")]


def _dare_module(cuda_graph: bool) -> RankingModule:
    torch.manual_seed(0)
    backbone = TargetAttentionBackbone(
        VOCAB, 16, embedding_dim=8, attention_dim=4, decoupled=True, top_k=4, sparse_grad=True
    )
    model = RankingModel(backbone, SingleTower(backbone.output_dim, TASKS, hidden=(16,)))
    return RankingModule(
        model,
        TASKS,
        lambda p: LazyAdam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01),
        cuda_graph=cuda_graph,
        graph_warmup_steps=2,
    )


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))  # the graph's loss is a recorded buffer: read it now


def _train_on_cuda(table: CTRTable, graphed: bool, root) -> tuple[dict, list[float], object]:
    module = _dare_module(graphed)
    losses = _Losses()
    # 9 steps: 2 eager warm-up steps, 1 recording, then replays; 200 rows / 32 = 6 full batches + 1 partial
    trainer = quiet_trainer(root, accelerator="gpu", devices=1, max_steps=9, logger=False, callbacks=[losses])
    loader = batch_loader(BatchedCTRDataset(table, pad_to=16), len(table), 32, shuffle=True, seed=1)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 9  # one step per batch, graphed or not
    weights = {k: v.detach().cpu().float() for k, v in module.state_dict().items() if v.is_floating_point()}
    return weights, losses.values, copy.copy(module.graphed_step)


def _far(a: dict, b: dict, tol: float = 1e-4) -> int:
    return sum(int(((a[k] - b[k]).abs() > tol).sum()) for k in a)


@pytest.mark.gpu
def test_graphed_dare_training_on_cuda_matches_the_eager_step(tmp_path):
    """Same data, init and order: the graphed run follows the eager one. The sparse updates sum repeated ids with
    atomics, so two eager runs already differ in float rounding, and Adam's normalised step turns a rounding
    difference on a near-zero gradient into a full-size update on that element: the weights are compared by how
    many elements move apart, against two eager runs; a stale buffer or a skipped replay moves most of them."""
    table = CTRTable.from_frame(random_samples(rows=200, vocab=VOCAB, seed=3), "mem", {"click": "label"}, VOCAB)
    eager, eager_losses, none = _train_on_cuda(table, False, tmp_path / "eager")
    again, _, _ = _train_on_cuda(table, False, tmp_path / "again")
    graph, graph_losses, step = _train_on_cuda(table, True, tmp_path / "graph")
    assert none is None and step is not None and step.failed is None, step and step.failed
    assert step.replays >= 6 and len(step.graphs) == 2  # the epoch's partial batch has a graph of its own
    elements = sum(v.numel() for v in eager.values())
    far, noise = _far(graph, eager), _far(again, eager)
    print(f"elements {elements}: graph vs eager {far} beyond 1e-4, eager vs eager {noise}")
    assert torch.allclose(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-3, atol=1e-5)
    assert far <= max(3 * noise, 0.001 * elements)


def test_a_graphed_runs_optimiser_settings_do_not_break_an_eager_resume_on_the_cpu(tmp_path):
    """A graphed run leaves ``capturable=True`` in its Adam groups (and in its checkpoint); ``torch.optim.Adam``
    refuses that on CPU parameters. An eager run puts the flag and the step counts back on the host."""

    class GraphedRunsAdam(pl.Callback):  # runs before the module's on_train_start, as a resumed state would
        def on_train_start(self, trainer, pl_module) -> None:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["capturable"] = True

    trainer = fit_tiny_ranking(tmp_path, [GraphedRunsAdam()], max_steps=3)
    assert trainer.global_step == 3
    assert all(not g["capturable"] for opt in trainer.optimizers for g in opt.param_groups)
