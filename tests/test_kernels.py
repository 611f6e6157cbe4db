"""Fused ops against their pure-torch references on random jagged inputs.

- ``softmax_pool``: the torch reference against an independent loop-free formula here; the Triton backend
  (front-end's automatic choice under ``TRITON_INTERPRET=1``, Triton's CPU interpreter) against the reference
  in a subprocess (the interpreter must be chosen before Triton is first imported); on CUDA (``-m gpu``)
  the compiled kernel.
- ``gather_rows``: the Triton backend against ``F.embedding`` (rows, sparse and dense table gradients).
- sparse table updates: ``dedup_rows`` against ``torch.unique``; ``RowWiseAdagrad`` against a dense
  re-statement of the rule; ``LazyAdam`` against ``torch.optim.SparseAdam``; its Triton kernel (the
  ``dedup_rows`` case: more rows than lookups) against the torch reference, hot rows included.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recsys.ops.backend import kernel_family, use_triton
from recsys.ops.gather_rows import gather_rows, target_and_history_rows, target_and_history_rows_torch
from recsys.ops.softmax_pool import PAD_SCORE, softmax_pool, softmax_pool_torch
from recsys.ops.sparse_update import LazyAdam, RowWiseAdagrad, dedup_rows, lazy_adam_
from recsys.training.cuda_graph import GraphedStep

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def jagged_case(seed: int, device: str = "cpu", top_k: int | None = 5, wide: bool = False):
    """Random scores ``[B, L]``, values ``[B, L, D]`` (D not a power of two), a jagged mask with rows shorter
    than K, and (``top_k``) each row's top-K slots as the search stage picks them. ``wide``: DARE-sized rows
    (L = 200, D = 200..400: several value tiles per row in the Triton kernel)."""
    g = torch.Generator().manual_seed(seed)
    sizes = ((1, 6), (200, 201), (200, 400)) if wide else ((1, 40), (1, 30), (1, 40))
    batch, width, dim = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in sizes)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = torch.arange(width) < lengths.unsqueeze(1)
    scores = torch.randn(batch, width, generator=g) * 3
    values = torch.randn(batch, width, dim, generator=g)
    index = None
    if top_k is not None:
        index = scores.masked_fill(~mask, PAD_SCORE).topk(min(top_k, width), dim=1).indices
    return [t.to(device) if t is not None else None for t in (scores, mask, values, index)]


def compare_backends(
    seed: int, backend: str | None, device: str = "cpu", top_k: int | None = 5, wide: bool = False
) -> None:
    """``backend`` (None = automatic) against the reference: outputs and gradients of scores and values."""
    scores, mask, values, index = jagged_case(seed, device, top_k, wide)
    results = []
    probe = torch.randn(index.shape if index is not None else scores.shape, generator=torch.Generator().manual_seed(9))
    for which in (backend, "torch"):
        s, v = scores.clone().requires_grad_(), values.clone().requires_grad_()
        pooled, weights = softmax_pool(s, mask, v, index, backend=which)
        ((pooled * pooled).sum() + (weights * probe.to(weights.device)).sum()).backward()
        results.append((pooled, weights, s.grad, v.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [5, 1, None])
@pytest.mark.parametrize("seed", range(6))
def test_reference_equals_the_definition(seed, top_k):
    scores, mask, values, index = jagged_case(seed, top_k=top_k)
    pooled, weights = softmax_pool_torch(scores, mask, values, index)
    if index is None:
        index = torch.arange(scores.shape[1]).expand_as(scores)
    for b in range(scores.shape[0]):  # per row, with only the real selected slots
        real = [int(j) for j in index[b] if mask[b, j]]
        w = torch.softmax(scores[b, real], 0)
        torch.testing.assert_close(pooled[b], w @ values[b, real], rtol=1e-5, atol=1e-6)
        picked = [j for j, slot in enumerate(index[b]) if mask[b, slot]]
        torch.testing.assert_close(weights[b, picked], w, rtol=1e-5, atol=1e-6)
        assert weights[b].sum().sub(1).abs() < 1e-5


def check_triton_cases() -> None:
    """Run in a subprocess with ``TRITON_INTERPRET=1``: the automatic choice is Triton, and it matches."""
    assert use_triton("cpu") and kernel_family("cpu") in ("fbgemm", "triton")
    for seed in range(8):
        for top_k in (5, 1, None):
            compare_backends(seed, None, "cpu", top_k)
    for top_k in (20, None):
        compare_backends(0, None, "cpu", top_k, wide=True)
    for seed in range(3):
        compare_gather_rows(seed, "cpu")
        compare_target_and_history_rows(seed, "cpu")
        compare_lazy_adam(seed, "cpu")
    compare_lazy_adam_tile_edges("cpu")
    compare_lazy_adam_small_table("cpu")
    print("triton cases ok")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton): interpreter cases skipped")
def test_triton_backend_matches_the_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    env.pop("RECSYS_KERNELS", None)
    code = "from tests.test_kernels import check_triton_cases; check_triton_cases()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "triton cases ok" in done.stdout, done.stderr[-3000:]


def test_cpu_without_the_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not use_triton("cpu")
    monkeypatch.setenv("RECSYS_KERNELS", "torch")
    assert not use_triton("cuda") and kernel_family("cuda") == "torch"
    with pytest.raises(ValueError, match="unknown softmax_pool backend"):
        softmax_pool(*jagged_case(0), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("top_k", [20, 5, None])
@pytest.mark.parametrize("seed", range(4))
def test_triton_kernel_on_cuda_matches_the_reference(seed, top_k, wide):
    assert use_triton("cuda"), "triton should be importable on the GPU machine"
    compare_backends(seed, "triton", "cuda", top_k, wide)


def compare_gather_rows(seed: int, device: str) -> None:
    """Triton (automatic choice) against ``F.embedding``: rows, then the sparse and the dense table gradient of a
    loss over them, ids ``[B, L]`` with repeats, width not a power of two on odd seeds; seed 0's 50-row table is
    small enough for the dense gradient's per-row sum, the others take ``F.embedding``'s dense kernel."""
    g = torch.Generator().manual_seed(seed)
    rows, dim = 50 + 400 * seed, (16, 13, 130)[seed % 3]
    weight = torch.randn(rows, dim, generator=g).to(device)
    ids = torch.randint(0, rows, (7, 33), generator=g).to(device)
    ids[0] = 3  # a hot row
    probe = torch.randn(7, 33, dim, generator=g).to(device)
    assert use_triton(device, "gather_rows")
    for sparse in (True, False):
        got, want = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        out, ref = gather_rows(got, ids, sparse), F.embedding(ids, want, sparse=sparse)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        (out * probe).sum().backward()
        (ref * probe).sum().backward()
        assert got.grad.is_sparse == want.grad.is_sparse == sparse
        torch.testing.assert_close(got.grad.to_dense(), want.grad.to_dense(), rtol=1e-5, atol=1e-5)


def compare_target_and_history_rows(seed: int, device: str) -> None:
    """Triton (automatic choice) against the reference composition (one ``F.embedding`` of ``[B, 1 + L]`` ids,
    split, history times the mask): rows (padding rows zero), then the sparse and the dense table gradient, with
    losses on both outputs and on the history rows only; rows with no history and full rows included."""
    g = torch.Generator().manual_seed(seed)
    batch, width, rows, dim = 9, 21, 40 + 300 * seed, (16, 13, 130)[seed % 3]
    weight = torch.randn(rows, dim, generator=g).to(device)
    target = torch.randint(0, rows, (batch,), generator=g).to(device)
    hist = torch.randint(0, rows, (batch, width), generator=g)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    lengths[:2] = torch.tensor([0, width])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).to(device)
    hist = hist.masked_fill(~mask.cpu(), 0).to(device)
    hist[1, :5] = target[1]  # a target repeated in its history
    probes = torch.randn(batch, dim, generator=g).to(device), torch.randn(batch, width, dim, generator=g).to(device)
    assert use_triton(device, "gather_rows")
    for sparse, both in ((True, True), (False, True), (True, False)):
        got, want = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        out = target_and_history_rows(got, target, hist, mask, sparse)
        ref = target_and_history_rows_torch(want, target, hist, mask, sparse)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert out[1][~mask].abs().sum() == 0
        for rows_, loss_rows in ((out, got), (ref, want)):
            loss = (rows_[1] * probes[1]).sum() + ((rows_[0] * probes[0]).sum() if both else 0)
            loss.backward()
            assert loss_rows.grad.is_sparse == sparse
        torch.testing.assert_close(got.grad.to_dense(), want.grad.to_dense(), rtol=1e-5, atol=1e-5)


@contextmanager
def _torch_ops(names: str):
    """``RECSYS_TORCH_OPS=names`` inside the block, the caller's setting back afterwards whatever happened."""
    before = os.environ.get("RECSYS_TORCH_OPS")
    os.environ["RECSYS_TORCH_OPS"] = names
    try:
        yield
    finally:
        os.environ.pop("RECSYS_TORCH_OPS")
        if before is not None:
            os.environ["RECSYS_TORCH_OPS"] = before


