"""Triton backend of :func:`recsys.ops.sparse_update.lazy_adam_` for tables looked up more often than they
have rows to spare (the ``dedup_rows`` case): gradient sums per row, Adam moments and the weight update in one
kernel, after one sort of the ids.

The ids ``[N]`` are sorted once (``torch.sort``, on int32 keys when the table has fewer than 2^31 rows: half the
radix passes of int64 keys), giving each lookup's gradient row its sorted position. Program ``p`` takes the
``BLOCK_N`` sorted positions ``[p * BLOCK_N, (p + 1) * BLOCK_N)`` as one ``[BLOCK_N, BLOCK_D]`` tile of gradient
rows ``grads[order[j]]`` and sums every run of equal ids in it with one segmented scan (a run restarts where the
id changes). A run belongs to the program whose tile holds its first position: runs that end inside the tile are
finished there; the tile's last run may go on into the next tiles, which its owner then reads ``BLOCK_N``
positions at a time (a hot id is a short walk of whole tiles, not a serial one). Each owned row then gets
``torch.optim.SparseAdam``'s rule: ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``,
``w += -step_size * m / (sqrt(v) + eps)``. Every row is written by exactly one program, so there are no atomics,
no ``[N, D]`` summed or gathered copies and no device-to-host read (the grid depends on ``N`` only, not on the
number of distinct ids). A second grid axis splits rows wider than ``BLOCK_D``.

Tables with no more rows than a batch's lookups (a category table) take the dense form instead: the gradient
summed per row and the touched rows (``scatter_rows``: one ``index_add_``, one ``index_fill_``), then
:func:`lazy_adam_dense_triton` applies the same rule to the touched rows in one pass over ``[R, D]`` tiles (where
the torch reference clones both moments and runs ~20 elementwise kernels). Imported lazily; under
``TRITON_INTERPRET=1`` both run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048  # gradient values per program tile: BLOCK_N = TILE // BLOCK_D sorted positions (at most MAX_BLOCK_N)
MAX_BLOCK_N = 128


def block_n(dim: int) -> int:
    """Sorted positions per program for rows ``dim`` wide."""
    return max(1, min(MAX_BLOCK_N, TILE // min(triton.next_power_of_2(dim), 128)))


@triton.jit
def _restart_sum(a, a_started, b, b_started):
    """Combine of the segmented scan: ``b`` restarts the sum where its run starts."""
    return tl.where(b_started > 0, b, a + b), a_started | b_started


@triton.jit
def _adam_rows(
    weight, exp_avg, exp_avg_sq, rows, d, grad, write, stride_w, stride_m, stride_v, step_size, beta1, beta2, eps
):
    """``torch.optim.SparseAdam``'s rule on the ``[BLOCK, BLOCK_D]`` tile of table rows ``rows`` / columns ``d``
    where ``write`` holds, with the summed gradients ``grad`` (float32): moments, then the weight."""
    m_at = exp_avg + rows[:, None] * stride_m + d[None, :]
    v_at = exp_avg_sq + rows[:, None] * stride_v + d[None, :]
    w_at = weight + rows[:, None] * stride_w + d[None, :]
    m = tl.load(m_at, mask=write, other=0.0)
    v = tl.load(v_at, mask=write, other=0.0)
    w = tl.load(w_at, mask=write, other=0.0)
    m = m + (grad - m) * (1 - beta1)
    v = v + (grad * grad - v) * (1 - beta2)
    update = m / (tl.sqrt(v) + eps) * -tl.load(step_size)
    tl.store(m_at, m, mask=write)
    tl.store(v_at, v, mask=write)
    tl.store(w_at, w + update.to(w.dtype), mask=write)


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
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    first = tl.program_id(0).to(tl.int64) * BLOCK_N
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = d < dim
    slot = tl.arange(0, BLOCK_N)
    pos = first + slot
    valid = pos < num
    ids = tl.load(sorted_ids + pos, mask=valid, other=-1).to(tl.int64)
    prev = tl.load(sorted_ids + pos - 1, mask=valid & (pos > 0), other=-2).to(tl.int64)
    after = tl.load(sorted_ids + pos + 1, mask=pos + 1 < num, other=-3).to(tl.int64)
    starts = valid & (ids != prev)
    ends = valid & (ids != after)
    src = tl.load(order + pos, mask=valid, other=0)
    g = tl.load(grads + src[:, None] * stride_g + d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
    started = tl.broadcast_to(starts.to(tl.int32)[:, None], (BLOCK_N, BLOCK_D))
    sums, owned = tl.associative_scan((g.to(tl.float32), started), 0, _restart_sum)  # owned: run began in the tile
    # the tile's last run, when it began here, may continue past the tile: its owner reads on, a tile at a time
    last = tl.minimum(num - 1 - first, BLOCK_N - 1)
    is_last = slot == last
    last_id = tl.sum(tl.where(is_last, ids, 0), axis=0)
    carried = tl.zeros([BLOCK_D], dtype=tl.float32)
    matched = tl.where(tl.max(starts.to(tl.int32), axis=0) > 0, BLOCK_N, 0)
    j = first + BLOCK_N
    while matched == BLOCK_N:
        k = j + slot
        same = (k < num) & (tl.load(sorted_ids + k, mask=k < num, other=-1).to(tl.int64) == last_id)
        more = tl.load(order + k, mask=same, other=0)
        rows = tl.load(grads + more[:, None] * stride_g + d[None, :], mask=same[:, None] & in_d[None, :], other=0.0)
        carried += tl.sum(rows.to(tl.float32), axis=0)
        matched = tl.sum(same.to(tl.int32), axis=0)
        j += BLOCK_N
    sums += tl.where(is_last[:, None], carried[None, :], 0.0)
    write = (owned > 0) & (ends | is_last)[:, None] & in_d[None, :]  # [BLOCK_N, BLOCK_D]: rows finished here
    _adam_rows(
        weight, exp_avg, exp_avg_sq, ids, d, sums, write, stride_w, stride_m, stride_v, step_size, beta1, beta2, eps
    )


def sort_ids(ids: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sorted ids ``[N]``, ``order [N]`` int64) of ``ids`` (any shape) into a table of ``rows`` rows; the keys
    are int32 when the table allows it (a radix sort of 4-byte keys makes half the passes of 8-byte ones)."""
    flat = ids.reshape(-1)
    return torch.sort(flat.int() if rows <= torch.iinfo(torch.int32).max else flat)


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
    sorted_ids, order = sort_ids(ids, weight.shape[0])
    grads = grads if grads.stride(1) == 1 else grads.contiguous()
    size = torch.as_tensor(step_size, dtype=torch.float32, device=weight.device).reshape(())
    block_d = min(triton.next_power_of_2(dim), 128)
    rows_per_tile = block_n(dim)
    _lazy_adam_kernel[(triton.cdiv(num, rows_per_tile), triton.cdiv(dim, block_d))](
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
        BLOCK_N=rows_per_tile,
        BLOCK_D=block_d,
        num_warps=4,
    )


