"""Converters, the DARE sample protocol and the parquet cache (small data only, no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import cache as cache_mod
from recsys.data import taobao as taobao_mod
from recsys.data.cache import DatasetMeta, cached_dataset, fingerprint, load_meta, write_dataset
from recsys.data.movielens import ML100K_PROTOCOL, prepare_ml100k, read_ml100k_log
from recsys.data.protocol import CTRProtocol, build_ctr_samples, filter_behaviors, remap_ids
from recsys.data.schema import LOG_SCHEMA, SAMPLE_SCHEMA, SPLITS, DataValidationError, validate_samples
from recsys.data.synthetic import generate_log, prepare_synthetic
from recsys.data.taobao import prepare_taobao, read_taobao_log
from recsys.metrics.ranking import auc as binary_auc
from tests.conftest import shared_data

DATA = shared_data()
TAOBAO_CSV = DATA / "taobao_userbehavior_head" / "UserBehavior.csv"
ML100K = DATA / "ml-100k"


def _read_splits(directory: Path) -> dict:
    return {s: pl.read_parquet(directory / f"{s}.parquet") for s in SPLITS}


# ---------------------------------------------------------------------------------------------- Taobao


@pytest.fixture(scope="module")
def taobao_dir(tmp_path_factory) -> Path:
    if not TAOBAO_CSV.is_file():
        pytest.fail(f"{TAOBAO_CSV} not present: set RECSYS_SHARED_DATA to the shared data folder")
    return prepare_taobao(TAOBAO_CSV, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def taobao_events() -> pl.DataFrame:
    """The remapped pv log, exactly as prepare_taobao builds it."""
    if not TAOBAO_CSV.is_file():
        pytest.fail(f"{TAOBAO_CSV} not present: set RECSYS_SHARED_DATA to the shared data folder")
    return remap_ids(filter_behaviors(read_taobao_log(TAOBAO_CSV), ("pv",)))[0]


def test_taobao_head_counts_and_schema(taobao_dir):
    meta, splits = load_meta(taobao_dir), _read_splits(taobao_dir)
    assert meta.rows == {"train": 228, "val": 12, "test": 12}
    for split, frame in splits.items():
        assert frame.height == meta.rows[split]
        assert dict(frame.schema) == dict(SAMPLE_SCHEMA)
        validate_samples(frame, split, meta.vocab())
        assert frame["user"].n_unique() == 4
        per_user = frame.group_by("user").agg(pl.col("label").sum().alias("p"), pl.len().alias("n"))
        assert (per_user["n"] == per_user["p"] * 3).all()  # 2 negatives per positive
        groups = frame.group_by("user", "timestamp").agg(pl.col("label").sum().alias("p"), pl.len().alias("n"))
        assert (groups["n"] == 3 * groups["p"]).all()


def test_taobao_matches_reference_protocol(taobao_dir, taobao_events):
    """Positives/histories against a plain-Python transcription of DARE's taobao_v4.py."""
    seqs: dict = {}
    for user, item, cat in taobao_events.select("user", "item", "category").iter_rows():
        seqs.setdefault(user, []).append((item, cat))
    expected = {s: [] for s in SPLITS}
    for user, seq in seqs.items():
        if len(seq) < 210:
            continue
        for split, back in [("train", b) for b in range(3, 94, 5)] + [("val", 2), ("test", 1)]:
            hist = seq[:-back][-200:]
            expected[split].append((user, seq[-back][0], seq[-back][1], [i for i, _ in hist], [c for _, c in hist]))
    splits = _read_splits(taobao_dir)
    for split in SPLITS:
        got = (
            splits[split]
            .filter(pl.col("label") == 1)
            .select("user", "item", "category", "hist_item", "hist_cat")
            .rows()
        )
        assert sorted(got) == sorted(expected[split])


