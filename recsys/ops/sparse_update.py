"""Sparse embedding-table updates: only the rows a batch touched, no dense gradient of the table, no host sync.

A table looked up with ``F.embedding(..., sparse=True)`` gets a sparse COO gradient: the looked-up ids
``[N]`` (with repeats, uncoalesced) and one gradient row ``[N, D]`` per lookup. :func:`dedup_rows` sums the
rows of each distinct id without ``torch.unique`` or ``coalesce`` (both wait for the device to count the
distinct ids): ids are sorted, a group number is the running count of "new id" flags, and gradients are
``index_add``-ed into ``[N, D]`` group slots; slots past the last group are padding (``valid`` False) that
repeat group 0's row with a zero update, so every shape is ``N`` and nothing is read back to the host.

Optimisers (``torch.optim.Optimizer`` over 2-D tables; dense gradients are accepted too, as every row):

- :class:`RowWiseAdagrad`: FBGEMM's row-wise Adagrad, one accumulator per row:
  ``G_r += mean_d(g_r^2)``, ``w_r -= lr g_r / (sqrt(G_r) + eps)`` (a ``[rows]`` state: 1/D of Adam's memory);
- :class:`LazyAdam`: Adam on the touched rows only (``torch.optim.SparseAdam``'s rule; moments of other
  rows are left as they are), with the step count kept on the device as a 0-d tensor (no host read, and a
  CUDA graph of the step replays the bias corrections right).

Both are pure torch (index_select / index_add / index_copy); ``tests/test_kernels.py`` checks them
against dense references and ``torch.optim.SparseAdam``. On CUDA (op name ``lazy_adam``), LazyAdam's
``dedup_rows`` case runs one Triton kernel instead (``triton_sparse_adam.py``: sums, moments and weights per
row after one sort), and its ``scatter_rows`` case (small tables) one kernel for moments and weights of the touched
rows after the sums; both tested against this reference.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from recsys.ops.backend import use_triton


def dedup_rows(ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids [N]``, ``grads [N, D]`` -> ``(rows [N], summed [N, D], valid [N])``: the first ``U`` slots hold the
    ``U`` distinct ids (ascending) and their summed gradients; the other slots repeat ``rows[0]`` with zero
    gradient and ``valid`` False. Fixed shapes, no host sync."""
    if ids.numel() == 0:
        return ids, grads, torch.zeros_like(ids, dtype=torch.bool)
    sorted_ids, order = torch.sort(ids)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.cumsum(new, 0) - 1
    summed = torch.zeros_like(grads).index_add_(0, group, grads.index_select(0, order))
    rows = torch.zeros_like(ids).scatter_(0, group, sorted_ids)  # every member of a group writes the same id
    valid = torch.arange(ids.numel(), device=ids.device) <= group[-1]
    return torch.where(valid, rows, rows[:1]), summed, valid


