"""Embedding rows by id: the lookup of a local table, with the gradient the table's optimiser expects.

``gather_rows(weight [R, D], ids [*S], sparse: bool) -> rows [*S, D]``,  ``rows[s] = weight[ids[s]]``

The gradient of ``weight`` is what ``F.embedding(ids, weight, sparse=sparse)`` gives: ``sparse=True`` a sparse
COO tensor (``ids`` flattened as its indices, uncoalesced, one gradient row per lookup: what
:mod:`recsys.ops.sparse_update`'s optimisers read), ``sparse=False`` the dense ``[R, D]`` sum.

One front-end, two backends (the generative-recommenders pattern): :func:`gather_rows_torch` is the reference
(``F.embedding`` itself); the Triton backend (``triton_gather_rows.py``) reads each row with one vector load
instead of the generic gather kernel (on the H200, PyTorch's gather moved 411,648 16-float rows in ~0.25 ms,
~100 GB/s; the Triton kernel in ~0.013 ms), and its backward (:func:`table_gradient`) builds the gradient
``F.embedding`` would. :func:`recsys.ops.backend.use_triton` picks the backend (op name ``gather_rows``).
:func:`target_and_history_rows` is the lookup of a batch's targets and history slots in one table (masked padding
slots, one gradient for the table), with the same two backends.
``ids`` must be in ``[0, R)``: the Triton backend does not check (the package's ids come from its own vocabulary
and id maps, which send unseen ids to row 0 or reject them before any lookup).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recsys.ops.backend import use_triton


def gather_rows_torch(weight: torch.Tensor, ids: torch.Tensor, sparse: bool = False) -> torch.Tensor:
    """Reference: ``F.embedding`` (its forward and its backward)."""
    return F.embedding(ids, weight, sparse=sparse)


def _gather_triton(weight: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    from recsys.ops.triton_gather_rows import gather_rows_triton

    flat = ids.reshape(-1).contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    keep = None if keep is None else keep.reshape(-1).contiguous()
    return gather_rows_triton(weight, flat, keep).view(*ids.shape, weight.shape[1])


def table_gradient(grad_rows: torch.Tensor, ids: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    """``grad_rows [*S, D]`` of the rows looked up by ``ids [*S]`` -> the gradient of the ``shape`` table, as
    ``F.embedding``'s backward makes it: sparse COO (one row per lookup, uncoalesced; no device-to-host read) or
    the dense sum. The dense sum of a table with at most twice as many rows as a row of ``ids [B, L]`` has
    (the position table: ``L + 1`` rows) is summed per batch row into a ``[B, R, D]`` buffer, then over the batch
    (:func:`_rowwise_sum`: no sort); else ``F.embedding``'s own dense kernel (deterministic)."""
    if sparse:
        values = grad_rows.reshape(-1, shape[1])
        return torch.sparse_coo_tensor(
            ids.reshape(-1).long().unsqueeze(0), values, shape, is_coalesced=False, check_invariants=False
        )
    if ids.dim() == 2 and shape[0] <= 2 * ids.shape[1]:
        return _rowwise_sum(grad_rows, ids, shape[0])
    values = grad_rows.reshape(-1, shape[1])
    return torch.ops.aten.embedding_dense_backward(values, ids.reshape(-1), shape[0], -1, False)


