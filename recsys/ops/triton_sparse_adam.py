"""Triton backend of :func:`recsys.ops.sparse_update.lazy_adam_` for tables looked up more often than they
have rows to spare (the ``dedup_rows`` case): gradient sums per row, Adam moments and the weight update in one
kernel, after one sort of the ids.

The ids ``[N]`` are sorted once (``torch.sort``: the order of each lookup's gradient row). Program ``i`` owns
sorted position ``i`` when it starts a run of equal ids; it then walks the run ``CHUNK`` positions at a time,
summing the gradient rows ``grads[order[j]]`` in float32, and applies ``torch.optim.SparseAdam``'s rule to that
one table row: ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``, ``w += -step_size * m / (sqrt(v) + eps)``.
Every row is written by exactly one program, so there are no atomics, no ``[N, D]`` summed or gathered copies
and no device-to-host read (the grid is ``N`` programs whatever the number of distinct ids). A second grid
axis splits rows wider than ``BLOCK_D``. Imported lazily; under ``TRITON_INTERPRET=1`` it runs on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16  # sorted positions read per step of a run


@triton.jit
def _lazy_adam_kernel(
    sorted_ids,
    order,
    grads,
    weight,
    exp_avg,
    exp_avg_sq,
    step_size,
    num,
    dim,
    stride_g,
    stride_w,
    stride_m,
    stride_v,
    beta1,
    beta2,
    eps,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = d < dim
    row = tl.load(sorted_ids + i)
    prev = tl.load(sorted_ids + tl.maximum(i - 1, 0))
    start = (row != prev) | (i == 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    j = i
    matched = tl.where(start, CHUNK, 0)
    while matched == CHUNK:  # the run may go on past this chunk
        k = j + tl.arange(0, CHUNK)
        same = (k < num) & (tl.load(sorted_ids + k, mask=k < num, other=-1) == row)
        src = tl.load(order + k, mask=same, other=0)
        g = tl.load(grads + src[:, None] * stride_g + d[None, :], mask=same[:, None] & in_d[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
        matched = tl.sum(same.to(tl.int32), axis=0)
        j += CHUNK
    own = in_d & (tl.zeros([BLOCK_D], dtype=tl.int32) + start.to(tl.int32) > 0)  # [BLOCK_D]: this row is ours
    m = tl.load(exp_avg + row * stride_m + d, mask=own, other=0.0)
    v = tl.load(exp_avg_sq + row * stride_v + d, mask=own, other=0.0)
    w = tl.load(weight + row * stride_w + d, mask=own, other=0.0)
    m = m + (acc - m) * (1 - beta1)
    v = v + (acc * acc - v) * (1 - beta2)
    update = m / (tl.sqrt(v) + eps) * -tl.load(step_size)
    tl.store(exp_avg + row * stride_m + d, m, mask=own)
    tl.store(exp_avg_sq + row * stride_v + d, v, mask=own)
    tl.store(weight + row * stride_w + d, w + update.to(w.dtype), mask=own)


def lazy_adam_rows_triton(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    ids: torch.Tensor,
    grads: torch.Tensor,
    step_size: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place on ``weight [R, D]`` and its float32 moments (unit stride along D): one lazy Adam step on the
    rows ``ids [N]`` (repeats summed) with ``grads [N, D]``; ``step_size`` a number or a 0-d tensor."""
    num, dim = ids.numel(), weight.shape[1]
    if num == 0 or dim == 0:
        return
    sorted_ids, order = torch.sort(ids.reshape(-1))
    grads = grads if grads.stride(1) == 1 else grads.contiguous()
    size = torch.as_tensor(step_size, dtype=torch.float32, device=weight.device).reshape(())
    block_d = min(triton.next_power_of_2(dim), 128)
    _lazy_adam_kernel[(num, triton.cdiv(dim, block_d))](
        sorted_ids,
        order,
        grads,
        weight,
        exp_avg,
        exp_avg_sq,
        size,
        num,
        dim,
        grads.stride(0),
        weight.stride(0),
        exp_avg.stride(0),
        exp_avg_sq.stride(0),
        beta1,
        beta2,
        eps,
        CHUNK=CHUNK,
        BLOCK_D=block_d,
        num_warps=1 if block_d * CHUNK <= 512 else 4,
    )
