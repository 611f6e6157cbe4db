"""Triton backend of :func:`recsys.ops.softmax_pool.softmax_pool` (forward only; see that module).

One program per batch row: load the row's ``K`` selected scores and mask bits, softmax them in float32,
then read the ``K`` selected value rows in ``[K, BLOCK_D]`` tiles (``BLOCK_D`` sized so a tile holds about
8k elements, so wide tokens do not spill registers) and reduce each to ``BLOCK_D`` outputs. Imported lazily
(Triton is optional); under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys.ops.softmax_pool import PAD_SCORE

TILE = 8192  # elements of one [BLOCK_K, BLOCK_D] value tile


@triton.jit
def _softmax_pool_kernel(
    scores,
    mask,
    values,
    index,
    pooled,
    weights,
    num_k,
    dim,
    stride_sb,
    stride_mb,
    stride_vb,
    stride_vl,
    stride_ib,
    pad_score,
    HAS_INDEX: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    in_k = k < num_k
    if HAS_INDEX:
        slot = tl.load(index + row * stride_ib + k, mask=in_k, other=0).to(tl.int64)
    else:
        slot = k.to(tl.int64)
    s = tl.load(scores + row * stride_sb + slot, mask=in_k, other=0.0).to(tl.float32)
    real = tl.load(mask + row * stride_mb + slot, mask=in_k, other=0)
    s = tl.where(real != 0, s, pad_score)
    s = tl.where(in_k, s, float("-inf"))
    e = tl.exp(s - tl.max(s, axis=0))
    w = e / tl.sum(e, axis=0)
    tl.store(weights + row * num_k + k, w, mask=in_k)
    rows = values + row * stride_vb + slot[:, None] * stride_vl
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < dim
        v = tl.load(rows + d[None, :], mask=in_k[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        out = tl.sum(w[:, None] * v, axis=0)
        tl.store(pooled + row * dim + d, out.to(pooled.dtype.element_ty), mask=in_d)


def softmax_pool_triton(
    scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D] in values' dtype, weights [B, K] float32)``."""
    batch, _, dim = values.shape
    num_k = index.shape[1] if index is not None else scores.shape[1]
    if values.stride(2) != 1:
        values = values.contiguous()
    scores = scores if scores.stride(1) == 1 else scores.contiguous()
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    mask = mask if mask.stride(1) == 1 else mask.contiguous()
    index_arg = index if index is None or index.stride(1) == 1 else index.contiguous()
    pooled = values.new_empty(batch, dim)
    weights = torch.empty(batch, num_k, dtype=torch.float32, device=values.device)
    if batch == 0 or num_k == 0:
        return pooled.zero_(), weights
    block_k = triton.next_power_of_2(num_k)
    _softmax_pool_kernel[(batch,)](
        scores,
        mask,
        values,
        index_arg if index_arg is not None else scores,  # unused without an index
        pooled,
        weights,
        num_k,
        dim,
        scores.stride(0),
        mask.stride(0),
        values.stride(0),
        values.stride(1),
        index_arg.stride(0) if index_arg is not None else 0,
        PAD_SCORE,
        HAS_INDEX=index_arg is not None,
        BLOCK_K=block_k,
        BLOCK_D=min(triton.next_power_of_2(dim), max(16, TILE // block_k)),
    )
    return pooled, weights.to(scores.dtype) if scores.dtype != torch.float32 else weights