def compare_lazy_adam(seed: int, device: str) -> None:
    """Three LazyAdam steps on a table with more rows than lookups (the ``dedup_rows`` case), Triton kernel
    against the torch reference (``RECSYS_TORCH_OPS=lazy_adam``): weights and both moments; runs longer than the
    kernel's tile of sorted positions (a hot row of 40 / 80 / 300 repeats) and rows wider than its 128-wide block
    (seed 2)."""
    g = torch.Generator().manual_seed(seed)
    rows, dim, n = 5000, (16, 7, 130)[seed % 3], 600
    states = []
    for torch_ops in ("", "lazy_adam"):
        g.manual_seed(seed)
        weight = torch.randn(rows, dim, generator=g).to(device)
        m, v = torch.zeros_like(weight), torch.zeros_like(weight)
        with _torch_ops(torch_ops):
            for step in range(1, 4):
                ids = torch.randint(0, rows, (n,), generator=g).to(device)
                ids[: (40, 80, 300)[step - 1]] = 11  # repeats of one row
                grads = torch.randn(n, dim, generator=g).to(device)
                size = torch.tensor(0.01 * (1 - 0.999**step) ** 0.5 / (1 - 0.9**step), device=device)
                lazy_adam_(weight, m, v, ids, grads, size, 0.9, 0.999, 1e-8)
        states.append((weight, m, v))
    hot = torch.zeros(rows, dtype=torch.bool, device=device)
    hot[11] = True
    for got, want in zip(*states):
        torch.testing.assert_close(got[~hot], want[~hot], rtol=1e-5, atol=1e-6)
        # the hot row sums up to 300 gradients in another order (the reference's index_add_ on CUDA: atomics)
        torch.testing.assert_close(got[hot], want[hot], rtol=1e-4, atol=1e-4)