@triton.jit
def _lazy_adam_dense_kernel(
    summed,
    touched,
    weight,
    exp_avg,
    exp_avg_sq,
    step_size,
    rows,
    dim,
    stride_g,
    stride_w,
    stride_m,
    stride_v,
    beta1,
    beta2,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    hit = (r < rows) & (tl.load(touched + r, mask=r < rows, other=0) != 0)
    write = hit[:, None] & (d < dim)[None, :]
    g = tl.load(summed + r[:, None] * stride_g + d[None, :], mask=write, other=0.0).to(tl.float32)
    _adam_rows(weight, exp_avg, exp_avg_sq, r, d, g, write, stride_w, stride_m, stride_v, step_size, beta1, beta2, eps)


def lazy_adam_dense_triton(
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    summed: torch.Tensor,
    touched: torch.Tensor,
    step_size: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """In place on ``weight [R, D]`` and its float32 moments (unit stride along D): one lazy Adam step on the rows
    where ``touched [R]`` (bool) is True, with their summed gradients ``summed [R, D]``; other rows unchanged."""
    rows, dim = weight.shape
    if rows == 0 or dim == 0:
        return
    summed = summed if summed.stride(1) == 1 else summed.contiguous()
    size = torch.as_tensor(step_size, dtype=torch.float32, device=weight.device).reshape(())
    block_d = min(triton.next_power_of_2(dim), 128)
    block_r = block_n(dim)
    _lazy_adam_dense_kernel[(triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))](
        summed,
        touched.contiguous().view(torch.uint8),
        weight,
        exp_avg,
        exp_avg_sq,
        size,
        rows,
        dim,
        summed.stride(0),
        weight.stride(0),
        exp_avg.stride(0),
        exp_avg_sq.stride(0),
        beta1,
        beta2,
        eps,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=4,
    )