def test_taobao_negatives_and_history_order(taobao_dir, taobao_events):
    user_items = set(taobao_events.select("user", "item").iter_rows())
    last_cat = dict(taobao_events.group_by("item").agg(pl.col("category").last()).iter_rows())
    splits = _read_splits(taobao_dir)
    for frame in splits.values():
        negs = frame.filter(pl.col("label") == 0)
        assert not any((u, i) in user_items for u, i in negs.select("user", "item").iter_rows())
        assert all(last_cat[i] == c for i, c in negs.select("item", "category").iter_rows())
        assert frame["hist_item"].list.len().max() <= 200
    # oldest first: the test history ends with the val target, the val history with the latest train target
    pos = {s: f.filter(pl.col("label") == 1).sort("user") for s, f in splits.items()}
    for test_row, val_row in zip(pos["test"].iter_rows(named=True), pos["val"].iter_rows(named=True)):
        assert test_row["hist_item"][-1] == val_row["item"]
        assert test_row["hist_item"][:-1] == val_row["hist_item"][1:]
        assert test_row["timestamp"] >= val_row["timestamp"]
    last_train = pos["train"].group_by("user").agg(pl.col("item").last(), pl.col("timestamp").max()).sort("user")
    for val_row, train_row in zip(pos["val"].iter_rows(named=True), last_train.iter_rows(named=True)):
        assert val_row["timestamp"] >= train_row["timestamp"]
        assert train_row["item"] in val_row["hist_item"]


def test_taobao_uncapped_histories_grow(taobao_events):
    """With max_len above every T, val/test histories are strictly longer than every train history."""
    splits = build_ctr_samples(taobao_events, CTRProtocol(max_len=1000))
    lens = {
        s: f.group_by("user")
        .agg(pl.col("hist_item").list.len().min().alias("lo"), pl.col("hist_item").list.len().max().alias("hi"))
        .sort("user")
        for s, f in splits.items()
    }
    assert (lens["val"]["lo"] > lens["train"]["hi"]).all()
    assert (lens["test"]["lo"] > lens["val"]["hi"]).all()


def test_time_window_does_not_change_head_counts(tmp_path):
    raw = read_taobao_log(TAOBAO_CSV, time_window=None)
    assert raw.height == 5000 and read_taobao_log(TAOBAO_CSV).height == 4999
    assert dict(raw.schema) == dict(LOG_SCHEMA)
    meta = load_meta(prepare_taobao(TAOBAO_CSV, tmp_path, time_window=None))
    assert meta.rows == {"train": 228, "val": 12, "test": 12}


def test_determinism_and_seed(taobao_events):
    a = build_ctr_samples(taobao_events, CTRProtocol(seed=3))
    b = build_ctr_samples(taobao_events, CTRProtocol(seed=3))
    c = build_ctr_samples(taobao_events, CTRProtocol(seed=4))
    for split in SPLITS:
        assert a[split].equals(b[split])
        pos_a, pos_c = (f.filter(pl.col("label") == 1) for f in (a[split], c[split]))
        assert pos_a.equals(pos_c)
    assert not a["train"].filter(pl.col("label") == 0)["item"].equals(c["train"].filter(pl.col("label") == 0)["item"])


# ---------------------------------------------------------------------------------------------- protocol


def _tiny_log() -> pl.DataFrame:
    """User 1: 8 pv (given out of order, a tie at t=30) + 1 cart; user 2: 3 pv; user 3: 6 pv."""
    rows = [
        # user, item, category, behavior, timestamp
        (1, 105, 5, "pv", 50),
        (1, 101, 1, "pv", 10),
        (1, 102, 2, "pv", 20),
        (1, 103, 3, "pv", 30),
        (1, 104, 4, "pv", 30),
        (1, 999, 9, "cart", 35),
        (1, 106, 6, "pv", 60),
        (1, 107, 7, "pv", 70),
        (1, 108, 8, "pv", 80),
        (2, 301, 30, "pv", 1),
        (2, 301, 31, "pv", 2),
        (2, 101, 1, "pv", 3),
        (3, 201, 20, "pv", 1),
        (3, 202, 20, "pv", 2),
        (3, 203, 21, "pv", 3),
        (3, 204, 21, "pv", 4),
        (3, 205, 22, "pv", 5),
        (3, 206, 22, "pv", 6),
    ]
    return pl.DataFrame(rows, schema=dict(LOG_SCHEMA), orient="row")


def _positives(frame: pl.DataFrame) -> list:
    return frame.filter(pl.col("label") == 1).select("user", "item", "hist_item", "hist_cat").rows()


