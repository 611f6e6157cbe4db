"""Two-stage long-sequence CTR backbones: DIN, TWIN, TWIN-4E, TWIN w/ proj. and DARE.

One module, configured by which tables exist (see ``configs/recsys/*.yaml``), following the DARE paper
(Feng et al. 2024) and its reference code (thuml/DARE); README "Models" lists the choices:

1. Tokens = item ⊕ category ⊕ position embeddings (TorchRec EmbeddingCollection tables).
2. Scores ``s_i = <q_sem, k_sem>/√d_sem + <q_pos, k_pos>/√d_pos`` (or DIN's attention MLP),
   padding masked with ``-(2^32 - 1)``.
3. Hard top-K on the scores (no gradient through the selection), re-softmax over the K,
   ``h = Σ w_i v_i``; features ``[v_t, h, v_t ⊙ h]`` (target representation).
4. Auxiliary head on the full-sequence softmax pooling (dense signal for the attention tables).

DARE = separate attention and representation tables (``decoupled=True``), whose widths are set
independently (``attention_dim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mtl.layers import MLP
from recsys.data.batch import CTRBatch
from recsys.data.vocab import Vocab
from recsys.errors import ConfigError
from recsys.modules.tokens import HistoryIds, PartProjection, TokenEmbedding, Tokens
from recsys.ops.softmax_pool import PAD_SCORE, softmax_pool


@dataclass
class BackboneOutput:
    """What every ``recsys/`` backbone returns to the task towers.

    Attributes:
        features: ``[B, output_dim]`` input of the task towers.
        aux_logits: name -> ``[B]`` logits of auxiliary heads trained on the primary task's label.
        extras: diagnostics (e.g. ``attention [B, K]`` weights, ``topk_index [B, K]``).
    """

    features: torch.Tensor
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class DotScorer(nn.Module):
    """Target-aware scaled dot product, semantic and position parts scaled separately."""

    def forward(self, query: Tokens, keys: Tokens) -> torch.Tensor:
        """-> ``[B, L]`` raw scores."""
        scores = torch.einsum("bd,bld->bl", query.target_sem, keys.hist_sem) / math.sqrt(query.target_sem.shape[-1])
        if query.target_pos is not None and keys.hist_pos is not None:
            scores = scores + torch.einsum("bd,bld->bl", query.target_pos, keys.hist_pos) / math.sqrt(
                query.target_pos.shape[-1]
            )
        return scores


class DINScorer(nn.Module):
    """DIN's learnable attention: MLP on ``[q, k, q-k, q⊙k]`` (semantic parts), divided by the width."""

    def __init__(self, dim: int, hidden: int = 36) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.PReLU(hidden), nn.Linear(hidden, 1))
        self.dim = dim

    def forward(self, query: Tokens, keys: Tokens) -> torch.Tensor:
        q = query.target_sem.unsqueeze(1).expand_as(keys.hist_sem)
        k = keys.hist_sem
        pairs = torch.cat([q, k, q - k, q * k], dim=-1)  # [B, L, 4D]
        return self.mlp(pairs.flatten(0, 1)).view(k.shape[:2]) / self.dim


