"""Losses of sequential models (plain torch; the LightningModule calls them).

- :func:`next_item_loss`: full-softmax cross-entropy over all items at every position that has a target
  (never on padding), the padding id kept as an extra class with logit 0 as in the official code.
- :func:`ted_loss`: TED's distillation towards the item-transition graph (docs/seqrec.md), computed from the
  sparse graph rows without materialising the dense ``[N, I]`` teacher (exact; see the function).
- :func:`sequential_losses`: both plus the model's auxiliary losses, for one training batch.

All of them score against the item matrix the model returns (``SeqOutput.table``): the table's weight
when unsharded, the sharded collection's lookup of every item under DistributedModelParallel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recsys.data.batch import TARGET_ITEM
from recsys.data.seq_batch import SEQ_ITEM, SeqBatch
from recsys.data.transitions import TransitionGraph
from recsys.errors import ConfigError
from recsys.models.sasrec import SASRec, SeqOutput
from recsys.models.sequential import output_table
from recsys.ops.workspace import WORKSPACE


class _LinearLogSumExp(torch.autograd.Function):
    """``lse_i = log Σ_j exp(a_i · b_j)`` for ``a [N, d]``, ``b [I, d]``, holding one ``[N, I]`` buffer.

    The logits (GEMM into a reused workspace buffer) are turned into ``exp(logit - max)`` in place and
    kept for the backward pass, which scales them in place into ``softmax · grad`` and runs the two
    GEMMs: about half the memory passes of ``torch.logsumexp(a @ b.T)`` under autograd and no fresh
    ``[N, I]`` allocations. The backward runs once (no ``retain_graph``; the buffer is consumed).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.flat, buffer = WORKSPACE.take(a.shape[0], b.shape[0], a)
        lse, total = _exp_logits(a, b, buffer)
        ctx.save_for_backward(a, b, buffer, total)
        return lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, buffer, total = ctx.saved_tensors
        weights = buffer.mul_(grad.unsqueeze(1) / total)  # softmax · grad, in place
        grads = (weights @ b if ctx.needs_input_grad[0] else None, weights.T @ a if ctx.needs_input_grad[1] else None)
        WORKSPACE.give(ctx.flat)
        return grads


#: shifted logits are raised to this floor before ``exp``: e^-60 ≈ 9e-27 is far below float32's resolution
#: of the row sum (>= 1), but keeps ``exp`` and the backward products clear of denormal floats, which
#: run 10-15x slower on CPU (they appear once the item embeddings have spread, e.g. TED's logits / τ).
EXP_FLOOR = -60.0


