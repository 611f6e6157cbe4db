"""Score CTR logs with a ranking model (single or multi-task): one ``score_<task>`` column per task."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import torch

from recsys.bundle import LoadedBundle
from recsys.data.batch import CTRBatch, PaddedHistory, ctr_kjt_from_values
from recsys.data.ctr_table import list_column_arrays, padded_history
from recsys.data.schema import null_inside
from recsys.errors import ConfigError
from recsys.scoring.reader import SCORING_COLUMNS, out_of_range_rows
from recsys.scoring.writer import with_outputs

POLICIES = ("map", "reject")


def check_fixed_shape(value: object) -> str | bool:
    """``fixed_shape`` must be ``auto``, ``true`` or ``false``; one-line :class:`ConfigError` otherwise."""
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"fixed_shape={value!r}: choose auto, true or false")
    return value


ID_COLUMNS = ("item", "category", "hist_item", "hist_cat")


@dataclass
class ScoreStats:
    """Counts for the end-of-job summary."""

    rows_in: int = 0
    rows_scored: int = 0
    rows_rejected: Counter = field(default_factory=Counter)  # reason -> rows
    unseen_ids_mapped: int = 0

    def add(self, other: ScoreStats) -> None:
        self.rows_in += other.rows_in
        self.rows_scored += other.rows_scored
        self.rows_rejected.update(other.rows_rejected)
        self.unseen_ids_mapped += other.unseen_ids_mapped

    def to_dict(self) -> dict:
        return {
            "rows_in": self.rows_in,
            "rows_scored": self.rows_scored,
            "rows_rejected": dict(sorted(self.rows_rejected.items())),
            "unseen_ids_mapped": self.unseen_ids_mapped,
        }

    @classmethod
    def from_dict(cls, entry: dict) -> ScoreStats:
        return cls(
            int(entry["rows_in"]),
            int(entry["rows_scored"]),
            Counter({k: int(v) for k, v in entry["rows_rejected"].items()}),
            int(entry["unseen_ids_mapped"]),
        )


@dataclass
class PreparedBatch:
    """One input batch validated and mapped, ready for the model (the CPU work before the forward).

    Attributes:
        kept: the scored rows' pass-through columns (``n`` rows).
        batch: the model input for those rows (``None`` when ``n == 0``): a KJT, or with ``fixed_shape`` the
            ids at the fixed shape ``[n, max_len]`` (``CTRBatch.padded``); raw ids, not table rows, when the
            scorer maps them on the device (``map_on_device``).
        rejected: rejected rows with a ``reason`` column.
        stats: the batch's counts (``rows_scored`` is set by :meth:`CTRScorer.finish`).
        unmapped: with ``map_on_device`` and ``unseen="reject"``, the valid rows as read (``n`` rows, all
            columns, histories not truncated): the rows with unseen ids, known only after the device lookup in
            :meth:`CTRScorer.finish`, are rejected from it; ``None`` otherwise (not held: its histories' memory).
    """

    kept: pl.DataFrame
    batch: CTRBatch | None
    rejected: pl.DataFrame
    stats: ScoreStats
    unmapped: pl.DataFrame | None = None


def ctr_batch(values: np.ndarray, lengths: np.ndarray) -> CTRBatch:
    """Model input over ``values`` in the CTR KJT's value order (no copy) with history ``lengths [n]``."""
    return CTRBatch(sparse=ctr_kjt_from_values(torch.from_numpy(values), torch.from_numpy(lengths.astype(np.int64))))


class CTRScorer:
    """Maps raw ids through the bundle's id maps, applies the bad-row policy, runs the model.

    Args:
        bundle: the loaded model bundle.
        unseen: ``"map"`` sends ids never seen in training to the reserved padding row 0 (and counts them);
            ``"reject"`` moves such rows to the rejects with reason ``unseen_id``.
        keep_columns: input columns copied to the output beside the scores (when present).
        device: where the model runs; the bundle's model is moved there. For CUDA, :meth:`prepare` (run ahead
            in a thread) pins the batch and :meth:`finish` copies it with ``non_blocking``.
        fixed_shape: ``True`` builds each batch's ids at the fixed shape ``[n, max_len]`` in numpy
            (:func:`~recsys.data.ctr_table.padded_history`, the training step's sync-free input) instead of a
            KJT; ``"auto"`` = on CUDA. Models whose tables are not local (sharded) read the KJT: ``True``
            raises for them, ``"auto"`` keeps the KJT.
        map_on_device: map the raw ids to table rows where the model runs (:meth:`IdMapper.to_torch`), in
            :meth:`finish`, instead of in :meth:`prepare` on the host; needs ``fixed_shape``. ``None`` = on CUDA
            with fixed-shape batches; ``True`` forces it (on the CPU: tests).

    Rows with a null id or a null/empty history are always rejected (reasons ``null`` / ``empty_history``),
    rows with an id beyond Int64 (unsigned input) too (``id_out_of_range``). :meth:`prepare` may run in many
    threads at once; :meth:`finish` too (file threads): the model runs one batch at a time under a lock.
    """

    def __init__(
        self,
        bundle: LoadedBundle,
        unseen: str = "map",
        keep_columns: Sequence[str] = ("user", "item", "timestamp"),
        device: str | torch.device = "cpu",
        fixed_shape: str | bool = "auto",
        map_on_device: bool | None = None,
    ) -> None:
        if unseen not in POLICIES:
            raise ConfigError(f"unseen={unseen!r}: choose one of {list(POLICIES)}")
        self.bundle, self.unseen, self.keep_columns = bundle, unseen, list(keep_columns)
        self.max_len = bundle.meta.max_len
        self.tasks = bundle.tasks
        self.device = torch.device(device)
        self.fixed_shape = self._fixed_shape(fixed_shape)
        if map_on_device and not self.fixed_shape:
            raise ConfigError("map_on_device=true needs fixed-shape batches (fixed_shape=true)")
        self.map_on_device = self.fixed_shape and self.device.type == "cuda" if map_on_device is None else map_on_device
        self._device_maps = (
            {c: bundle.mappers[c].to_torch(self.device) for c in ("item", "category")} if self.map_on_device else {}
        )
        self._model_lock = threading.Lock()
        bundle.model.to(self.device)

    def _fixed_shape(self, setting: str | bool) -> bool:
        """``fixed_shape`` resolved: ``auto`` = on CUDA; only models whose tables are local can read it."""
        check_fixed_shape(setting)
        local = bool(getattr(getattr(self.bundle.model, "backbone", None), "local_tables", False))
        if setting is True and not local:
            raise ConfigError(
                "fixed_shape=true: this model's tables are not local (sharded, or a backbone without the "
                "fixed-shape path) and read the KJT; use fixed_shape=auto or false"
            )
        return local and (setting is True or (setting == "auto" and self.device.type == "cuda"))

    required_columns = SCORING_COLUMNS

    def output_schema(self, input_schema: dict[str, pl.DataType]) -> dict[str, pl.DataType]:
        schema = {c: input_schema[c] for c in self.keep_columns if c in input_schema}
        schema.update({f"score_{t.name}": pl.Float32 for t in self.tasks})
        return schema

    def _reasons(self, frame: pl.DataFrame) -> np.ndarray:
        """Per-row rejection reason ('' = keep) for nulls and empty histories."""
        null = frame.select(
            pl.any_horizontal(
                *(pl.col(c).is_null() for c in ("item", "category", "hist_item", "hist_cat")),
                *(null_inside(c) for c in ("hist_item", "hist_cat")),  # a null id inside a history: not unseen
            )
        )
        empty = frame.select(
            (pl.col("hist_item").list.len().fill_null(0) == 0)
            | (pl.col("hist_item").list.len() != pl.col("hist_cat").list.len())
        )
        reasons = np.full(frame.height, "", dtype=object)
        reasons[empty.to_series().to_numpy()] = "empty_history"
        reasons[out_of_range_rows(frame, ID_COLUMNS)] = "id_out_of_range"
        reasons[null.to_series().to_numpy()] = "null"
        return reasons

    def _recent(self, frame: pl.DataFrame) -> pl.DataFrame:
        """The most recent ``max_len`` behaviours of each history, as in training (no copy when none is longer)."""
        if frame.height == 0 or frame["hist_item"].list.len().max() <= self.max_len:
            return frame
        return frame.with_columns(
            pl.col("hist_item").list.tail(self.max_len), pl.col("hist_cat").list.tail(self.max_len)
        )

    def prepare(self, frame: pl.DataFrame) -> PreparedBatch:
        """Reject bad rows, map ids, build the model input (no model call: safe to run ahead in a thread).

        With ``map_on_device`` the ids stay raw (padded to ``[n, max_len]``): :meth:`finish` maps them and
        rejects the rows with unseen ids then.
        """
        stats = ScoreStats(rows_in=frame.height)
        reasons = self._reasons(frame)
        bad = reasons != ""
        valid = frame.filter(pl.Series(~bad)) if bad.any() else frame
        rejected = frame.filter(pl.Series(bad)).with_columns(pl.Series("reason", reasons[bad], dtype=pl.String))
        stats.rows_rejected.update(Counter(reasons[bad].tolist()))
        kept = self._recent(valid)
        unmapped = None
        if self.map_on_device:
            batch = self._raw_input(kept) if kept.height else None
            unmapped = valid if self.unseen == "reject" else None
        else:
            kept, batch, rejected_unseen = self._map_on_host(valid, kept, stats)
            rejected = self._with_unseen(rejected, rejected_unseen, stats)
        if batch is not None and self.device.type == "cuda":
            batch = batch.pin_memory()  # here, in the read-ahead thread: finish() copies it without blocking
        kept = kept.select([c for c in self.keep_columns if c in kept.columns])
        return PreparedBatch(kept, batch, rejected, stats, unmapped)

    def _map_on_host(
        self, valid: pl.DataFrame, kept: pl.DataFrame, stats: ScoreStats
    ) -> tuple[pl.DataFrame, CTRBatch | None, pl.DataFrame]:
        """Map the ids of ``kept`` (``valid`` with histories cut to ``max_len``) and apply the unseen policy
        -> (rows to score, their model input or ``None``, the ``valid`` rows rejected as unseen)."""
        values, ids, lengths = self._mapped_ids(kept)
        unseen = {k: v < 0 for k, v in ids.items()}
        unseen_rows = self._unseen_rows(unseen, lengths)
        if self.unseen == "reject" and unseen_rows.any():
            keep, value_keep = ~unseen_rows, np.repeat(~unseen_rows, lengths)
            kept = kept.filter(pl.Series(keep))
            ids = {k: v[value_keep if k.startswith("hist_") else keep] for k, v in ids.items()}
            rejected = valid.filter(pl.Series(unseen_rows))
            return kept, self._model_input(ids, lengths[keep]) if kept.height else None, rejected
        stats.unseen_ids_mapped = int(sum(u.sum() for u in unseen.values()))
        for column, mask in unseen.items():  # ids are views of ``values``: fixed in place
            if mask.any():
                ids[column][mask] = 0
        return kept, self._model_input(ids, lengths, values) if kept.height else None, valid.clear()

    @staticmethod
    def _with_unseen(rejected: pl.DataFrame, unseen: pl.DataFrame, stats: ScoreStats) -> pl.DataFrame:
        """``rejected`` followed by the ``unseen`` rows (reason ``unseen_id``), these counted into ``stats``."""
        if unseen.height:
            stats.rows_rejected["unseen_id"] += unseen.height
        unseen = unseen.with_columns(pl.lit("unseen_id", dtype=pl.String).alias("reason"))
        return pl.concat([rejected, unseen], how="vertical_relaxed")

    def _raw_input(self, kept: pl.DataFrame) -> CTRBatch:
        """The raw ids of ``kept`` (histories already cut to ``max_len``) at the fixed shape ``[n, max_len]``
        (:func:`padded_history`: padding slots hold 0, which :meth:`_map_padded` masks by the lengths, as 0 may
        be a raw id), mapped on the device by :meth:`_forward`."""
        hist_item, offsets = list_column_arrays(kept, "hist_item")
        hist_cat, _ = list_column_arrays(kept, "hist_cat")
        targets = (kept[c].cast(pl.Int64).to_numpy() for c in ("item", "category"))
        padded = padded_history(hist_item, hist_cat, np.diff(offsets), *targets, self.max_len)
        return CTRBatch(sparse=None, padded=padded)

    def _mapped_ids(self, kept: pl.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Map raw ids to table rows (-1 = unseen) straight into one buffer in the CTR KJT's value order.

        Returns ``values [2 N + 2 n]`` (``N`` history ids, ``n`` rows), its views by column (``hist_item,
        hist_cat [N]``, ``item, category [n]``) and the history ``lengths [n]``.
        """
        m = self.bundle.mappers
        hist_item, offsets = list_column_arrays(kept, "hist_item")
        hist_cat, _ = list_column_arrays(kept, "hist_cat")
        total, n = len(hist_item), kept.height
        values = np.empty(2 * total + 2 * n, dtype=np.int64)
        ids = dict(
            zip(("hist_item", "hist_cat", "item", "category"), np.split(values, [total, 2 * total, 2 * total + n]))
        )
        m["item"](hist_item, out=ids["hist_item"])
        m["category"](hist_cat, out=ids["hist_cat"])
        m["item"](kept["item"].cast(pl.Int64).to_numpy(), out=ids["item"])
        m["category"](kept["category"].cast(pl.Int64).to_numpy(), out=ids["category"])
        return values, ids, np.diff(offsets)

    @staticmethod
    def _unseen_rows(unseen: dict[str, np.ndarray], lengths: np.ndarray) -> np.ndarray:
        """``[n]`` rows with any unseen id, from per-column unseen masks (histories flat, ``lengths [n]``)."""
        rows = unseen["item"] | unseen["category"]
        if unseen["hist_item"].any() or unseen["hist_cat"].any():
            row_of_value = np.repeat(np.arange(len(lengths)), lengths)
            for column in ("hist_item", "hist_cat"):
                rows |= np.bincount(row_of_value[unseen[column]], minlength=len(lengths)) > 0
        return rows

    def finish(self, prepared: PreparedBatch) -> tuple[pl.DataFrame, pl.DataFrame, ScoreStats]:
        """Run the model on a prepared batch -> (scores for kept rows, rejected rows, counts).

        With ``map_on_device`` the unseen policy is applied here, from the device's per-row unseen flags: under
        ``reject`` those rows leave the scores for the rejects (after the rows ``prepare`` rejected, as on the
        host path), under ``map`` the count of unseen ids is recorded.
        """
        rejected, stats = prepared.rejected, prepared.stats
        unseen = None
        if prepared.batch is None:
            scores = {t.name: np.zeros(0, np.float32) for t in self.tasks}
        else:
            scores, unseen = self._forward(prepared.batch)
        out = with_outputs(
            prepared.kept, [pl.Series(f"score_{name}", values, dtype=pl.Float32) for name, values in scores.items()]
        )
        if unseen is not None:
            unseen_rows, unseen_ids = unseen
            if self.unseen == "reject":
                out = out.filter(pl.Series(~unseen_rows))
                rejected = self._with_unseen(rejected, prepared.unmapped.filter(pl.Series(unseen_rows)), stats)
            else:
                stats.unseen_ids_mapped = unseen_ids
        stats.rows_scored = out.height
        return out, rejected, stats

    def _model_input(
        self, ids: dict[str, np.ndarray], lengths: np.ndarray, values: np.ndarray | None = None
    ) -> CTRBatch:
        """Mapped ids (flat histories ``[sum(L)]``, targets ``[n]``) and ``lengths [n]`` -> the CTR batch: the
        fixed-shape ids ``[n, max_len]`` with ``fixed_shape``, else the KJT (over ``values``, the ids' shared
        buffer in the KJT's order, when they are views of it: no copy)."""
        if self.fixed_shape:
            padded = padded_history(
                ids["hist_item"], ids["hist_cat"], lengths, ids["item"], ids["category"], self.max_len
            )
            return CTRBatch(sparse=None, padded=padded)
        if values is None:
            values = np.concatenate([ids["hist_item"], ids["hist_cat"], ids["item"], ids["category"]])
        return ctr_batch(values, lengths)

    @torch.inference_mode()
    def _forward(self, batch: CTRBatch) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, int] | None]:
        """Model forward -> (probability (binary) or value (regression) per task, ``[n]`` each; with
        ``map_on_device`` also the rows with an unseen id ``[n]`` bool and the count of unseen ids, else ``None``).

        The model sees one caller at a time (``_model_lock``: it and its eval caches are not thread-safe), but
        on CUDA the lock covers only the launch: the results come back in a non-blocking copy that this thread
        waits for (its own event) after releasing the lock, so other file threads launch meanwhile.
        """
        with self._model_lock:
            batch = batch.to(self.device, non_blocking=True)
            unseen = None
            if self.map_on_device:
                padded, unseen_rows, unseen_ids = self._map_padded(batch.padded)
                batch = replace(batch, padded=padded)
            out = self.bundle.model(batch)
            if self.map_on_device:  # copied back with the scores: one wait for all
                unseen = [unseen_rows.to("cpu", non_blocking=True), unseen_ids.to("cpu", non_blocking=True)]
            result = {}
            for task in self.tasks:
                logit = out.logits[task.name].float()
                value = torch.sigmoid(logit) if task.loss == "binary" else logit
                result[task.name] = value.to("cpu", non_blocking=True)  # pinned, on CUDA; itself on CPU
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record(torch.cuda.current_stream(self.device))
        if done is not None:
            done.synchronize()
        scores = {name: value.numpy() for name, value in result.items()}
        return scores, None if unseen is None else (unseen[0].numpy(), int(unseen[1]))

    def _map_padded(self, raw: PaddedHistory) -> tuple[PaddedHistory, torch.Tensor, torch.Tensor]:
        """Raw fixed-shape ids (on the device) -> (the table rows, unseen ids and padding slots at row 0; the
        rows with any unseen id ``[n]`` bool; the count of unseen ids ``[]`` int64), without a host sync.

        Only the real slots count (``slot < lengths``): the padding slots' raw 0 may be unseen, or a real id.
        """
        item, category = self._device_maps["item"], self._device_maps["category"]
        hist = torch.stack([item(raw.hist_item), category(raw.hist_cat)])  # [2, n, max_len]
        target = torch.stack([item(raw.target_item), category(raw.target_cat)])  # [2, n]
        real = torch.arange(hist.shape[-1], device=hist.device) < raw.lengths[:, None]  # [n, max_len]
        hist_unseen, target_unseen = (hist < 0) & real, target < 0
        unseen_rows = hist_unseen.any(dim=2).any(dim=0) | target_unseen.any(dim=0)
        unseen_ids = hist_unseen.sum() + target_unseen.sum()
        hist, target = hist.clamp_min(0).masked_fill(~real, 0), target.clamp_min(0)
        return PaddedHistory(hist[0], hist[1], raw.lengths, target[0], target[1]), unseen_rows, unseen_ids