def compare_lazy_adam_small_table(device: str) -> None:
    """Three LazyAdam steps on a table with fewer rows than lookups (the ``scatter_rows`` case, a category table):
    the Triton update of the touched rows against the torch reference; rows never looked up keep their weights and
    moments (the lazy rule), checked against the initial values too."""
    g = torch.Generator().manual_seed(7)
    for dim in (16, 7, 130):
        rows, n = 300, 600
        init = torch.randn(rows, dim, generator=g).to(device)
        batches = []
        for step in range(1, 4):
            ids = torch.randint(0, rows - 40, (n,), generator=g).to(device)  # rows 260.. never touched
            grads = torch.randn(n, dim, generator=g).to(device)
            size = torch.tensor(0.01 * (1 - 0.999**step) ** 0.5 / (1 - 0.9**step), device=device)
            batches.append((ids, grads, size))
        states = []
        for torch_ops in ("", "lazy_adam"):
            weight, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
            with _torch_ops(torch_ops):
                for ids, grads, size in batches:
                    lazy_adam_(weight, m, v, ids, grads, size, 0.9, 0.999, 1e-8)
            states.append((weight, m, v))
        for got, want in zip(*states):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        weight, m, v = states[0]
        assert torch.equal(weight[260:], init[260:]) and not m[260:].any() and not v[260:].any()
        assert not torch.equal(weight[:260], init[:260])