def _exp_logits(a: torch.Tensor, b: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``buffer [N, I]`` with ``exp(max(a @ b.T - rowmax, EXP_FLOOR))``; return ``lse [N]`` and the row
    sums ``[N, 1]``."""
    torch.mm(a, b.T, out=buffer)
    top = buffer.amax(dim=1, keepdim=True)
    total = buffer.sub_(top).clamp_(min=EXP_FLOOR).exp_().sum(dim=1, keepdim=True)
    return (total.log() + top).squeeze(1), total


def linear_logsumexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N]`` log-normaliser of the logits ``a [N, d] @ b[I, d].T`` (see :class:`_LinearLogSumExp`)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _LinearLogSumExp.apply(a, b)
    flat, buffer = WORKSPACE.take(a.shape[0], b.shape[0], a)
    try:
        return _exp_logits(a, b, buffer)[0]
    finally:
        WORKSPACE.give(flat)


def real_mean(values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [N]`` over the real tokens (``real [N]`` bool; ``None``: all), without boolean indexing."""
    if real is None:
        return values.mean()
    weight = real.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def next_item_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    table: torch.Tensor,
    pad_class: bool = True,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, d]`` against ``targets [N]`` (ids 1..I) over the items ``table[1:]``.

    ``CE = lse - ⟨h, e_target⟩``; ``pad_class`` adds the padding row as a class with constant logit 0
    (the official code's zero row): ``lse -> log(e^lse + 1)``. The logits matrix is never kept. ``real [N]``:
    the tokens that count (padding slots of a fixed-shape batch are left out of the mean).
    """
    lse = linear_logsumexp(hidden, table[1:])
    if pad_class:
        lse = torch.logaddexp(lse, lse.new_zeros(()))
    return real_mean(lse - (hidden * table[targets]).sum(-1), real)


def ted_loss(
    heads: torch.Tensor,
    table: torch.Tensor,
    graph: TransitionGraph,
    tau: float,
    dropout: float = 0.0,
    training: bool = False,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """TED: mean over ``heads [N]`` (the ``real`` ones) of ``CE(q_i, p_i)`` over the items 1..I.

    Teacher ``q_i = softmax_j(Ã_ij / τ)`` over *all* items (zero-count items included); student
    ``p_i = softmax_j(s_ij)``, ``s_ij = ⟨u_i, e_j⟩``, ``u_i = √d Dropout(e_i) / τ``. As ``Σ_j q_ij = 1``,
    ``CE_i = lse_i - Σ_j q_ij s_ij``, and with ``a_ij = Ã_ij / τ`` on the graph's non-zeros,
    ``m_i = max(0, max_j a_ij)`` (for stability), ``base_i = e^{-m_i}``, ``x_ij = e^{a_ij - m_i} - base_i``::

        Σ_j q_ij s_ij = u_i · (base_i Σ_j e_j + Σ_nz x_ij e_j) / Z_i,   Z_i = I base_i + Σ_nz x_ij

    The bracket depends on the head's item only: it is computed once per item (``[I + 1, d]``, one gather and
    one ``index_add`` over the whole graph, fixed shapes) and gathered per head, so the dense teacher
    ``[N, I]`` is never built (exact, no sampling) and nothing depends on how many non-zeros the heads' rows
    hold (no host sync). Cost: ``O(nnz d)`` per step over the whole graph, whatever the batch (Beauty: 0.11 M,
    Yelp 0.21 M non-zeros); a graph far larger than a batch's rows would pay for rows the batch never reads.
    """
    items = table[1:]
    num_items, size = items.shape[0], table.shape[0]
    u = F.dropout(table[heads], dropout, training) * (math.sqrt(table.shape[1]) / tau)
    lse = linear_logsumexp(u, items)
    row, col = graph.row_ids(), graph.col
    a = graph.weight.to(u.dtype) / tau
    m = a.new_zeros(size).scatter_reduce(0, row, a, reduce="amax", include_self=True)
    base = torch.exp(-m)
    excess = torch.exp(a - m[row]) - base[row]
    z = num_items * base + a.new_zeros(size).index_add(0, row, excess)
    neighbours = table.new_zeros(table.shape).index_add(0, row, excess.unsqueeze(1) * table[col])  # Σ_nz x_ij e_j
    mix = (base.unsqueeze(1) * items.sum(0) + neighbours) / z.unsqueeze(1)  # [I + 1, d]
    return real_mean(lse - (u * mix[heads]).sum(-1), real)


def sequential_losses(
    model: SASRec,
    batch: SeqBatch,
    graph: TransitionGraph | None = None,
    pad_class: bool = True,
    out: SeqOutput | None = None,
) -> dict[str, torch.Tensor]:
    """``rec`` (+ ``kd``) (+ the model's aux losses) and their weighted ``total`` for one training batch."""
    out = model(batch) if out is None else out
    table = output_table(model, out)
    targets, real = batch.tokens(TARGET_ITEM)
    losses = {"rec": next_item_loss(batch.token_rows(out.hidden), targets, table, pad_class, real)}
    total = losses["rec"]
    if model.lambda_kd > 0:
        if graph is None:
            raise ConfigError("lambda_kd > 0 needs the transition graph (TED); none was given")
        heads, _ = batch.tokens(SEQ_ITEM)
        losses["kd"] = ted_loss(heads, table, graph, model.tau, model.dropout, model.training, real)
        total = total + model.lambda_kd * losses["kd"]
    for name, value in out.aux_losses.items():
        losses[name] = value
        total = total + value
    losses["total"] = total
    return losses
