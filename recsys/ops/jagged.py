"""Jagged-tensor ops: FBGEMM kernels where they exist for the tensor's device, pure torch otherwise.

A jagged batch is ``values [sum(L), D]`` plus ``offsets [B + 1]`` (or ``lengths [B]``).
Each op has a ``*_torch`` reference; :func:`fbgemm_supports` decides once per device type which path runs,
and ``tests/test_jagged_ops.py`` checks the two paths agree.
"""

from __future__ import annotations

import functools
import logging

import torch

from recsys.compat import load_fbgemm_ops

log = logging.getLogger(__name__)

# dtypes FBGEMM's jagged kernels implement (float64 is not registered on CPU)
FBGEMM_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def fbgemm_supports(device_type: str) -> bool:
    """True when FBGEMM's jagged kernels run on ``device_type`` ("cpu" or "cuda").

    CPU kernels come with ``fbgemm-gpu-cpu``; CUDA kernels only with the CUDA ``fbgemm-gpu`` wheel.
    Probed once by running a tiny op, so a missing kernel means the torch path, not a crash.
    """
    if not load_fbgemm_ops():  # registers torch.ops.fbgemm
        return False
    try:
        probe = torch.tensor([1, 2], device=device_type)
        torch.ops.fbgemm.asynchronous_complete_cumsum(probe)
        values = torch.ones(3, 1, device=device_type)
        offsets = torch.tensor([0, 1, 3], device=device_type)
        torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [2], 0.0)
    except Exception as err:  # any failure (no module, no kernel for the backend) means fallback
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.info("FBGEMM jagged kernels unavailable on %s (%s); using torch ops", device_type, reason)
        return False
    return True


def kernel_backend(device: torch.device) -> str:
    """Name of the path the jagged ops take on ``device``: ``"fbgemm"`` or ``"torch"``."""
    return "fbgemm" if fbgemm_supports(torch.device(device).type) else "torch"


def lengths_to_offsets_torch(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` offsets starting at 0 (same dtype)."""
    offsets = torch.zeros(lengths.numel() + 1, dtype=lengths.dtype, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    return offsets


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` complete cumulative sum."""
    if fbgemm_supports(lengths.device.type):
        return torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    return lengths_to_offsets_torch(lengths)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool, True on the first ``lengths[b]`` slots of row b."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def jagged_to_padded_dense_torch(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """``values [sum(L), D]`` -> ``[B, max_len, D]``, right-padded; rows longer than max_len are cut.

    Shape-static (no host sync): every slot gathers a clamped index, padding slots are then overwritten."""
    lengths = offsets[1:] - offsets[:-1]
    batch = lengths.numel()
    if values.shape[0] == 0:
        return values.new_full((batch, max_len, values.shape[-1]), padding_value)
    mask = padding_mask(lengths, max_len)
    slots = offsets[:-1].unsqueeze(1) + torch.arange(max_len, device=values.device).unsqueeze(0)
    gathered = values[slots.clamp(max=values.shape[0] - 1)]  # [B, max_len, D]
    return torch.where(mask.unsqueeze(-1), gathered, gathered.new_full((), padding_value))


def jagged_to_padded_dense(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, padding_value: float = 0.0
) -> torch.Tensor:
    """``values [sum(L), D]`` with ``offsets [B + 1]`` -> padded ``[B, max_len, D]`` (differentiable)."""
    if fbgemm_supports(values.device.type) and values.dtype in FBGEMM_FLOAT_DTYPES:
        return torch.ops.fbgemm.jagged_to_padded_dense(values, [offsets], [max_len], padding_value)
    return jagged_to_padded_dense_torch(values, offsets, max_len, padding_value)


def dense_to_jagged_torch(dense: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Inverse of padding: ``[B, N, D]`` -> ``[sum(L), D]`` keeping the first L_b slots of each row.

    With ``total`` (= ``sum(L)``, known on the host) no host sync; without it, one read of ``offsets[-1]``."""
    lengths = offsets[1:] - offsets[:-1]
    total = int(offsets[-1]) if total is None else total
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=dense.device), lengths, output_size=total)
    slots = torch.arange(total, device=dense.device) - offsets[:-1][rows]
    return dense[rows, slots]


def dense_to_jagged(dense: torch.Tensor, offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``[B, N, D]`` -> jagged values ``[sum(L), D]`` (differentiable)."""
    if fbgemm_supports(dense.device.type) and dense.dtype in FBGEMM_FLOAT_DTYPES:
        out, _ = torch.ops.fbgemm.dense_to_jagged(dense, [offsets], total)
        return out
    return dense_to_jagged_torch(dense, offsets, total)
