"""Sequential models (SASRec, MQSA-TED) as a whole: the builder from the pipeline's factories (no Lightning
needed, so a model bundle can be rebuilt from its config) and full-ranking inference at the newest position,
shared by evaluation and batch scoring:

- :func:`last_position_scores`: ``[B, I]`` scores of the newest position with history items masked;
- :func:`last_position_ranks`: the target's rank among them (batched, one reused buffer).

``exclude_history`` picks the evaluation protocol: ``True`` removes the row's ``exclude_item`` ids (its history)
from the ranking (the official MQSA-TED / S3-Rec protocol: a target that repeats a history item is unreachable);
``False`` keeps every item rankable (RecBole's full ranking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from recsys.data.batch import TARGET_ITEM
from recsys.data.seq_batch import EXCLUDE_ITEM, SeqBatch
from recsys.errors import ConfigError
from recsys.metrics.topk import target_ranks
from recsys.models.sasrec import SASRec, SeqOutput
from recsys.ops.workspace import WORKSPACE


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
    init (None keeps the backbone's default). Sequential models score the shared item table and take no
    task tower: ``tower`` must be None (the sequential ``recsys`` configs set ``mtl: null``).
    """
    if tower is not None:
        raise ConfigError(
            f"a task tower ({factory_name(tower)}) is not supported with the sequential model "
            f"{factory_name(backbone)}: sequential models score the shared item table; drop the mtl= override"
        )
    model = backbone(**datamodule.backbone_inputs(), **({} if init_std is None else {"init_std": init_std}))
    if not isinstance(model, SASRec):
        raise ConfigError(
            f"objective=sequential needs a sequential model (recsys=sasrec|mqsa_ted), got {factory_name(backbone)}"
        )
    return model


def output_table(model: SASRec, out: SeqOutput) -> torch.Tensor:
    """``[I + 1, d]`` item matrix of the tied output layer: ``out.table``, else the (unsharded) weight."""
    table = getattr(out, "table", None)
    return table if table is not None else model.item_table()


def masked_scores(
    hidden: torch.Tensor,
    table: torch.Tensor,
    batch: SeqBatch,
    out: torch.Tensor | None = None,
    exclude_history: bool = True,
) -> torch.Tensor:
    """``[B, I]`` scores ``hidden [B, d] @ table[1:].T`` (column ``j - 1`` = item ``j``); with
    ``exclude_history`` the row's ``exclude_item`` ids get ``-inf`` (removed from the ranking).
    ``out``: optional ``[B, I]`` buffer."""
    scores = torch.mm(hidden, table[1:].T, out=out)
    if not exclude_history:
        return scores
    excluded, lengths = batch.jagged(EXCLUDE_ITEM)
    rows = torch.arange(lengths.numel(), device=lengths.device)
    rows = torch.repeat_interleave(rows, lengths, output_size=excluded.numel())  # no read of sum(lengths)
    scores[rows, excluded - 1] = float("-inf")
    return scores


@torch.no_grad()
def last_position_scores(model: SASRec, batch: SeqBatch, exclude_history: bool = True) -> torch.Tensor:
    """``[B, I]`` scores of items 1..I at each row's newest position, history removed unless
    ``exclude_history=False`` (:func:`masked_scores`)."""
    out = model(batch, last_only=True)
    return masked_scores(out.hidden, output_table(model, out), batch, exclude_history=exclude_history)


@torch.no_grad()
def last_position_ranks(model: SASRec, batch: SeqBatch, exclude_history: bool = True) -> torch.Tensor:
    """``[B]`` 0-based full-ranking rank of each row's target (``inf`` if the target was removed, which
    ``exclude_history=True`` does to a target repeating a history item)."""
    return ranks_under_protocols(model, batch, (exclude_history,))[0]


@torch.no_grad()
def ranks_under_protocols(model: SASRec, batch: SeqBatch, protocols: Sequence[bool]) -> list[torch.Tensor]:
    """:func:`last_position_ranks` under each ``exclude_history`` value of ``protocols``, from one model forward
    (only the scoring against the item table and the ranking are repeated)."""
    out = model(batch, last_only=True)
    flat, buffer = WORKSPACE.take(batch.batch_size, model.num_items, out.hidden)
    try:
        ranks = []
        for exclude_history in protocols:
            scores = masked_scores(out.hidden, output_table(model, out), batch, buffer, exclude_history)
            ranks.append(target_ranks(scores, batch.jagged(TARGET_ITEM)[0], overwrite=True))
        return ranks
    finally:
        WORKSPACE.give(flat)