def test_protocol_dare_targets_on_tiny_log():
    protocol = CTRProtocol(min_interactions=4, num_train_targets=2, train_stride=2, max_len=3, negatives=1)
    splits = build_ctr_samples(_tiny_log(), protocol)
    # user 1 sequence: 101 102 103 104 105 106 107 108 (T=8; tie 103/104 keeps log order)
    # user 3 sequence: 201..206 (T=6); user 2 (T=3) is dropped.
    assert _positives(splits["test"]) == [(1, 108, [105, 106, 107], [5, 6, 7]), (3, 206, [203, 204, 205], [21, 21, 22])]
    assert _positives(splits["val"]) == [(1, 107, [104, 105, 106], [4, 5, 6]), (3, 205, [202, 203, 204], [20, 21, 21])]
    assert _positives(splits["train"]) == [
        (1, 104, [101, 102, 103], [1, 2, 3]),  # T-4
        (1, 106, [103, 104, 105], [3, 4, 5]),  # T-2
        (3, 202, [201], [20]),  # T-4 (only one behaviour before it)
        (3, 204, [201, 202, 203], [20, 20, 21]),  # T-2
    ]
    own = {1: {101, 102, 103, 104, 105, 106, 107, 108}, 3: {201, 202, 203, 204, 205, 206}}
    last_cat = {101: 1, 301: 31, 201: 20, 202: 20, 203: 21, 204: 21, 205: 22, 206: 22}
    last_cat.update({100 + i: i for i in range(2, 9)})
    for frame in splits.values():
        assert frame["label"].to_list().count(0) == frame["label"].to_list().count(1)
        for user, item, cat, label in frame.select("user", "item", "category", "label").iter_rows():
            if label == 0:
                assert item not in own[user] and item != 999 and cat == last_cat[item]


def test_protocol_all_targets_on_tiny_log():
    protocol = CTRProtocol(min_interactions=0, targets="all", min_history=5, max_len=3, negatives=2)
    with pytest.raises(DataValidationError, match="no rows"):
        # without user 1 only user 3 (T=6) has a target, position 6 (test): train and val are empty
        build_ctr_samples(_tiny_log().filter(pl.col("user") != 1), protocol)
    splits = build_ctr_samples(_tiny_log(), protocol)
    assert _positives(splits["test"]) == [(1, 108, [105, 106, 107], [5, 6, 7]), (3, 206, [203, 204, 205], [21, 21, 22])]
    assert _positives(splits["val"]) == [(1, 107, [104, 105, 106], [4, 5, 6])]
    assert _positives(splits["train"]) == [(1, 106, [103, 104, 105], [3, 4, 5])]
    assert all(f.height == 3 * f["label"].sum() for f in splits.values())


def test_remap_ids_first_appearance():
    log = pl.DataFrame(
        {
            "user": [7, 7, 3, 7],
            "item": [50, 40, 50, 60],
            "category": [9, 8, 9, 8],
            "behavior": ["pv"] * 4,
            "timestamp": [1, 2, 3, 4],
        },
        schema=dict(LOG_SCHEMA),
    )
    out, vocab, maps = remap_ids(log)
    assert maps["item"].rows() == [(50, 1), (40, 2), (60, 3)]
    assert maps["user"].rows() == [(7, 1), (3, 2)]
    assert out["user"].to_list() == [1, 1, 2, 1]
    assert out["item"].to_list() == [1, 2, 1, 3]
    assert out["category"].to_list() == [1, 2, 1, 2]
    assert (vocab.num_users, vocab.num_items, vocab.num_categories) == (2, 3, 2)


def test_missing_column_and_empty_errors():
    with pytest.raises(DataValidationError, match="category"):
        build_ctr_samples(_tiny_log().drop("category"), CTRProtocol(min_interactions=4), source="tiny.parquet")
    with pytest.raises(DataValidationError, match="tiny.parquet"):
        build_ctr_samples(_tiny_log().drop("timestamp"), CTRProtocol(min_interactions=4), source="tiny.parquet")
    with pytest.raises(DataValidationError, match="210"):
        build_ctr_samples(_tiny_log(), CTRProtocol())


# ---------------------------------------------------------------------------------------------- cache


def _tiny_meta(fp: str) -> DatasetMeta:
    return DatasetMeta("tiny", fp, 3, 999, 31, 3, {}, {"a": 1}, [])


def test_cache_reuse_and_new_fingerprint(tmp_path, monkeypatch):
    if not TAOBAO_CSV.is_file():
        pytest.fail(f"{TAOBAO_CSV} not present: set RECSYS_SHARED_DATA to the shared data folder")
    first = prepare_taobao(TAOBAO_CSV, tmp_path)
    stamp = (first / "train.parquet").stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: the dataset was rebuilt")

    monkeypatch.setattr(taobao_mod, "build_ctr_samples", boom)
    assert prepare_taobao(TAOBAO_CSV, tmp_path) == first
    assert (first / "train.parquet").stat().st_mtime_ns == stamp
    monkeypatch.undo()
    second = prepare_taobao(TAOBAO_CSV, tmp_path, CTRProtocol(seed=1))
    assert second != first and load_meta(second).fingerprint != load_meta(first).fingerprint
    assert cached_dataset(tmp_path, "taobao", load_meta(first).fingerprint) == first


