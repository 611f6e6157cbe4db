"""Builder of sequential models (SASRec, MQSA-TED) from the pipeline's factories; no Lightning needed,
so a model bundle can be rebuilt from its config (``model_builder`` of the task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mtl.single import SingleTower
from recsys.models.sasrec import SASRec


def hydra_choice(group: str, fallback: str) -> str:
    """The option picked for a config group in the running Hydra job (``fallback`` outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # the GPU benchmark runs without Hydra
        return fallback
    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.choices.get(group) or fallback)
    return fallback


def factory_name(factory: Any) -> str:
    """``SASRec`` for ``functools.partial(SASRec, ...)``."""
    return getattr(getattr(factory, "func", factory), "__name__", str(factory))


def build_sequential_model(
    datamodule: Any,
    backbone: Callable[..., SASRec],
    tower: Callable[..., Any] | None = None,
    init_std: float | None = 0.01,
) -> SASRec:
    """``backbone(**datamodule.backbone_inputs(), init_std=...)``; ``init_std`` sizes the tables' N(0, σ)
    init (None keeps the backbone's default). Sequential models score the shared item table, so only the
    default single tower (``mtl=single``, unused) is accepted; another tower raises ``ValueError``.
    """
    recsys = hydra_choice("recsys", factory_name(backbone))
    if tower is not None and getattr(tower, "func", tower) is not SingleTower:
        raise ValueError(
            f"mtl={hydra_choice('mtl', factory_name(tower))} is not supported with recsys={recsys}: sequential "
            f"models score the shared item table and have no task towers; use mtl=single"
        )
    model = backbone(**datamodule.backbone_inputs(), **({} if init_std is None else {"init_std": init_std}))
    if not isinstance(model, SASRec):
        raise ValueError(f"task=seqrec needs a sequential model (recsys=sasrec|mqsa_ted), got recsys={recsys}")
    return model