def _rowwise_sum(grad_rows: torch.Tensor, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``grad_rows [B, L, D]``, ``ids [B, L]`` -> ``[rows, D]`` sums: one scatter-add per batch row into its own
    ``[rows, D]`` slice (ids repeat inside a row only where they repeat in the data: few colliding atomic adds,
    where the dense kernel sorts all ``B * L`` ids), then a sum over the batch. Float sums in another order than
    ``F.embedding``'s: equal up to rounding. The buffer is at most twice the size of ``grad_rows``."""
    batch, width, dim = grad_rows.shape
    per_row = grad_rows.new_zeros(batch, rows, dim, dtype=torch.float32)
    per_row.scatter_add_(1, ids.long().unsqueeze(-1).expand(batch, width, dim), grad_rows.float())
    return per_row.sum(0).to(grad_rows.dtype)


class _TritonGatherRows(torch.autograd.Function):
    """Triton forward; backward by :func:`table_gradient`."""

    @staticmethod
    def forward(ctx, weight, ids, sparse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(ids)
        ctx.shape, ctx.sparse = weight.shape, sparse
        return _gather_triton(weight, ids)

    @staticmethod
    def backward(ctx, grad_rows):  # noqa: ANN001, ANN205
        (ids,) = ctx.saved_tensors
        grad = table_gradient(grad_rows, ids, ctx.shape, ctx.sparse) if ctx.needs_input_grad[0] else None
        return grad, None, None


def _backend(weight: torch.Tensor, backend: str | None) -> str:
    backend = backend or ("triton" if use_triton(weight.device, "gather_rows") else "torch")
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown gather_rows backend '{backend}'; choose 'triton' or 'torch'")
    return backend


def gather_rows(
    weight: torch.Tensor, ids: torch.Tensor, sparse: bool = False, backend: str | None = None
) -> torch.Tensor:
    """``[*ids.shape, D]``; see the module docstring. ``backend``: ``"triton"`` | ``"torch"`` | ``None``
    (automatic: Triton on CUDA when importable)."""
    if _backend(weight, backend) == "triton":
        return _TritonGatherRows.apply(weight, ids, sparse)
    return gather_rows_torch(weight, ids, sparse)


def target_and_history_rows_torch(
    weight: torch.Tensor, target: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor, sparse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`target_and_history_rows`: one ``F.embedding`` of the ``[B, 1 + L]`` ids, split, the
    history rows multiplied by the mask."""
    rows = F.embedding(torch.cat([target.unsqueeze(1).to(hist.dtype), hist], dim=1), weight, sparse=sparse)
    return rows[:, 0], rows[:, 1:] * mask.unsqueeze(-1)


class _TritonTargetAndHistoryRows(torch.autograd.Function):
    """Triton forward (padding rows written as zeros by the gather); backward: the ``[B + B L, D]`` gradient rows
    (targets', then the history's times the mask) written once, contiguous, then :func:`table_gradient`."""

    @staticmethod
    def forward(ctx, weight, target, hist, mask, sparse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(target, hist, mask)
        ctx.shape, ctx.sparse = weight.shape, sparse
        return _gather_triton(weight, target), _gather_triton(weight, hist, mask)

    @staticmethod
    def backward(ctx, grad_target, grad_hist):  # noqa: ANN001, ANN205
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        target, hist, mask = ctx.saved_tensors
        (batch, width), dim = hist.shape, ctx.shape[1]
        values = grad_hist.new_empty(batch * (1 + width), dim)
        if grad_target is None:
            values[:batch].zero_()
        else:
            values[:batch].copy_(grad_target)
        if grad_hist is None:
            values[batch:].zero_()
        else:
            torch.mul(grad_hist, mask.unsqueeze(-1), out=values[batch:].view(batch, width, dim))
        ids = torch.cat([target.reshape(-1).to(hist.dtype), hist.reshape(-1)])
        return table_gradient(values, ids, ctx.shape, ctx.sparse), None, None, None, None


def target_and_history_rows(
    weight: torch.Tensor,
    target: torch.Tensor,
    hist: torch.Tensor,
    mask: torch.Tensor,
    sparse: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a batch's targets and history slots in one table: ``weight [R, D]``, ``target [B]``, ``hist [B, L]``,
    ``mask [B, L]`` (False = padding slot) -> ``(target rows [B, D], history rows [B, L, D])``, padding rows zero.

    The table gets ONE gradient (sparse COO of ``B + B L`` rows, or the dense sum) where two lookups would give two
    (two sparse gradients are summed by coalescing: a host sync); padding slots pass no gradient. The Triton
    backend writes padding rows as zeros in the gather and builds the gradient rows in one contiguous buffer, where
    the reference (:func:`target_and_history_rows_torch`) multiplies by the mask and slices (on the H200 that was
    a mask product, slice gradients filled and added, and strided copies: ~0.1 ms a table a step)."""
    if _backend(weight, backend) == "triton":
        return _TritonTargetAndHistoryRows.apply(weight, target, hist, mask, sparse)
    return target_and_history_rows_torch(weight, target, hist, mask, sparse)
