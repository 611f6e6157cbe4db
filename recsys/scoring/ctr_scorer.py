"""Score CTR logs with a ranking model (single or multi-task): one ``score_<task>`` column per task."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np
import polars as pl
import torch

from recsys.bundle import LoadedBundle
from recsys.data.batch import CTRBatch, make_ctr_kjt
from recsys.data.ctr_table import list_column_arrays

POLICIES = ("map", "reject")


@dataclass
class ScoreStats:
    """Counts for the end-of-job summary."""

    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: Counter = field(default_factory=Counter)  # reason -> rows
    unseen_ids_mapped: int = 0

    def add(self, other: "ScoreStats") -> None:
        self.rows_in += other.rows_in
        self.rows_scored += other.rows_scored
        self.rows_rejected.update(other.rows_rejected)
        self.unseen_ids_mapped += other.unseen_ids_mapped


class CTRScorer:
    """Maps raw ids through the bundle's id maps, applies the bad-row policy, runs the model.

    Args:
        bundle: the loaded model bundle.
        unseen: ``"map"`` sends ids never seen in training to the reserved padding row 0 (and counts them);
            ``"reject"`` moves such rows to the rejects with reason ``unseen_id``.
        keep_columns: input columns copied to the output beside the scores (when present).

    Rows with a null id or a null/empty history are always rejected (reasons ``null`` / ``empty_history``).
    """

    def __init__(self, bundle: LoadedBundle, unseen: str = "map",
                 keep_columns: Sequence[str] = ("user", "item", "timestamp")) -> None:
        if unseen not in POLICIES:
            raise ValueError(f"unseen={unseen!r}: choose one of {list(POLICIES)}")
        self.bundle, self.unseen, self.keep_columns = bundle, unseen, list(keep_columns)
        self.max_len = bundle.meta.max_len
        self.tasks = bundle.tasks

    def output_schema(self, input_schema: Dict[str, pl.DataType]) -> Dict[str, pl.DataType]:
        schema = {c: input_schema[c] for c in self.keep_columns if c in input_schema}
        schema.update({f"score_{t.name}": pl.Float32 for t in self.tasks})
        return schema

    def _reasons(self, frame: pl.DataFrame) -> np.ndarray:
        """Per-row rejection reason ('' = keep) for nulls and empty histories."""
        null = frame.select(pl.any_horizontal(pl.col(c).is_null() for c in ("item", "category", "hist_item", "hist_cat")))
        empty = frame.select((pl.col("hist_item").list.len().fill_null(0) == 0)
                             | (pl.col("hist_item").list.len() != pl.col("hist_cat").list.len()))
        reasons = np.full(frame.height, "", dtype=object)
        reasons[empty.to_series().to_numpy()] = "empty_history"
        reasons[null.to_series().to_numpy()] = "null"
        return reasons

    def score(self, frame: pl.DataFrame) -> Tuple[pl.DataFrame, pl.DataFrame, ScoreStats]:
        """-> (scores for kept rows, rejected rows with a ``reason`` column, counts)."""
        stats = ScoreStats(rows_in=frame.height)
        reasons = self._reasons(frame)
        valid = frame.filter(pl.Series(reasons == ""))
        # the model sees the most recent max_len behaviours, as in training
        kept = valid.with_columns(pl.col("hist_item").list.tail(self.max_len), pl.col("hist_cat").list.tail(self.max_len))
        m = self.bundle.mappers
        hist_item, offsets = list_column_arrays(kept, "hist_item")
        hist_cat, _ = list_column_arrays(kept, "hist_cat")
        ids = {
            "item": m["item"](kept["item"].cast(pl.Int64).to_numpy()),
            "category": m["category"](kept["category"].cast(pl.Int64).to_numpy()),
            "hist_item": m["item"](hist_item),
            "hist_cat": m["category"](hist_cat),
        }
        row_of_value = np.repeat(np.arange(kept.height), np.diff(offsets))
        unseen_rows = (ids["item"] < 0) | (ids["category"] < 0)
        for col in ("hist_item", "hist_cat"):
            unseen_rows |= np.bincount(row_of_value[ids[col] < 0], minlength=kept.height) > 0
        if self.unseen == "reject" and unseen_rows.any():
            keep_idx = np.flatnonzero(~unseen_rows)
            rejected_unseen = valid.filter(pl.Series(unseen_rows))
            kept = kept.filter(pl.Series(~unseen_rows))
            value_keep = ~unseen_rows[row_of_value]
            ids = {"item": ids["item"][keep_idx], "category": ids["category"][keep_idx],
                   "hist_item": ids["hist_item"][value_keep], "hist_cat": ids["hist_cat"][value_keep]}
            lengths = np.diff(offsets)[keep_idx]
        else:
            rejected_unseen = valid.clear()
            stats.unseen_ids_mapped = int(sum((v < 0).sum() for v in ids.values()))
            ids = {k: np.where(v < 0, 0, v) for k, v in ids.items()}
            lengths = np.diff(offsets)
        bad = reasons != ""
        pieces = [frame.filter(pl.Series(bad)).with_columns(pl.Series("reason", reasons[bad], dtype=pl.String)),
                  rejected_unseen.with_columns(pl.lit("unseen_id", dtype=pl.String).alias("reason"))]
        rejected = pl.concat(pieces, how="vertical_relaxed")
        for reason, n in Counter(rejected["reason"].to_list()).items():
            stats.rows_rejected[reason] += n
        scores = self._forward(ids, lengths) if kept.height else {t.name: np.zeros(0, np.float32) for t in self.tasks}
        out = kept.select([c for c in self.keep_columns if c in kept.columns]).with_columns(
            [pl.Series(f"score_{name}", values, dtype=pl.Float32) for name, values in scores.items()]
        )
        stats.rows_scored = out.height
        return out, rejected, stats

    @torch.inference_mode()
    def _forward(self, ids: Dict[str, np.ndarray], lengths: np.ndarray) -> Dict[str, np.ndarray]:
        """Model forward on mapped ids -> probability (binary) or value (regression) per task."""
        sparse = make_ctr_kjt(
            torch.from_numpy(ids["hist_item"]), torch.from_numpy(ids["hist_cat"]),
            torch.from_numpy(lengths.astype(np.int64)),
            torch.from_numpy(ids["item"]), torch.from_numpy(ids["category"]),
        )
        out = self.bundle.model(CTRBatch(sparse=sparse))
        result = {}
        for task in self.tasks:
            logit = out.logits[task.name].float()
            result[task.name] = (torch.sigmoid(logit) if task.loss == "binary" else logit).numpy()
        return result
