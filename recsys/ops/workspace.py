"""Reusable scratch buffers for the large ``[N, I]`` logits of full-softmax losses and full ranking.

On CPU a fresh 50-100 MB tensor is mmapped and page-faulted on first touch, which costs more than the
GEMM that fills it; taking the buffer from a small pool avoids that. Other devices (CUDA's caching
allocator already reuses memory) get a plain ``torch.empty``.
"""

from __future__ import annotations

import torch

_HEADROOM = 1.25  # batches differ in size; a little slack lets one buffer serve them all
_MAX_FREE = 4


class Workspace:
    """``take(rows, cols, like) -> (flat, view [rows, cols])``; ``give(flat)`` returns the buffer."""

    def __init__(self) -> None:
        self.free: list[torch.Tensor] = []

    def take(self, rows: int, cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        numel = rows * cols
        if like.device.type == "cpu":
            for i, flat in enumerate(self.free):
                if flat.numel() >= numel and flat.dtype == like.dtype:
                    flat = self.free.pop(i)
                    return flat, flat[:numel].view(rows, cols)
            flat = torch.empty(int(numel * _HEADROOM), dtype=like.dtype)
            return flat, flat[:numel].view(rows, cols)
        flat = torch.empty(numel, dtype=like.dtype, device=like.device)
        return flat, flat.view(rows, cols)

    def give(self, flat: torch.Tensor) -> None:
        if flat.device.type == "cpu":
            self.free.append(flat)
            if len(self.free) > _MAX_FREE:  # drop the smallest (by index: list.remove would compare tensors)
                del self.free[min(range(len(self.free)), key=lambda i: self.free[i].numel())]


WORKSPACE = Workspace()
