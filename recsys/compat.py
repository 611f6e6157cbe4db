"""The one place that knows which torch / FBGEMM / TorchRec versions the package runs on.

Supported matrix (TorchRec's own release matrix), checked by :func:`check_matrix`::

    torchrec 1.N  <->  fbgemm-gpu / fbgemm-gpu-cpu 1.N  <->  torch 2.(N + 5)      for N = 6, 7, 8

What differs between the versions, and how it is handled here:

- ``import torchrec`` is where a mismatched install fails: torchrec >= 1.7 imports
  ``fbgemm_gpu.tbe.monitoring`` (absent from fbgemm 1.6); every torchrec in the range imports ``tensordict``
  (which needs ``pyvers``) from its sharders; FBGEMM's native libraries only load into the torch minor they were
  built for. :func:`_import_torchrec` turns those failures into one :class:`ImportError` that names the installed
  versions and the matching install line, instead of a deep traceback.
- The symbols the package uses (listed in ``__all__``) have the same signatures in torchrec 1.6.1, 1.7.0 and 1.8.0
  for the arguments the package passes (``EmbeddingCollection`` gained ``use_gather_select_per_sharding`` and
  ``Topology`` ``created_by_factory`` in 1.8; both are optional and unused). Every module imports them from here,
  so a future rename is fixed in one place.
- FBGEMM kernels: ``fbgemm-gpu-cpu`` registers CPU kernels only; on a CUDA torch the jagged ops then fall back to
  torch (:mod:`recsys.ops.jagged` probes per device; MLflow tag ``jagged_kernels``) and tables stay unsharded
  (:mod:`recsys.distributed.env`). :func:`load_fbgemm_ops` is the only ``import fbgemm_gpu`` in the package.

Plain torch + torchrec: no Lightning, Hydra or MLflow here, so models and data code may import it.
"""

from __future__ import annotations

import importlib
import logging
from importlib import metadata

import torch

log = logging.getLogger(__name__)

#: torchrec minor -> (fbgemm minor, torch minor); torchrec/fbgemm are 1.x, torch is 2.y
MATRIX: dict[int, tuple[int, int]] = {6: (6, 11), 7: (7, 12), 8: (8, 13)}
FBGEMM_DISTRIBUTIONS = ("fbgemm-gpu", "fbgemm-gpu-cpu")


def _minor(version: str | None) -> int | None:
    """``"1.6.1"`` / ``"2.11.0+cu130"`` -> ``6`` / ``11``; None when absent or unparsable."""
    if not version:
        return None
    parts = version.split("+")[0].split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def fbgemm_distribution() -> tuple[str | None, str | None]:
    """``(distribution, version)`` of the installed FBGEMM wheel: ``("fbgemm-gpu-cpu", "1.8.0")``,
    ``("fbgemm-gpu", "1.6.0")`` or ``(None, None)``."""
    for name in FBGEMM_DISTRIBUTIONS:
        version = _dist_version(name)
        if version is not None:
            return name, version
    return None, None


def versions() -> dict[str, str]:
    """Installed versions as strings (``"none"`` when absent), for run tags and result files:
    keys ``python, torch, cuda, torchrec, fbgemm, fbgemm_dist``."""
    import platform

    dist, fbgemm = fbgemm_distribution()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda or "none"),
        "torchrec": _dist_version("torchrec") or "none",
        "fbgemm": fbgemm or "none",
        "fbgemm_dist": dist or "none",
    }


def install_hint(torch_version: str) -> str:
    """The install line that matches ``torch_version`` (``pip ... -c requirements/torch-2.Y.txt``)."""
    torch_minor = _minor(torch_version)
    known = {t: n for n, (_, t) in MATRIX.items()}
    if torch_minor not in known:
        supported = ", ".join(f"2.{t}" for t in sorted(known))
        return f"torch {torch_version} is outside the supported range (torch {supported}); see docs/gpu.md"
    n = known[torch_minor]
    return (
        f'pip install ".[cpu]" -c requirements/torch-2.{torch_minor}.txt && '
        f'pip install --no-deps "torchrec==1.{n}.*"  (".[cuda]" for the CUDA FBGEMM wheel; docs/gpu.md)'
    )


