"""Masked softmax pooling over selected history slots: the aggregation of DARE / TWIN target attention.

``softmax_pool(scores [B, L], mask [B, L], values [B, L, D], index [B, K] | None) -> (pooled [B, D], weights [B, K])``

with ``index`` the top-K slots of each row (``None``: all ``L`` slots)::

    s_k = scores[b, index[b, k]]  (PAD_SCORE where mask is False)
    w = softmax(s)                pooled[b] = sum_k w_k values[b, index[b, k]]

One front-end, two backends (the generative-recommenders pattern): :func:`softmax_pool_torch` is the
reference (gathers, ``masked_fill``, softmax, einsum); the Triton backend (``triton_softmax_pool.py``) does
gather, softmax and weighted sum in one pass per row without materialising the ``[B, K, D]`` gathered
values. Its backward recomputes the reference under autograd (exact gradients, one extra forward of the
small reference). :func:`recsys.ops.backend.use_triton` picks the backend; tests compare the two on random
jagged inputs.
"""

from __future__ import annotations

import torch

from recsys.ops.backend import use_triton

# score of padded slots, as the DARE reference code: -(2^32 - 1) (softmax weight exactly 0 next to a real slot)
PAD_SCORE = -(2.0**32 - 1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with padded slots set to ``PAD_SCORE``."""
    return torch.softmax(scores.masked_fill(~mask, PAD_SCORE), dim=-1)


def softmax_pool_torch(
    scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`softmax_pool`."""
    if index is not None:
        scores, mask = scores.gather(1, index), mask.gather(1, index)
        values = values.gather(1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    weights = masked_softmax(scores, mask)
    return torch.einsum("bk,bkd->bd", weights, values), weights


class _TritonSoftmaxPool(torch.autograd.Function):
    """Triton forward; backward by autograd through the torch reference (recomputed)."""

    @staticmethod
    def forward(ctx, scores, mask, values, index):  # noqa: ANN001, ANN205
        from recsys.ops.triton_softmax_pool import softmax_pool_triton

        ctx.save_for_backward(scores, mask, values, index)
        return softmax_pool_triton(scores, mask, values, index)

    @staticmethod
    def backward(ctx, grad_pooled, grad_weights):  # noqa: ANN001, ANN205
        scores, mask, values, index = ctx.saved_tensors
        need_scores, _, need_values, _ = ctx.needs_input_grad
        with torch.enable_grad():
            s = scores.detach().requires_grad_(need_scores)
            v = values.detach().requires_grad_(need_values)
            pooled, weights = softmax_pool_torch(s, mask, v, index)
            outputs, grads = [pooled], [grad_pooled]
            if grad_weights is not None:
                outputs.append(weights)
                grads.append(grad_weights)
            inputs = [t for t in (s, v) if t.requires_grad]
            got = iter(torch.autograd.grad(outputs, inputs, grads, allow_unused=True) if inputs else ())
        return (next(got) if need_scores else None), None, (next(got) if need_values else None), None


def softmax_pool(
    scores: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], weights [B, K])``; see the module docstring. ``backend``: ``"triton"`` | ``"torch"`` |
    ``None`` (automatic: Triton on CUDA when importable)."""
    backend = backend or ("triton" if use_triton(values.device, "softmax_pool") else "torch")
    if backend == "triton":
        return _TritonSoftmaxPool.apply(scores, mask, values, index)
    if backend != "torch":
        raise ValueError(f"unknown softmax_pool backend '{backend}'; choose 'triton' or 'torch'")
    return softmax_pool_torch(scores, mask, values, index)