def test_fingerprint_inputs_and_params(tmp_path):
    data = tmp_path / "x.csv"
    data.write_text("1,2,3\n")
    base = fingerprint("tiny", {"b": 1, "a": [1, 2]}, [data])
    assert len(base) == 16
    assert base == fingerprint("tiny", {"a": [1, 2], "b": 1}, [data])
    assert base != fingerprint("tiny", {"a": [1, 2], "b": 2}, [data])
    assert base != fingerprint("other", {"a": [1, 2], "b": 1}, [data])
    data.write_text("1,2,4\n")
    assert base != fingerprint("tiny", {"b": 1, "a": [1, 2]}, [data])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        fingerprint("tiny", {}, [tmp_path / "missing.csv"])


def test_write_dataset_is_atomic(tmp_path, monkeypatch):
    splits = build_ctr_samples(
        _tiny_log(), CTRProtocol(min_interactions=4, num_train_targets=2, train_stride=2, max_len=3)
    )
    real_write = pl.DataFrame.write_parquet
    calls = []

    def flaky(self, file, *args, **kwargs):
        calls.append(file)
        if len(calls) == 2:
            real_write(self, file, *args, **kwargs)  # leave a partial file behind, then fail
            raise OSError("disk full")
        return real_write(self, file, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", flaky)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path, _tiny_meta("abc"), splits)
    assert list(tmp_path.iterdir()) == []
    assert cached_dataset(tmp_path, "tiny", "abc") is None
    monkeypatch.undo()
    out = write_dataset(tmp_path, _tiny_meta("abc"), splits)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-abc"]
    assert load_meta(out) == _tiny_meta("abc")
    assert _read_splits(out)["train"].equals(splits["train"])
    assert write_dataset(tmp_path, _tiny_meta("abc"), {}) == out  # existing folder is left alone


def test_load_meta_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"name": "x"}')
    with pytest.raises(DataValidationError, match="fingerprint"):
        load_meta(tmp_path)
    assert cache_mod.DatasetMeta.from_json(_tiny_meta("f").to_json()) == _tiny_meta("f")


# ---------------------------------------------------------------------------------------------- MovieLens


@pytest.mark.slow
def test_ml100k_counts(tmp_path):
    events = read_ml100k_log(ML100K)
    n_u = events.group_by("user").len()["len"].to_numpy()
    min_history = ML100K_PROTOCOL.min_history
    out = prepare_ml100k(ML100K, tmp_path)
    meta, splits = load_meta(out), _read_splits(out)
    assert (meta.num_users, meta.num_items, meta.num_categories) == (943, 1682, 19)
    assert meta.extra_columns == ["rating"]
    positives = {s: f.filter(pl.col("label") == 1) for s, f in splits.items()}
    assert sum(p.height for p in positives.values()) == int(np.maximum(0, n_u - min_history).sum()) == 95285
    eligible = int((n_u - min_history >= 2).sum())
    for split in ("val", "test"):
        assert positives[split].height == eligible == 943
        assert positives[split]["user"].n_unique() == eligible
    assert meta.rows == {"train": 3 * 93399, "val": 3 * 943, "test": 3 * 943}
    for split, frame in splits.items():
        validate_samples(frame, split, meta.vocab())
        assert frame.schema["rating"] == pl.Int8
        assert frame["category"].min() >= 1 and frame["category"].max() <= 19
        assert frame["hist_cat"].list.max().max() <= 19
        assert frame["hist_item"].list.len().max() <= 200
        assert set(positives[split]["rating"].unique()) <= {1, 2, 3, 4, 5}
        assert (frame.filter(pl.col("label") == 0)["rating"] == 0).all()


