"""Run a peer's script (e.g. RecBole's runner) where some of its import-time-only dependencies are missing.

    python benchmarks/peer_launch.py <script.py> [its arguments ...]

RecBole 1.2.1 imports ``torch.utils.tensorboard`` (which needs the ``tensorboard`` package), ``sklearn.metrics`` and
``colorama`` at import time, but a sequential run with HR/NDCG metrics and no tensorboard logging never calls them
beyond a ``SummaryWriter`` it writes scalars to and ``colorama.init()``. Where one of these does not import (a GPU image
without tensorboard, a 13 MB scikit-learn wheel not worth carrying), a stand-in is put into ``sys.modules`` first:
a ``SummaryWriter`` whose methods do nothing, ``colorama.init`` doing nothing, and ``sklearn.metrics`` functions that
raise if called (so a run that needed them fails loudly instead of computing something else). The peer's code is run
unchanged with ``runpy`` (``__name__ == "__main__"``, its own ``__file__``), and the stand-ins used are printed to
stderr as one line ``peer_launch stand-ins: [...]`` (benchmarks/seqrec.py records them). Stdlib only: the package is
never imported here, and the package never imports the peer.
"""

from __future__ import annotations

import importlib
import runpy
import sys
import types


def _missing(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # ImportError, or tensorboard's own version check
        return True
    return False


def _no_op(*args, **kwargs) -> None:
    return None


class _SummaryWriter:
    """Stand-in for ``torch.utils.tensorboard.SummaryWriter``: every method does nothing."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name: str):
        return _no_op


def _not_available(name: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name} was replaced by a stand-in (the module is not installed) and cannot be called")

    return call


def install_stand_ins() -> list[str]:
    """Put stand-ins into ``sys.modules`` for the modules above that do not import; returns their names."""
    used = []
    if _missing("torch.utils.tensorboard"):
        sys.modules.pop("torch.utils.tensorboard", None)
        module = types.ModuleType("torch.utils.tensorboard")
        module.SummaryWriter = _SummaryWriter
        sys.modules["torch.utils.tensorboard"] = module
        used.append("torch.utils.tensorboard")
    if _missing("colorama"):
        module = types.ModuleType("colorama")
        module.init = _no_op
        sys.modules["colorama"] = module
        used.append("colorama")
    if _missing("sklearn.metrics"):
        sklearn, metrics = types.ModuleType("sklearn"), types.ModuleType("sklearn.metrics")
        for name in ("auc", "mean_absolute_error", "mean_squared_error", "roc_auc_score", "log_loss"):
            setattr(metrics, name, _not_available(f"sklearn.metrics.{name}"))
        sklearn.metrics = metrics
        sys.modules.update({"sklearn": sklearn, "sklearn.metrics": metrics})
        used.append("sklearn.metrics")
    return used


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python benchmarks/peer_launch.py <script.py> [arguments ...]")
    print(f"peer_launch stand-ins: {install_stand_ins()}", file=sys.stderr, flush=True)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
