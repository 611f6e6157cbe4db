"""S3-Rec sequence files -> leave-one-out splits as flat numpy arrays -> :class:`SeqBatch` es.

Only numpy, torch and torchrec are imported here, so the GPU benchmark (no polars, Lightning, Hydra
or MLflow) reads the same files into the same splits; ``recsys.data.seqrec`` adds the parquet cache
and the Lightning data module on top.

**File format** (the S3-Rec release of Amazon Beauty / Sports and Yelp): one line per user,
``user_id item_1 ... item_n``, space-separated integers, items oldest first; item ids >= 1 (0 is the padding
id). Blank lines are skipped.

**Split** (as the official MQSA-TED code splits): with ``n`` items per user,
``s`` = the training items ``item_1 .. item_{n-2}`` truncated to the last ``max_len``:

========  ==========================================  =================  =========================
split     history (model input, oldest first)         targets            exclude (ranking mask)
========  ==========================================  =================  =========================
train     ``s[:-1]`` (users with ``len(s) >= 2``)      ``s[1:]``          none
val       ``s``                                       ``item_{n-1}``     ``s``
test      last ``max_len`` of ``item_1 .. item_{n-1}``  ``item_n``         ``s`` + ``item_{n-1}``
========  ==========================================  =================  =========================

Every column is a contiguous slice of the user's line, so the split is pure offset arithmetic.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from recsys.data.seq_batch import SeqBatch, make_seq_kjt, padded_seq
from recsys.errors import ConfigError, DataValidationError, InputNotFound

MIN_SEQ_LEN = 3  # one train, one validation and one test item
_INTEGER = re.compile(r"^[+-]?\d+$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# item ids are kept as table rows while the largest id is at most this many times the number of distinct ids
# (the public datasets number their items 1..n); sparser ids are remapped to 1..n (see dense_item_ids)
MAX_ID_SPARSITY = 2


def _show(lines: Sequence[int], limit: int = 5) -> str:
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"{list(lines[:limit])}{more}"


class Jagged(NamedTuple):
    """A jagged int64 column: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, rows: np.ndarray) -> Jagged:
        """Rows ``rows`` as a new jagged column (vectorised gather)."""
        return take_segments(self.values, self.offsets[rows], self.lengths[rows])


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """``[N]`` lengths -> ``[N + 1]`` int64 offsets starting at 0."""
    return np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))