def test_ml100k_missing_files_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"u\.data.*data\.path="):
        prepare_ml100k(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    with pytest.raises(FileNotFoundError, match=r"u\.item"):
        read_ml100k_log(tmp_path)
    (tmp_path / "u.item").write_text("2|Movie|01-Jan-1995||url|" + "|".join(["0"] * 3 + ["1"] + ["0"] * 15) + "\n")
    log = read_ml100k_log(tmp_path)
    assert log.row(0) == (1, 2, 4, "rating", 4, 3)  # category = first flagged genre index 3 + 1
    (tmp_path / "u.data").write_text("1\t2\t3\n")
    with pytest.raises(DataValidationError, match=r"u\.data"):
        read_ml100k_log(tmp_path)
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    (tmp_path / "u.item").write_text("2|Movie|01-Jan-1995||url|0|1\n")
    with pytest.raises(DataValidationError, match=r"u\.item"):
        read_ml100k_log(tmp_path)


# ---------------------------------------------------------------------------------------------- Taobao errors


def test_taobao_missing_file_and_bad_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_taobao_log(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="data.path="):
        prepare_taobao(tmp_path / "nope.csv", tmp_path / "cache")
    bad = tmp_path / "four_columns.csv"
    bad.write_text("1,2,3,pv\n4,5,6,pv\n")
    with pytest.raises(DataValidationError, match="four_columns.csv"):
        read_taobao_log(bad)


# ---------------------------------------------------------------------------------------------- synthetic

SMALL = dict(num_users=40, num_items=400, num_categories=12, min_len=60, max_len=90)


def test_synthetic_log_deterministic_and_schema():
    a, b, c = generate_log(**SMALL), generate_log(**SMALL), generate_log(**SMALL, seed=1)
    assert a.equals(b) and not a.equals(c)
    assert dict(a.schema) == dict(LOG_SCHEMA)
    assert a["user"].n_unique() == 40 and a["item"].min() >= 1 and a["category"].max() <= 12
    lengths = a.group_by("user").len()["len"]
    assert lengths.min() >= 60 and lengths.max() <= 90
    assert a.group_by("item").agg(pl.col("category").n_unique())["category"].max() == 1
    increasing = a.select((pl.col("timestamp").diff().over("user").fill_null(1) > 0).all()).item()
    assert increasing and (a["behavior"] == "pv").all()


def test_prepare_synthetic_schema_and_signal(tmp_path):
    protocol = CTRProtocol(min_interactions=200, max_len=100)
    params = dict(num_users=300, num_items=2000, num_categories=30, min_len=220, max_len=260)
    out = prepare_synthetic(tmp_path, params, protocol)
    assert prepare_synthetic(tmp_path, params, protocol) == out
    meta, splits = load_meta(out), _read_splits(out)
    assert meta.rows == {"train": 300 * 57, "val": 900, "test": 900}
    for split, frame in splits.items():
        assert dict(frame.schema) == dict(SAMPLE_SCHEMA)
        validate_samples(frame, split, meta.vocab())
    test = splits["test"]
    recent = test.select(pl.col("hist_cat").list.tail(20).list.contains(pl.col("category")))
    auc = binary_auc(recent.to_series().cast(pl.Float64).to_numpy(), test["label"].to_numpy())
    assert 0.7 < auc < 0.97, auc
    with pytest.raises(ValueError, match="min_len"):
        prepare_synthetic(tmp_path, dict(min_len=100, max_len=120), CTRProtocol())


class _FakeResponse:
    """Stands in for urlopen's response (tests never use the network)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def read(self) -> bytes:
        return self.payload

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def _zip_bytes(files: dict) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"ml-100k/{name}", data)
    return buffer.getvalue()


def test_download_ml100k_checks_md5(tmp_path, monkeypatch):
    from recsys.data import movielens

    fake = _zip_bytes(
        {"u.data": b"1\t2\t3\t4\n", "u.item": b"2|x|||u|" + b"|".join([b"0"] * 19) + b"\n", "README": b"r"}
    )
    monkeypatch.setattr(movielens.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(fake))
    with pytest.raises(DataValidationError, match=r"u\.data.*md5"):
        prepare_ml100k(tmp_path / "ml", tmp_path / "cache", download=True)
    assert not (tmp_path / "ml" / "u.data").exists()
    if not (ML100K / "u.data").is_file():
        pytest.fail(f"{ML100K} not present: set RECSYS_SHARED_DATA to the shared data folder")
    real = _zip_bytes({n: (ML100K / n).read_bytes() for n in ("u.data", "u.item", "README")})
    monkeypatch.setattr(movielens.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(real))
    assert movielens.download_ml100k(tmp_path / "ok") == tmp_path / "ok"
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["README", "u.data", "u.item"]