class TargetAttentionBackbone(nn.Module):
    """Search (top-K by target attention) then aggregate, over a jagged behaviour history.

    Args:
        vocab: id-space sizes of the dataset.
        max_len: longest history (sizes the position table).
        embedding_dim: width of each representation table (item, category, position).
        attention_dim: width of each attention table when ``decoupled`` (default = ``embedding_dim``).
        decoupled: DARE — separate attention and representation tables.
        split_target: TWIN-4E — separate target (query) and history (key) tables in each role.
        projection: TWIN w/ proj. — bias-free linear maps per feature part, per role and side.
        use_position: include the position feature (DIN does not).
        scorer: ``"dot"`` (TWIN/DARE) or ``"din"`` (attention MLP).
        top_k: behaviours kept by the search stage.
        aux_head: train an auxiliary head on the full-sequence pooling (DARE code's aux loss).
        target_representation: features ``[v_t, h, v_t⊙h]`` (else ``[v_t, h]``).
        aux_hidden: hidden sizes of the auxiliary head.
        init_std: N(0, init_std) for the tables.
        device: table device (``meta`` for sharded builds).
        sparse_grad: local tables get sparse gradients (pair with a sparse table optimiser, e.g.
            ``recsys.ops.sparse_update.RowWiseAdagrad`` or ``LazyAdam``; ``torch.optim.Adam`` rejects them).

    One forward, assembled from shared pieces: tokens (:meth:`_roles`), scores, the hard top-K search
    (:meth:`_top_k`) and the softmax pooling (:func:`recsys.ops.softmax_pool.softmax_pool`, :meth:`_output`).
    With local tables the tokens come from direct lookups of :class:`HistoryIds` (the batch's fixed-shape ids
    when the loader built them: no host sync in the step); sharded tables go through the TorchRec lookup of
    the KJT. In evaluation, dot-product configurations on local tables take :meth:`_search_then_lookup`, the
    same pieces in a cheaper order (scores from the attention tables, value lookups for the K slots only);
    ``tests/test_eval_path.py`` checks it against the training order for every config in ``configs/recsys/``.
    """

    def __init__(
        self,
        vocab: Vocab,
        max_len: int,
        embedding_dim: int = 16,
        attention_dim: int | None = None,
        decoupled: bool = False,
        split_target: bool = False,
        projection: bool = False,
        use_position: bool = True,
        scorer: str = "dot",
        din_hidden: int = 36,
        top_k: int = 20,
        aux_head: bool = True,
        target_representation: bool = True,
        aux_hidden: tuple = (200,),
        init_std: float = 0.01,
        device: torch.device | None = None,
        sparse_grad: bool = False,
    ) -> None:
        super().__init__()
        if attention_dim is not None and not decoupled and attention_dim != embedding_dim:
            raise ConfigError("attention_dim differs from embedding_dim only with decoupled=True (DARE)")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        if scorer not in ("dot", "din"):
            raise ConfigError(f"unknown scorer '{scorer}'; choose 'dot' or 'din'")
        att_dim = attention_dim or embedding_dim
        pos = use_position

        def tokens(role: str, dim: int) -> TokenEmbedding:
            return TokenEmbedding(
                role, vocab, dim, dim if pos else 0, max_len, split_target, init_std, device, sparse_grad
            )

        self.repr_tokens = tokens("repr" if decoupled else "shared", embedding_dim)
        self.att_tokens = tokens("att", att_dim) if decoupled else None
        self.projections = nn.ModuleDict()
        if projection:
            for name in ("att_target", "att_hist", "repr_target", "repr_hist"):
                self.projections[name] = PartProjection(embedding_dim, embedding_dim if pos else 0)
        self.scorer = DotScorer() if scorer == "dot" else DINScorer(2 * att_dim, din_hidden)
        self.top_k = top_k
        self.target_representation = target_representation
        token_dim = self.repr_tokens.token_dim
        self.output_dim = token_dim * (3 if target_representation else 2)
        self.aux_head = MLP(self.output_dim, aux_hidden, out_dim=1) if aux_head else None
        # analysis switch: cut the score path so gradients flow through the pooled path only
        self.detach_scores = False
        self.eval_chunk = 512  # rows per slice of the eval path (keeps [rows, L, D] gathers in cache)

    @property
    def local_tables(self) -> bool:
        """True when every table is a plain local weight (not sharded): tokens come from direct lookups."""
        return all(t.direct_lookup for t in (self.repr_tokens, self.att_tokens) if t is not None)

    def _tokens(self, batch: CTRBatch) -> tuple[Tokens, Tokens]:
        """-> (attention, representation) tokens of the batch (the same object when not decoupled)."""
        if self.local_tables:
            ids = HistoryIds.of(batch)
            embed = lambda tokens: tokens.lookup(ids)  # noqa: E731
        else:
            if batch.sparse is None:
                raise ValueError(
                    "sharded tables read the batch's KJT; fixed-shape batches have none (data.fixed_shape)"
                )
            embed = lambda tokens: tokens(batch.sparse)  # noqa: E731
        repr_tokens = embed(self.repr_tokens)
        return (embed(self.att_tokens) if self.att_tokens is not None else repr_tokens), repr_tokens

    def _roles(self, batch: CTRBatch) -> tuple[Tokens, Tokens, Tokens, Tokens]:
        """-> (query, keys, values, target) tokens; query/keys feed the scores, values/target the pooling."""
        att_tokens, repr_tokens = self._tokens(batch)
        if not self.projections:
            return att_tokens, att_tokens, repr_tokens, repr_tokens
        p = self.projections

        def side(tok: Tokens, target: str, hist: str) -> Tokens:
            t_sem, t_pos = p[target](tok.target_sem, tok.target_pos)
            h_sem, h_pos = p[hist](tok.hist_sem, tok.hist_pos)
            return Tokens(t_sem, h_sem, t_pos, h_pos, tok.mask)

        att = side(att_tokens, "att_target", "att_hist")
        rep = side(repr_tokens, "repr_target", "repr_hist")
        return att, att, rep, rep

    def attention_scores(self, batch: CTRBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw scores ``[B, L]``, mask ``[B, L]``); depends only on the attention tables."""
        query, keys, _, _ = self._roles(batch)
        return self.scorer(query, keys), keys.mask

    def _features(self, target: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        if self.target_representation:
            return torch.cat([target, pooled, target * pooled], dim=-1)
        return torch.cat([target, pooled], dim=-1)

    def _top_k(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hard, non-differentiable search -> ``[B, K]`` slots of the highest scores (padding last)."""
        with torch.no_grad():
            return scores.masked_fill(~mask, PAD_SCORE).topk(min(self.top_k, scores.shape[1]), dim=1).indices

    def _output(
        self,
        target: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        values: torch.Tensor,
        top_index: torch.Tensor,
        gathered: bool = False,
    ) -> BackboneOutput:
        """Re-softmax the top-K ``scores [B, L]`` and pool ``values [B, L, D]`` (``gathered``: already the
        ``[B, K, D]`` values of ``top_index``) into the features for ``target [B, D]``."""
        if gathered:
            pooled, weights = softmax_pool(scores.gather(1, top_index), mask.gather(1, top_index), values)
        else:
            pooled, weights = softmax_pool(scores, mask, values, top_index)
        return BackboneOutput(
            features=self._features(target, pooled), extras={"attention": weights, "topk_index": top_index}
        )

    def _direct_eval(self) -> bool:
        """Whether the eval path (:meth:`_search_then_lookup`) computes this configuration's forward."""
        return not self.training and isinstance(self.scorer, DotScorer) and not self.projections and self.local_tables

    def _search_then_lookup(self, batch: CTRBatch) -> BackboneOutput:
        """Eval forward (same function as the training forward up to float rounding): scores straight from the
        attention tables, then representation lookups only for the ``[B, K]`` retrieved slots, never padding or
        concatenating ``[B, L, D]`` token tensors.

        On CPU ``eval_chunk`` rows at a time, so every ``[rows, L]`` intermediate stays in cache; on a GPU the
        whole batch at once (slices would only multiply kernel launches, and the GPU has no such cache to fit).
        """
        ids = HistoryIds.of(batch)
        rows = ids.mask.shape[0]
        if ids.mask.device.type != "cpu" or rows <= self.eval_chunk:
            return self._search_then_lookup_rows(ids)
        outs = [self._search_then_lookup_rows(part) for part in ids.split(self.eval_chunk)]
        cat = lambda get: torch.cat([get(o) for o in outs])  # noqa: E731
        return BackboneOutput(
            features=cat(lambda o: o.features), extras={k: cat(lambda o, k=k: o.extras[k]) for k in outs[0].extras}
        )

    def _search_then_lookup_rows(self, ids: HistoryIds) -> BackboneOutput:
        """:meth:`_search_then_lookup` on one slice of rows."""
        att = self.att_tokens if self.att_tokens is not None else self.repr_tokens
        scores = att.dot_scores(ids)  # [b, L]
        top_index = self._top_k(scores, ids.mask)
        top_values = self.repr_tokens.history_tokens(ids.select(top_index))  # [b, K, D]
        target = self.repr_tokens.target_tokens(ids)
        return self._output(target, scores, ids.mask, top_values, top_index, gathered=True)

    def forward(self, batch: CTRBatch) -> BackboneOutput:
        if self._direct_eval():
            return self._search_then_lookup(batch)
        query, keys, values, target = self._roles(batch)
        scores, mask = self.scorer(query, keys), keys.mask
        if self.detach_scores:
            scores = scores.detach()
        history = values.history  # [B, L, D]
        out = self._output(target.target, scores, mask, history, self._top_k(scores, mask))
        if self.aux_head is not None and self.training:  # the aux head only shapes training
            full, _ = softmax_pool(scores, mask, history)
            out.aux_logits["full_sequence"] = self.aux_head(self._features(target.target, full)).squeeze(-1)
        return out