def take_segments(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> Jagged:
    """Concatenate ``values[starts[r] : starts[r] + lengths[r]]`` over rows, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = offsets_of(lengths)
    index = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Jagged(values[index], offsets)


@dataclass
class Sequences:
    """All users' full sequences: ``items[offsets[u]:offsets[u + 1]]`` belongs to ``users[u]``."""

    users: np.ndarray
    items: np.ndarray
    offsets: np.ndarray
    source: str

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_items(self) -> int:
        return int(self.items.max())

    @property
    def num_users(self) -> int:
        return int(self.users.max())


def _tokenise(path: Path) -> tuple[list[int], list[list[str]]]:
    """Line numbers (1-based) and whitespace tokens of every non-blank line."""
    if not path.is_file():
        raise InputNotFound(
            f"{path}: not found; set data.path=<a sequence file with one 'user_id item_id item_id ...' line per user>."
        )
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise DataValidationError(f"{path}: not a text file ({err}).") from err
    numbered = [(i + 1, line.split()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not numbered:
        raise DataValidationError(f"{path}: the file has no sequences (it is empty).")
    return [n for n, _ in numbered], [tokens for _, tokens in numbered]


def _token_error(path: Path, line_no: Sequence[int], tokens: Sequence[list[str]]) -> DataValidationError:
    """The error for tokens that are not integers, or integers outside int64, naming the lines and a value."""
    bad = [n for n, toks in zip(line_no, tokens) if not all(_INTEGER.match(t) for t in toks)]
    if bad:
        return DataValidationError(
            f"{path}: line(s) {_show(bad)} hold non-integer tokens; expected 'user_id item_id item_id ...'."
        )
    for n, toks in zip(line_no, tokens):
        big = next((t for t in toks if not INT64_MIN <= int(t) <= INT64_MAX), None)
        if big is not None:
            return DataValidationError(
                f"{path}: line {n} holds id {big}, outside the allowed range [1, {INT64_MAX}] (64-bit integer ids)."
            )
    raise AssertionError("no bad token found")  # unreachable: int() and int64 accept everything else


def read_sequences(path: str | Path, min_len: int = MIN_SEQ_LEN) -> Sequences:
    """Parse an S3-Rec style file; every problem raises :class:`DataValidationError` naming the file and lines.

    Checks: integer tokens only; no empty sequence; at least ``min_len`` items per user (leave-one-out
    needs 3); item ids >= 1; each user on one line.
    """
    path = Path(path)
    line_no, tokens = _tokenise(path)
    try:
        flat = np.fromiter(map(int, itertools.chain.from_iterable(tokens)), dtype=np.int64)
    except (ValueError, OverflowError):
        raise _token_error(path, line_no, tokens) from None
    counts = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    line_no_arr = np.asarray(line_no)
    empty = line_no_arr[counts == 1]
    if len(empty):
        raise DataValidationError(f"{path}: line(s) {_show(empty.tolist())} have a user id but an empty item sequence.")
    short = line_no_arr[counts - 1 < min_len]
    if len(short):
        raise DataValidationError(
            f"{path}: line(s) {_show(short.tolist())} have fewer than {min_len} items; leave-one-out needs "
            f"at least {min_len} (train, validation, test)."
        )
    starts = offsets_of(counts)[:-1]
    users = flat[starts]
    is_item = np.ones(len(flat), dtype=bool)
    is_item[starts] = False
    items = flat[is_item]
    offsets = offsets_of(counts - 1)
    if items.min() < 1:
        rows = np.unique(np.searchsorted(offsets, np.flatnonzero(items < 1), side="right") - 1)
        raise DataValidationError(
            f"{path}: line(s) {_show(line_no_arr[rows].tolist())} hold item ids < 1; ids start at 1 (0 is padding)."
        )
    uniq, count = np.unique(users, return_counts=True)
    if (count > 1).any():
        dup = uniq[count > 1][0]
        lines = line_no_arr[users == dup].tolist()
        raise DataValidationError(f"{path}: user {dup} appears on several lines {_show(lines)}; one line per user.")
    return Sequences(users=users, items=items, offsets=offsets, source=str(path))


def dense_item_ids(seqs: Sequences) -> tuple[Sequences, np.ndarray | None]:
    """Item ids -> item-table rows, so the table is sized by the number of items, never by the largest raw id.

    Ids numbered (nearly) densely from 1, as in the public S3-Rec files (largest id at most
    ``MAX_ID_SPARSITY`` times the number of distinct ids), are the rows already: returns ``(seqs, None)``.
    Sparser ids (e.g. 10^15-scale catalogue ids) become rows ``1..n`` in raw-id order: returns the remapped
    sequences and ``raw [n]``, the raw id of rows ``1..n`` (scoring maps raw ids in and out with it).
    """
    raw = np.unique(seqs.items)
    if int(raw[-1]) <= MAX_ID_SPARSITY * len(raw):
        return seqs, None
    rows = np.searchsorted(raw, seqs.items).astype(np.int64) + 1
    return dataclasses.replace(seqs, items=rows), raw


def pad_jagged(values: np.ndarray, offsets: np.ndarray, width: int, chunk: int = 65536) -> np.ndarray:
    """A jagged array ``[N]`` rows -> ``[N, width]`` right-padded with 0, int32 when the values fit (rows
    longer than ``width`` raise: the width is the dataset's longest history). Built ``chunk`` rows at a time."""
    lengths = np.diff(offsets)
    if lengths.size and lengths.max() > width:
        raise ValueError(f"a history has {lengths.max()} items, more than the padded width {width}")
    small = values.size == 0 or (values.min() >= 0 and values.max() <= np.iinfo(np.int32).max)
    dtype = np.int32 if small else np.int64
    if offsets[-1] - offsets[0] == lengths.size * width:  # every row is full: the jagged order is the matrix's
        full = values[offsets[0] : offsets[-1]].reshape(lengths.size, width).astype(dtype, copy=False)
        return full if full.flags.writeable else full.copy()  # a read-only view (of an arrow buffer): copied
    out = np.zeros((lengths.size, width), dtype=dtype)
    slots = np.arange(width)
    for lo in range(0, lengths.size, chunk):
        hi = min(lo + chunk, lengths.size)
        real = slots < lengths[lo:hi, None]
        out[lo:hi][real] = values[offsets[lo] : offsets[hi]]  # row-major order = the jagged order
    return out


@dataclass
class SeqTable:
    """One split: ``user [N]`` and three jagged item columns (see the module docstring)."""

    user: np.ndarray
    history: Jagged
    targets: Jagged
    exclude: Jagged

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def batch(self, rows: Iterable[int], pad_to: int | None = None) -> SeqBatch:
        """Rows -> :class:`SeqBatch` (vectorised gathers, no per-row Python); with ``pad_to``, training rows at
        the fixed shape ``[B, pad_to]`` (``SeqBatch.padded``, no KJT: row gathers of :meth:`padded`)."""
        rows = np.asarray(rows, dtype=np.int64)
        user = torch.from_numpy(self.user[rows])
        if pad_to is not None:
            items, targets = self.padded(pad_to)
            lengths = torch.from_numpy(self.history.lengths[rows])
            return SeqBatch(
                None, user, padded_seq(torch.from_numpy(items[rows]), torch.from_numpy(targets[rows]), lengths)
            )
        parts = []
        for column in (self.history, self.targets, self.exclude):
            taken = column.take(rows)
            parts.append((torch.from_numpy(taken.values), torch.from_numpy(taken.lengths)))
        return SeqBatch(sparse=make_seq_kjt(*parts), user=user)

    def padded(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """``(history, targets)`` as ``[N, width]`` matrices (:func:`pad_jagged`), built once per width; training
        splits only (one target per history item)."""
        if not np.array_equal(self.history.offsets, self.targets.offsets):
            raise ValueError("fixed-shape rows need one target per history item (a training split)")
        cache = self.__dict__.setdefault("_padded", {})
        if width not in cache:
            cache[width] = tuple(pad_jagged(c.values, c.offsets, width) for c in (self.history, self.targets))
        return cache[width]


def leave_one_out(seqs: Sequences, max_len: int = 50) -> dict[str, SeqTable]:
    """Train / val / test tables of ``seqs`` (the table in the module docstring)."""
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    start, n = seqs.offsets[:-1], seqs.lengths
    train_len = n - 2
    s_len = np.minimum(train_len, max_len)
    s_start = start + train_len - s_len
    empty = np.zeros(len(n), dtype=np.int64)
    val_item, test_item = start + n - 2, start + n - 1
    test_len = np.minimum(train_len + 1, max_len)
    keep = s_len >= 2
    items = seqs.items
    return {
        "train": SeqTable(
            user=seqs.users[keep],
            history=take_segments(items, s_start[keep], s_len[keep] - 1),
            targets=take_segments(items, s_start[keep] + 1, s_len[keep] - 1),
            exclude=take_segments(items, s_start[keep], empty[keep]),
        ),
        "val": SeqTable(
            user=seqs.users,
            history=take_segments(items, s_start, s_len),
            targets=take_segments(items, val_item, np.ones_like(n)),
            exclude=take_segments(items, s_start, s_len),
        ),
        "test": SeqTable(
            user=seqs.users,
            history=take_segments(items, test_item - test_len, test_len),
            targets=take_segments(items, test_item, np.ones_like(n)),
            exclude=take_segments(items, s_start, s_len + 1),
        ),
    }
