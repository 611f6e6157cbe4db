"""Top-N next items per user from a sequential bundle (SASRec / MQSA-TED), for ``pipelines.score``.

Input rows: ``user`` and ``history`` (``List(Int64)`` of raw item ids, oldest first). Output rows: the kept
columns, ``top_items`` (``List(Int64)``, the N best items not in the history, best first) and ``top_scores``
(``List(Float32)``, their scores), ranked over the whole item table at the newest position as in evaluation.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch

from recsys.bundle import LoadedBundle
from recsys.data.ctr_table import list_column_arrays
from recsys.data.schema import null_inside
from recsys.data.seq_batch import SeqBatch, make_seq_kjt
from recsys.data.seqrec_format import take_segments
from recsys.errors import ConfigError
from recsys.models.sequential import last_position_scores
from recsys.scoring.ctr_scorer import POLICIES, PreparedBatch, ScoreStats
from recsys.scoring.reader import out_of_range_rows
from recsys.scoring.writer import with_outputs

SEQ_SCORING_COLUMNS = ("user", "history")


class SeqScorer:
    """Same contract as :class:`~recsys.scoring.ctr_scorer.CTRScorer` (``prepare`` / ``finish`` /
    ``output_schema``), for sequential bundles.

    Args:
        bundle: a loaded sequential bundle (``bundle.tasks`` empty).
        top_n: items per user.
        unseen: ``"map"`` drops history ids never seen in training (counted; a history left empty is
            rejected as ``empty_history``); ``"reject"`` rejects rows holding any such id (``unseen_id``).
        keep_columns: input columns copied beside the recommendations (when present).
        device: where the model runs (as for :class:`~recsys.scoring.ctr_scorer.CTRScorer`).

    File threads may call :meth:`finish` at once: the model runs one batch at a time (``_model_lock``).
    """

    required_columns = SEQ_SCORING_COLUMNS

    def __init__(
        self,
        bundle: LoadedBundle,
        top_n: int = 10,
        unseen: str = "map",
        keep_columns: Sequence[str] = ("user",),
        device: str | torch.device = "cpu",
    ) -> None:
        if unseen not in POLICIES:
            raise ConfigError(f"unseen={unseen!r}: choose one of {list(POLICIES)}")
        self.num_items = int(bundle.model.num_items)
        if not 1 <= top_n <= self.num_items:
            raise ConfigError(f"top_n={top_n}: must be between 1 and the {self.num_items} items of the model")
        self.device = torch.device(device)
        self._model_lock = threading.Lock()
        bundle.model.to(self.device)
        self.bundle, self.top_n, self.unseen, self.keep_columns = bundle, int(top_n), unseen, list(keep_columns)
        self.max_len = bundle.meta.max_len
        mapper = bundle.mappers["item"]
        self.raw_of_row = None  # table row -> raw item id; None: the dataset kept its ids
        if mapper.raw is not None:
            self.raw_of_row = np.zeros(self.num_items + 1, dtype=np.int64)
            self.raw_of_row[mapper.rows] = mapper.raw

    def output_schema(self, input_schema: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
        schema = {c: input_schema[c] for c in self.keep_columns if c in input_schema}
        schema.update({"top_items": pl.List(pl.Int64), "top_scores": pl.List(pl.Float32)})
        return schema

    def prepare(self, frame: pl.DataFrame) -> PreparedBatch:
        """Reject bad rows, map ids, keep the newest ``max_len`` items, build the :class:`SeqBatch`."""
        stats = ScoreStats(rows_in=frame.height)
        out_of_range = out_of_range_rows(frame, ("history",))
        reasons = np.where(out_of_range, "id_out_of_range", "")
        null = (
            frame.select(pl.col("user").is_null() | pl.col("history").is_null() | null_inside("history"))
            .to_series()
            .to_numpy()
        )  # a null id inside a history is rejected, not counted as unseen
        reasons = np.where(null, "null", reasons)
        readable = pl.when(pl.lit(pl.Series(out_of_range))).then(None).otherwise(pl.col("history")).alias("history")
        filled = readable.fill_null([]).list.eval(pl.element().fill_null(0))  # rejected rows: any id
        values, offsets = list_column_arrays(frame.with_columns(filled), "history")
        rows = self.bundle.mappers["item"](values)
        lengths = np.diff(offsets)
        row_of_value = np.repeat(np.arange(frame.height), lengths)
        unseen = rows < 0
        if self.unseen == "reject":
            bad_rows = np.bincount(row_of_value[unseen], minlength=frame.height) > 0
            reasons = np.where((reasons == "") & bad_rows, "unseen_id", reasons)
        else:
            stats.unseen_ids_mapped = int(unseen[reasons[row_of_value] == ""].sum())
        keep_value = ~unseen & (reasons[row_of_value] == "")
        lengths = np.bincount(row_of_value[keep_value], minlength=frame.height)
        reasons = np.where((reasons == "") & (lengths == 0), "empty_history", reasons)
        keep = reasons == ""
        rows, lengths = rows[keep_value & keep[row_of_value]], lengths[keep]
        rejected = frame.filter(pl.Series(~keep)).with_columns(pl.Series("reason", reasons[~keep], dtype=pl.String))
        for reason, n in Counter(reasons[~keep].tolist()).items():
            stats.rows_rejected[reason] += n
        kept = frame.filter(pl.Series(keep))
        batch = self._batch(*self._newest(rows, lengths), exclude=(rows, lengths)) if kept.height else None
        if batch is not None and self.device.type == "cuda":
            batch = batch.pin_memory()  # in the read-ahead thread; finish() copies it without blocking
        return PreparedBatch(kept.select([c for c in self.keep_columns if c in kept.columns]), batch, rejected, stats)

    def _newest(self, rows: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The newest ``max_len`` ids of each history (flat ``rows``, ``lengths [n]``), as in training."""
        if not len(lengths) or lengths.max() <= self.max_len:
            return rows, lengths
        kept = np.minimum(lengths, self.max_len)
        newest = take_segments(rows, np.cumsum(lengths) - kept, kept)
        return newest.values, kept

    @staticmethod
    def _batch(rows: np.ndarray, lengths: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> SeqBatch:
        """Input = the (newest) history ``rows`` with ``lengths [n]``; removed from the ranking = ``exclude``
        (the whole known history; default the input); no targets."""
        as_torch = lambda v, n: (torch.from_numpy(v), torch.from_numpy(n.astype(np.int64)))  # noqa: E731
        seq = as_torch(rows, lengths)
        none = (torch.zeros(0, dtype=torch.int64), torch.zeros(len(lengths), dtype=torch.int64))
        return SeqBatch(sparse=make_seq_kjt(seq, none, as_torch(*exclude) if exclude is not None else seq))

    @torch.inference_mode()
    def finish(self, prepared: PreparedBatch) -> tuple[pl.DataFrame, pl.DataFrame, ScoreStats]:
        """Rank all items for each kept row -> (recommendations, rejected rows, counts)."""
        n = prepared.kept.height
        if prepared.batch is None:
            items, scores = np.zeros((0, self.top_n), np.int64), np.zeros((0, self.top_n), np.float32)
        else:
            with self._model_lock:
                batch = prepared.batch.to(self.device, non_blocking=True)
                top = last_position_scores(self.bundle.model, batch).topk(self.top_n, dim=1)
                items = top.indices.cpu().numpy() + 1  # column j scores item j + 1
                scores = top.values.float().cpu().numpy()
            if self.raw_of_row is not None:
                items = self.raw_of_row[items]
        out = with_outputs(
            prepared.kept,
            [
                pl.Series("top_items", items.tolist(), dtype=pl.List(pl.Int64)),
                pl.Series("top_scores", scores.tolist(), dtype=pl.List(pl.Float32)),
            ],
        )
        prepared.stats.rows_scored = n
        return out, prepared.rejected, prepared.stats