def check_matrix(torch_version: str, torchrec_version: str | None, fbgemm_version: str | None) -> list[str]:
    """Mismatches between the three versions and TorchRec's matrix, one sentence each (empty when consistent)."""
    problems = []
    torch_minor, rec_minor, fb_minor = _minor(torch_version), _minor(torchrec_version), _minor(fbgemm_version)
    if rec_minor is None:
        problems.append("torchrec is not installed")
    elif rec_minor not in MATRIX:
        problems.append(f"torchrec {torchrec_version} is outside the supported 1.{min(MATRIX)}-1.{max(MATRIX)}")
    else:
        want_fb, want_torch = MATRIX[rec_minor]
        if fb_minor is None:
            problems.append(f"no FBGEMM wheel is installed (torchrec {torchrec_version} needs fbgemm 1.{want_fb}.x)")
        elif fb_minor != want_fb:
            problems.append(f"torchrec {torchrec_version} needs fbgemm 1.{want_fb}.x, found {fbgemm_version}")
        if torch_minor != want_torch:
            problems.append(f"torchrec {torchrec_version} is built for torch 2.{want_torch}, found {torch_version}")
    return problems


def _import_torchrec():
    """``import torchrec``, or one ImportError naming the installed versions and the matching install line."""
    try:
        return importlib.import_module("torchrec")
    except (ImportError, OSError, RuntimeError) as err:
        found = versions()
        problems = check_matrix(found["torch"], _dist_version("torchrec"), fbgemm_distribution()[1])
        detail = "; ".join(problems) if problems else f"{type(err).__name__}: {err}"
        raise ImportError(
            f"torchrec does not import ({detail}). Installed: torch {found['torch']}, torchrec {found['torchrec']}, "
            f"{found['fbgemm_dist']} {found['fbgemm']}. Fix: {install_hint(found['torch'])}"
        ) from err


def load_fbgemm_ops() -> bool:
    """Import ``fbgemm_gpu`` so ``torch.ops.fbgemm`` is registered; False (logged) when it cannot load."""
    try:
        importlib.import_module("fbgemm_gpu")
    except Exception as err:  # a missing wheel or a library built for another torch: the torch path runs
        log.info("fbgemm_gpu does not load (%s); jagged ops use torch", err)
        return False
    return True


_import_torchrec()

# Everything below is version-stable across torchrec 1.6-1.8 (see the module docstring).
from torchrec import (  # noqa: E402
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    PoolingType,
)
from torchrec.distributed.embedding import EmbeddingCollectionSharder  # noqa: E402
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder  # noqa: E402
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel  # noqa: E402
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology  # noqa: E402
from torchrec.distributed.planner.types import ParameterConstraints  # noqa: E402
from torchrec.distributed.types import ModuleSharder, ShardedModule, ShardingPlan  # noqa: E402
from torchrec.optim import optimizers as trec_optimizers  # noqa: E402
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper  # noqa: E402
from torchrec.optim.optimizers import in_backward_optimizer_filter  # noqa: E402
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

__all__ = [
    "MATRIX",
    "DefaultDataParallelWrapper",
    "DistributedModelParallel",
    "EmbeddingBagCollection",
    "EmbeddingBagCollectionSharder",
    "EmbeddingBagConfig",
    "EmbeddingCollection",
    "EmbeddingCollectionSharder",
    "EmbeddingConfig",
    "EmbeddingShardingPlanner",
    "KeyedJaggedTensor",
    "KeyedOptimizer",
    "KeyedOptimizerWrapper",
    "ModuleSharder",
    "ParameterConstraints",
    "PoolingType",
    "RowWiseAdagrad",
    "ShardedModule",
    "ShardingPlan",
    "Topology",
    "check_matrix",
    "fbgemm_distribution",
    "in_backward_optimizer_filter",
    "install_hint",
    "load_fbgemm_ops",
    "trec_optimizers",
    "versions",
]