def scatter_rows(ids: torch.Tensor, grads: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [N]``, ``grads [N, D]`` -> ``(summed [rows, D], touched [rows])``: the gradient summed per table row
    (repeats added) and which rows the ids touched. For tables of at most ``N`` rows (a category table looked up
    ``B x L`` times) this dense form is smaller than :func:`dedup_rows`'s ``[N, D]`` slots and needs no sort."""
    summed = torch.zeros(rows, grads.shape[1], dtype=grads.dtype, device=grads.device).index_add_(0, ids, grads)
    touched = torch.zeros(rows, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
    return summed, touched


def _small(weight: torch.Tensor, ids: torch.Tensor | None) -> bool:
    """Whether the dense form (:func:`scatter_rows`) is the smaller one for this table and batch."""
    return ids is not None and weight.shape[0] <= ids.numel()


def _rows_and_grads(param: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(ids [N], grad rows [N, D])`` of a sparse gradient (``ids=None`` for a dense one: all rows)."""
    grad = param.grad
    if param.dim() != 2:
        raise ValueError(f"sparse table optimisers take 2-D tables, got a parameter of shape {tuple(param.shape)}")
    if grad.is_sparse:
        return grad._indices()[0], grad._values()
    return None, grad


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad (see module docstring); ``lr``, ``eps``, ``initial_accumulator_value``."""

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float = 0.01, eps: float = 1e-8, initial_accumulator_value: float = 0
    ) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sum"] = torch.full(
                        (p.shape[0],), float(group["initial_accumulator_value"]), dtype=torch.float32, device=p.device
                    )
                ids, grads = _rows_and_grads(p)
                rowwise_adagrad_(p, state["sum"], ids, grads, group["lr"], group["eps"])
        return loss


def rowwise_adagrad_(
    weight: torch.Tensor, acc: torch.Tensor, ids: torch.Tensor | None, grads: torch.Tensor, lr: float, eps: float
) -> None:
    """In place: row-wise Adagrad on the rows ``ids [N]`` (repeats summed) with ``grads [N, D]``
    (``ids=None``: ``grads`` is the dense ``[rows, D]`` gradient)."""
    if _small(weight, ids):  # summed per row; untouched rows get a zero gradient, i.e. no change
        ids, grads = None, scatter_rows(ids, grads.float(), weight.shape[0])[0]
    if ids is None:
        acc.add_(grads.float().pow(2).mean(1))
        weight.addcdiv_(grads, (acc.sqrt() + eps).unsqueeze(1).to(weight.dtype), value=-lr)
        return
    rows, summed, _ = dedup_rows(ids, grads.float())
    acc.index_add_(0, rows, summed.pow(2).mean(1))  # padding slots add 0
    std = acc.index_select(0, rows).sqrt_().add_(eps)
    weight.index_add_(0, rows, (summed / std.unsqueeze(1)).mul_(-lr).to(weight.dtype))


class LazyAdam(torch.optim.Optimizer):
    """Adam on the rows each step touched (see module docstring); ``lr``, ``betas``, ``eps``."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                step = state["step"]
                if not isinstance(step, torch.Tensor) or step.device != p.device:  # older or CPU-loaded states
                    state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
            sizes = _step_sizes([self.state[p]["step"] for p in params], group["lr"], beta1, beta2)
            for p, size in zip(params, sizes):
                ids, grads = _rows_and_grads(p)
                state = self.state[p]
                lazy_adam_(p, state["exp_avg"], state["exp_avg_sq"], ids, grads, size, beta1, beta2, group["eps"])
        return loss


def _step_sizes(steps: list[torch.Tensor], lr: float, beta1: float, beta2: float) -> list[torch.Tensor]:
    """Advance the 0-d step counts ``steps`` by one (in place) -> each table's Adam step size with both bias
    corrections, ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, on the steps' devices: no host read of a step, so a
    CUDA graph replays them right; foreach ops, so the kernel count does not grow with the number of tables."""
    torch._foreach_add_(steps, 1)
    first = torch._foreach_pow(beta1, steps)  # beta1^t
    second = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(first)
    torch._foreach_add_(first, 1)  # 1 - beta1^t
    torch._foreach_neg_(second)
    torch._foreach_add_(second, 1)
    torch._foreach_sqrt_(second)  # sqrt(1 - beta2^t)
    sizes = torch._foreach_div(second, first)
    torch._foreach_mul_(sizes, lr)
    return sizes


def lazy_adam_(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ids: torch.Tensor | None,
    grads: torch.Tensor,
    step_size: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place: one Adam step (bias corrections folded into ``step_size``, a number or a 0-d tensor on the
    weights' device) on the rows ``ids`` (repeats summed; ``None``: dense ``grads``, every row)."""
    touched = None
    fast = use_triton(weight.device, "lazy_adam") and all(t.stride(1) == 1 for t in (weight, exp_avg, exp_avg_sq))
    if _small(weight, ids):  # summed per row, and only the touched rows' moments move (the lazy rule)
        grads, touched = scatter_rows(ids, grads.float(), weight.shape[0])
        ids = None
        if fast:
            from recsys.ops.triton_sparse_adam import lazy_adam_dense_triton

            lazy_adam_dense_triton(weight, exp_avg, exp_avg_sq, grads, touched, step_size, beta1, beta2, eps)
            return
    if ids is None:
        rows, summed = None, grads.float()
        m, v = (exp_avg.clone(), exp_avg_sq.clone()) if touched is not None else (exp_avg, exp_avg_sq)
    elif fast:
        from recsys.ops.triton_sparse_adam import lazy_adam_rows_triton

        lazy_adam_rows_triton(weight, exp_avg, exp_avg_sq, ids, grads, step_size, beta1, beta2, eps)
        return
    else:
        rows, summed, valid = dedup_rows(ids, grads.float())
        m, v = exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
    # torch.optim.SparseAdam's arithmetic: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2)
    m.add_((summed - m).mul_(1 - beta1))
    v.add_((summed * summed - v).mul_(1 - beta2))
    update = (m / v.sqrt().add_(eps)).mul_(-step_size)
    if rows is None:
        if touched is not None:  # m, v are copies: write back the touched rows only
            keep = touched.unsqueeze(1)
            exp_avg.copy_(torch.where(keep, m, exp_avg))
            exp_avg_sq.copy_(torch.where(keep, v, exp_avg_sq))
            update = update * keep
        weight.add_(update.to(weight.dtype))
        return
    # padding slots (valid False) repeat row rows[0]: give them slot 0's values so duplicate writes agree
    pick = lambda t: torch.where(valid.unsqueeze(1), t, t[:1])  # noqa: E731
    exp_avg.index_copy_(0, rows, pick(m))
    exp_avg_sq.index_copy_(0, rows, pick(v))
    weight.index_add_(0, rows, (update * valid.unsqueeze(1)).to(weight.dtype))
