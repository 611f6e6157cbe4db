"""Triton backend of :func:`recsys.ops.gather_rows.gather_rows` (forward only; see that module).

Each program copies ``BLOCK_N`` looked-up rows: it loads their ids, then reads the rows as one
``[BLOCK_N, BLOCK_D]`` tile (a 16-float row is one 64-byte vector load per row) and writes it out. With a
``keep [N]`` mask, rows whose flag is False are written as zeros without reading the table (padding slots). Imported
lazily (Triton is optional); under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 4096  # elements of one [BLOCK_N, BLOCK_D] tile


@triton.jit
def _gather_rows_kernel(
    weight, ids, keep, out, num, dim, stride_w, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < num
    row = tl.load(ids + n, mask=in_n, other=0).to(tl.int64)
    read = in_n
    if MASKED:
        read = read & (tl.load(keep + n, mask=in_n, other=0) != 0)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = (d < dim)[None, :]
        tile = tl.load(weight + row[:, None] * stride_w + d[None, :], mask=read[:, None] & in_d, other=0.0)
        tl.store(out + n[:, None] * dim + d[None, :], tile, mask=in_n[:, None] & in_d)


def gather_rows_triton(weight: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [R, D]`` (unit stride along D), ``ids [N]`` (contiguous, in range), ``keep [N]`` bool (contiguous;
    ``None``: every row) -> ``[N, D]``, zero rows where ``keep`` is False."""
    num, dim = ids.numel(), weight.shape[1]
    out = weight.new_empty(num, dim)
    if num == 0 or dim == 0:
        return out
    block_d = min(triton.next_power_of_2(dim), 256)
    block_n = max(1, min(TILE // block_d, 128))
    _gather_rows_kernel[(triton.cdiv(num, block_n),)](
        weight,
        ids,
        ids if keep is None else keep.view(torch.uint8),
        out,
        num,
        dim,
        weight.stride(0),
        MASKED=keep is not None,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return out
