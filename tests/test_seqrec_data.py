"""Sequential data: S3-Rec reader, leave-one-out split, parquet cache, data module, TED's transition graph."""

import numpy as np
import polars as pl
import pytest
import torch

from recsys.data.batch import TARGET_ITEM
from recsys.data.schema import DataValidationError
from recsys.data.seq_batch import EXCLUDE_ITEM, SEQ_ITEM
from recsys.data.seqrec import SeqDataModule, prepare_seqrec
from recsys.data.seqrec_format import leave_one_out, read_sequences
from recsys.data.transitions import build_transition_graph, transition_pairs
from tests.conftest import shared_data

# user 7: 6 items; user 3: 3 items (train = [5]); user 9: 5 items (a blank line before it is skipped)
TINY = "7 1 2 3 4 5 6\n3 5 6 1\n\n9 2 4 2 7 8\n"


def write(tmp_path, text, name="seq.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(jagged):
    return [jagged.values[a:b].tolist() for a, b in zip(jagged.offsets[:-1], jagged.offsets[1:])]


def test_reader_and_leave_one_out_split(tmp_path):
    seqs = read_sequences(write(tmp_path, TINY))
    assert seqs.users.tolist() == [7, 3, 9] and seqs.num_items == 8 and len(seqs.items) == 14
    split = leave_one_out(seqs, max_len=3)
    train, val, test = split["train"], split["val"], split["test"]
    # s = training items cut to the last 3: user 7 [2, 3, 4], user 3 [5] (no target: dropped), user 9 [2, 4, 2]
    assert train.user.tolist() == [7, 9]
    assert rows(train.history) == [[2, 3], [2, 4]] and rows(train.targets) == [[3, 4], [4, 2]]
    assert rows(train.exclude) == [[], []]
    assert rows(val.history) == [[2, 3, 4], [5], [2, 4, 2]] and rows(val.targets) == [[5], [6], [7]]
    assert rows(val.exclude) == rows(val.history)
    assert rows(test.history) == [[3, 4, 5], [5, 6], [4, 2, 7]] and rows(test.targets) == [[6], [1], [8]]
    assert rows(test.exclude) == [[2, 3, 4, 5], [5, 6], [2, 4, 2, 7]]  # s + the validation item


def test_batches_carry_a_kjt_of_item_ids(tmp_path):
    table = leave_one_out(read_sequences(write(tmp_path, TINY)), max_len=3)["test"]
    batch = table.batch([2, 0])
    assert batch.sparse.keys() == [SEQ_ITEM, TARGET_ITEM, EXCLUDE_ITEM]
    values, lengths = batch.jagged(SEQ_ITEM)
    assert values.tolist() == [4, 2, 7, 3, 4, 5] and lengths.tolist() == [3, 3]
    assert batch.jagged(TARGET_ITEM)[0].tolist() == [8, 6]
    assert batch.user.tolist() == [9, 7]
    moved = batch.to("cpu")
    assert moved.batch_size == 2 and torch.equal(moved.jagged(EXCLUDE_ITEM)[0], batch.jagged(EXCLUDE_ITEM)[0])


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 3 4\n2 5 x 6\n", r"line\(s\) \[2\] hold non-integer tokens"),
        ("1 2 3 4\n2\n", r"line\(s\) \[2\] have a user id but an empty item sequence"),
        ("1 2 3 4\n2 5 6\n", r"line\(s\) \[2\] have fewer than 3 items"),
        ("1 2 0 4\n", r"item ids < 1"),
        ("1 2 3 4\n1 5 6 7\n", r"user 1 appears on several lines \[1, 2\]"),
        ("\n\n", r"no sequences"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DataValidationError, match=message) as err:
        read_sequences(path)
    assert str(path) in str(err.value)


def test_missing_file_names_the_path_and_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt: not found; set data\.path="):
        prepare_seqrec(tmp_path / "nowhere.txt", tmp_path / "cache")


def test_parquet_cache_is_fingerprinted_and_reused(tmp_path):
    path = write(tmp_path, TINY)
    folder = prepare_seqrec(path, tmp_path / "cache", name="tiny", max_len=3)
    assert folder.name.startswith("tiny-") and {p.name for p in folder.iterdir()} == {
        "train.parquet",
        "val.parquet",
        "test.parquet",
        "meta.json",
    }
    frame = pl.read_parquet(folder / "test.parquet")
    assert frame.schema["history"] == pl.List(pl.Int64) and frame["exclude"].to_list()[0] == [2, 3, 4, 5]
    assert prepare_seqrec(path, tmp_path / "cache", name="tiny", max_len=3) == folder  # reused
    assert prepare_seqrec(path, tmp_path / "cache", name="tiny", max_len=4) != folder  # parameters count
    path.write_text(TINY + "11 1 2 3\n")
    assert prepare_seqrec(path, tmp_path / "cache", name="tiny", max_len=3) != folder  # file bytes count
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_datamodule_serves_the_same_split(tmp_path):
    path = write(tmp_path, TINY)
    dm = SeqDataModule(
        "tiny",
        lambda cache_root: prepare_seqrec(path, cache_root, "tiny", 3),
        str(tmp_path / "c"),
        batch_size=2,
        eval_batch_size=8,
    )
    meta = dm.prepare()
    assert (meta.num_items, meta.max_len, meta.rows) == (8, 3, {"train": 2, "val": 3, "test": 3})
    assert dm.backbone_inputs()["vocab"].num_items == 8 and dm.tasks == []
    reference = leave_one_out(read_sequences(path), max_len=3)
    dm.setup()
    for split, table in reference.items():
        for column in ("history", "targets", "exclude"):
            assert rows(getattr(dm.tables[split], column)) == rows(getattr(table, column)), (split, column)
    batches = list(dm.train_dataloader())
    assert [b.batch_size for b in batches] == [2]
    assert next(iter(dm.test_dataloader())).batch_size == 3


def test_transition_graph_hand_example_uses_training_items_only(tmp_path):
    # user 1: train [1, 2, 1, 2, 3], val 9, test 10; user 2: train [2, 3], val 9, test 9
    path = write(tmp_path, "1 1 2 1 2 3 9 10\n2 2 3 9 9\n")
    dm = SeqDataModule("g", lambda cache_root: prepare_seqrec(path, cache_root, "g"), str(tmp_path / "c"))
    graph = dm.transition_graph()
    counts = torch.zeros(11, 11)
    for a, b in [(1, 2), (2, 1), (1, 2), (2, 3), (2, 3)]:
        counts[a, b] += 1
    dense = graph.dense()
    expected = counts / counts.amax(1, keepdim=True).clamp_min(1)
    assert torch.equal(dense, expected)  # row-max normalised: A[1, 2] = 2 -> 1, A[2, 1] = 1 -> 0.5, A[2, 3] = 2 -> 1
    assert dense[:, 9:].sum() == 0 and dense[9:].sum() == 0  # validation/test items never enter the graph
    assert graph.counts.tolist() == [2.0, 1.0, 2.0]
    # span 2 adds the pairs two steps apart: (1, 1), (2, 2), (1, 3)
    span2 = dm.transition_graph(span=2)
    assert span2.counts.sum() == 5 + 3 and span2.dense()[1, 3] == 0.5


def test_graph_row_ids_are_the_coo_rows_of_the_csr():
    src, dst = torch.tensor([1, 1, 3, 3, 3, 4]), torch.tensor([2, 3, 1, 1, 4, 2])
    graph = build_transition_graph(src, dst, num_items=5)
    assert graph.row_ids().tolist() == [1, 1, 3, 3, 4]
    rebuilt = torch.zeros(6, 6).index_put_((graph.row_ids(), graph.col), graph.weight)
    assert torch.equal(rebuilt, graph.dense())
    assert rebuilt[3, 1] == 1.0 and rebuilt[3, 4] == 0.5  # (3, 1) twice, (3, 4) once: row-max normalised


def test_transition_pairs_are_vectorised_per_row():
    history, targets = torch.tensor([1, 2, 3, 7]), torch.tensor([2, 3, 4, 8])
    src, dst = transition_pairs(history, targets, torch.tensor([3, 1]), span=2)
    assert list(zip(src.tolist(), dst.tolist())) == [(1, 2), (2, 3), (3, 4), (7, 8), (1, 3), (2, 4)]


def test_real_beauty_counts():
    path = shared_data() / "seqrec" / "Beauty.txt"
    if not path.exists():
        pytest.skip(f"{path} not available")
    seqs = read_sequences(path)
    assert (len(seqs.users), seqs.num_items, len(seqs.items)) == (22363, 12101, 198502)
    split = leave_one_out(seqs)
    assert int((seqs.lengths - 2).sum()) == 153776  # training interactions (README)
    train = split["train"]
    src, dst = transition_pairs(
        torch.tensor(train.history.values), torch.tensor(train.targets.values), torch.tensor(train.history.lengths)
    )
    graph = build_transition_graph(src, dst, seqs.num_items)
    assert (len(src), graph.nnz) == (127895, 112191)  # specs/mqsa_ted.md §4: pairs (unique) after the cut to 50
    assert int(np.diff(split["test"].history.offsets).max()) == 50