def compare_lazy_adam_tile_edges(device: str) -> None:
    """Runs laid against the kernel's tiles of ``block_n(dim)`` sorted positions: a run filling a tile exactly,
    a single id then a run ending on the next tile's end, a run starting at a tile's first position and spanning
    three tiles, single ids, a run crossing a tile edge; the Triton kernel against the torch reference, for narrow
    and wide rows. The distinct ids increase in the order of ``counts``, so after the kernel's sort the runs lie at
    exactly these positions (the lookups themselves come shuffled)."""
    from recsys.ops.triton_sparse_adam import block_n

    for dim in (16, 7, 130):
        tile = block_n(dim)
        counts = torch.tensor([tile, 1, tile - 1, 2 * tile + 3, 1, 1, tile, 5, 3 * tile])
        g = torch.Generator().manual_seed(dim)
        distinct = torch.randperm(50_000, generator=g)[: counts.numel()].sort().values
        ids = torch.repeat_interleave(distinct, counts)
        ids = ids[torch.randperm(ids.numel(), generator=g)].to(device)
        grads = torch.randn(ids.numel(), dim, generator=g).to(device)
        init = torch.randn(50_000, dim, generator=g).to(device)
        states = []
        for torch_ops in ("", "lazy_adam"):
            weight, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
            with _torch_ops(torch_ops):
                lazy_adam_(weight, m, v, ids, grads, torch.tensor(0.01, device=device), 0.9, 0.999, 1e-8)
            states.append((weight, m, v))
        for got, want in zip(*states):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_named_ops_fall_back_to_their_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECSYS_TORCH_OPS", "gather_rows, lazy_adam")
    assert not use_triton("cpu", "gather_rows") and not use_triton("cpu", "lazy_adam")
    assert use_triton("cpu", "softmax_pool") == HAS_TRITON
    with pytest.raises(ValueError, match="unknown gather_rows backend"):
        gather_rows(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(3))
def test_gather_rows_and_lazy_adam_kernels_on_cuda_match_their_references(seed):
    assert use_triton("cuda", "gather_rows") and use_triton("cuda", "lazy_adam")
    compare_gather_rows(seed, "cuda")
    compare_target_and_history_rows(seed, "cuda")
    compare_lazy_adam(seed, "cuda")
    if seed == 0:
        compare_lazy_adam_tile_edges("cuda")
        compare_lazy_adam_small_table("cuda")


@pytest.mark.gpu
def test_lookups_and_lazy_adam_kernels_replay_in_a_cuda_graph():
    """One sparse lookup + LazyAdam step (Triton kernels, more rows than lookups) recorded by GraphedStep and
    replayed on new ids equals the same steps run eagerly."""
    torch.manual_seed(0)
    init = torch.randn(20_000, 16, device="cuda")
    batches = [torch.randint(0, 20_000, (64, 50), device="cuda") for _ in range(4)]
    eager = torch.nn.Parameter(init.clone())
    opt = LazyAdam([eager], lr=0.01)
    for ids in batches:
        opt.zero_grad()
        gather_rows(eager, ids, sparse=True).pow(2).sum().backward()
        opt.step()
    graphed = torch.nn.Parameter(init.clone())
    gopt = LazyAdam([graphed], lr=0.01)

    def step(ids: torch.Tensor) -> None:
        gopt.zero_grad()
        gather_rows(graphed, ids, sparse=True).pow(2).sum().backward()
        gopt.step()

    graphed_step = GraphedStep(step, warmup=1)  # batch 0 eager (creates the optimiser state), 1 recorded, 2-3 replayed
    for ids in batches:
        graphed_step(ids)
    assert graphed_step.failed is None and graphed_step.replays == 3
    torch.testing.assert_close(graphed.detach(), eager.detach(), rtol=1e-5, atol=1e-6)


