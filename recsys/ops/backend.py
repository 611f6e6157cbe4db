"""Which kernel family runs an op on a device: FBGEMM, Triton or plain torch, chosen automatically.

- ``fbgemm``: FBGEMM's kernels run on the device (the CPU wheel, or the CUDA wheel on a GPU); they stay the
  first choice for what they implement (jagged ops, TorchRec's fused table updates).
- ``triton``: Triton is importable and the device is CUDA (or ``TRITON_INTERPRET=1``, Triton's CPU interpreter,
  which the tests use); the project's own fused kernels (``recsys/ops/triton_*.py``) then run.
- ``torch``: the pure-torch reference of every op.

``RECSYS_KERNELS=torch`` forces the references (a debugging switch); ``RECSYS_TORCH_OPS=gather_rows,lazy_adam``
forces them for the named ops only (to measure one kernel against its reference in the same run). The MLflow
tag ``kernels`` records :func:`kernel_family` of the training device.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from recsys.ops.jagged import fbgemm_supports

FAMILIES = ("fbgemm", "triton", "torch")


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _op_names(raw: str) -> frozenset[str]:
    return frozenset(op.strip() for op in raw.split(",") if op.strip())


def torch_ops() -> frozenset[str]:
    """Ops named in ``RECSYS_TORCH_OPS`` (comma-separated): they run their torch reference (parsed once per
    value: every eager lookup asks)."""
    return _op_names(os.environ.get("RECSYS_TORCH_OPS", ""))


def use_triton(device: torch.device | str, op: str | None = None) -> bool:
    """Whether the project's Triton kernels run for tensors on ``device`` (for ``op``, unless it is named in
    ``RECSYS_TORCH_OPS``)."""
    if os.environ.get("RECSYS_KERNELS") == "torch" or not _triton_importable() or op in torch_ops():
        return False
    kind = torch.device(device).type
    return triton_interpreted() if kind == "cpu" else kind == "cuda"


def kernel_family(device: torch.device | str) -> str:
    """``fbgemm`` | ``triton`` | ``torch``: the fastest kernel family available on ``device``."""
    kind = torch.device(device).type
    if os.environ.get("RECSYS_KERNELS") != "torch" and fbgemm_supports(kind):
        return "fbgemm"
    return "triton" if use_triton(kind) else "torch"
