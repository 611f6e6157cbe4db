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


def _gather_triton(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from recsys.ops.triton_gather_rows import gather_rows_triton

    flat = ids.reshape(-1)
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    return gather_rows_triton(weight, flat if flat.is_contiguous() else flat.contiguous()).view(
        *ids.shape, weight.shape[1]
    )


def table_gradient(grad_rows: torch.Tensor, ids: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    """``grad_rows [*S, D]`` of the rows looked up by ``ids [*S]`` -> the gradient of the ``shape`` table, as
    ``F.embedding``'s backward makes it: sparse COO (one row per lookup, uncoalesced; no device-to-host read) or
    the dense sum (its own dense kernel, deterministic)."""
    flat = ids.reshape(-1)
    values = grad_rows.reshape(-1, shape[1])
    if sparse:
        return torch.sparse_coo_tensor(
            flat.long().unsqueeze(0), values, shape, is_coalesced=False, check_invariants=False
        )
    return torch.ops.aten.embedding_dense_backward(values, flat, shape[0], -1, False)


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


def gather_rows(
    weight: torch.Tensor, ids: torch.Tensor, sparse: bool = False, backend: str | None = None
) -> torch.Tensor:
    """``[*ids.shape, D]``; see the module docstring. ``backend``: ``"triton"`` | ``"torch"`` | ``None``
    (automatic: Triton on CUDA when importable)."""
    backend = backend or ("triton" if use_triton(weight.device, "gather_rows") else "torch")
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown gather_rows backend '{backend}'; choose 'triton' or 'torch'")
    if backend == "triton":
        return _TritonGatherRows.apply(weight, ids, sparse)
    return gather_rows_torch(weight, ids, sparse)