# ---- sparse table updates -----------------------------------------------------------------------------


def test_dedup_rows_sums_each_distinct_id():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 300):
        ids = torch.randint(0, 20, (n,), generator=g)
        grads = torch.randn(n, 3, generator=g)
        rows, summed, valid = dedup_rows(ids, grads)
        unique, inverse = torch.unique(ids, return_inverse=True)
        want = torch.zeros(unique.numel(), 3).index_add_(0, inverse, grads)
        u = unique.numel()
        assert torch.equal(rows[:u], unique) and valid[:u].all() and not valid[u:].any()
        torch.testing.assert_close(summed[:u], want)
        assert not summed[u:].any() and (rows[u:] == rows[0]).all()


def lookups(table: torch.nn.Parameter, seed: int) -> torch.Tensor:
    """A loss over two sparse lookups of ``table`` with repeated ids (gradients accumulate uncoalesced)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, table.shape[0], (4, 9), generator=g)
    b = torch.randint(0, 5, (6,), generator=g)  # a few hot rows
    w = torch.randn(table.shape[1], generator=g)
    return (F.embedding(a, table, sparse=True) @ w).pow(2).sum() + (F.embedding(b, table, sparse=True) @ w).sum()


# 30 / 40 rows: fewer rows than the 42 lookups (the dense scatter_rows form); 300 / 400: more (dedup_rows slots)
@pytest.mark.parametrize("rows", [30, 300])
def test_row_wise_adagrad_matches_the_dense_rule_and_ignores_untouched_rows(rows):
    torch.manual_seed(0)
    init = torch.randn(rows, 4)
    sparse = torch.nn.Parameter(init.clone())
    dense = torch.nn.Parameter(init.clone())
    opt = RowWiseAdagrad([sparse], lr=0.1, eps=1e-6)
    acc = torch.zeros(rows)
    for seed in range(5):
        opt.zero_grad()
        lookups(sparse, seed).backward()
        assert sparse.grad.is_sparse
        opt.step()
        dense.grad = None
        lookups_dense = lookups(dense, seed)
        grad = torch.autograd.grad(lookups_dense, dense)[0].to_dense()  # same loss, as a dense gradient
        touched = grad.abs().sum(1) > 0
        with torch.no_grad():  # the rule, row by row: G += mean(g^2); w -= lr g / (sqrt(G) + eps)
            acc[touched] += grad[touched].pow(2).mean(1)
            dense[touched] -= 0.1 * grad[touched] / (acc[touched].sqrt() + 1e-6).unsqueeze(1)
        torch.testing.assert_close(sparse.detach(), dense.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[sparse]["sum"], acc, rtol=1e-5, atol=1e-7)


def test_row_wise_adagrad_dense_gradients_give_the_same_update():
    torch.manual_seed(1)
    init = torch.randn(25, 3)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    oa, ob = RowWiseAdagrad([a], lr=0.05), RowWiseAdagrad([b], lr=0.05)
    for seed in range(3):
        oa.zero_grad()
        ob.zero_grad()
        lookups(a, seed).backward()
        b.grad = torch.autograd.grad(lookups(b, seed), b)[0].to_dense()
        oa.step()
        ob.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [40, 400])
def test_lazy_adam_matches_torch_sparse_adam(rows):
    torch.manual_seed(2)
    init = torch.randn(rows, 5)
    ours, ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    o1 = LazyAdam([ours], lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    o2 = torch.optim.SparseAdam([ref], lr=0.01, betas=(0.8, 0.99), eps=1e-7)
    for seed in range(6):
        for p, o in ((ours, o1), (ref, o2)):
            o.zero_grad()
            lookups(p, seed).backward()
            o.step()
        torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o1.state[ours]["exp_avg_sq"], o2.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-8)
