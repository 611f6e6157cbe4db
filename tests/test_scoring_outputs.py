"""Outputs that never mix: overlap, model identity, one job per folder, whole-folder summary, unwritable
outputs, ids beyond Int64, settings checked up front."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines.score import run
from recsys.errors import ConfigError, UserError
from recsys.scoring.job import OutputError, OutputLock, glob_matches
from recsys.scoring.reader import out_of_range_rows
from recsys.scoring.writer import AtomicParquetWriter
from tests.test_scoring import _one_log, _write_many, make_bundle, score_cfg


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory)


def _outputs(folder: Path) -> dict[str, pl.DataFrame]:
    return {p.name: pl.read_parquet(p) for p in sorted(folder.glob("part-*.parquet"))}


@pytest.mark.parametrize("keep", [[], ["not_in_the_logs"]])
def test_no_pass_through_column_still_scores_every_row(bundle_dir, tmp_path, keep):
    """keep_columns empty (or naming no input column): the output holds the scores alone, one row per input row
    (a polars frame without columns has no rows, so the scores may not be hung on the pass-through frame)."""
    run(score_cfg(bundle_dir, tmp_path / "all"))
    run(score_cfg(bundle_dir, tmp_path / "none", keep_columns=keep))
    full, bare = _outputs(tmp_path / "all"), _outputs(tmp_path / "none")
    assert sorted(full) == sorted(bare) and all(bare[n].columns == ["score_click"] for n in bare)
    for name in full:
        assert bare[name]["score_click"].to_list() == full[name]["score_click"].to_list()


# ------------------------------------------------------------------------------------------------ overlap


def test_output_inside_the_input_folder_is_refused(bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    _write_many(bundle_dir, inputs, copies=2)
    with pytest.raises(ConfigError, match="overlaps input"):
        run(score_cfg(bundle_dir, inputs / "scores", inputs=inputs))
    with pytest.raises(ConfigError, match="overlaps input"):  # input inside the output
        run(score_cfg(bundle_dir, tmp_path, inputs=inputs))
    assert not (inputs / "scores").exists()


def test_glob_that_would_match_the_outputs_is_refused(bundle_dir, tmp_path):
    _write_many(bundle_dir, tmp_path / "day1", copies=2)
    with pytest.raises(ConfigError, match="would also match the outputs"):
        run(score_cfg(bundle_dir, tmp_path / "scores", inputs=f"{tmp_path}/**/*.parquet"))
    # a glob one level deep does not reach scores/day1/part-*.parquet: allowed
    run(score_cfg(bundle_dir, tmp_path / "scores", inputs=f"{tmp_path}/day*/*.parquet"))
    assert sorted(p.name for p in (tmp_path / "scores" / "day1").glob("*.parquet")) == [
        "part-0000.parquet",
        "part-0001.parquet",
    ]


def test_glob_matching_follows_glob_semantics(tmp_path):
    assert glob_matches(f"{tmp_path}/*.parquet", tmp_path / "a.parquet")
    assert not glob_matches(f"{tmp_path}/*.parquet", tmp_path / "out" / "a.parquet")  # * stops at /
    assert glob_matches(f"{tmp_path}/**/*.parquet", tmp_path / "out" / "x" / "a.parquet")
    assert glob_matches(f"{tmp_path}/**/*.parquet", tmp_path / "a.parquet")


# ------------------------------------------------------------------------------------------------ identity


def _renamed_bundle(bundle_dir: Path, tmp_path: Path, name: str) -> Path:
    """The same weights under another run name and id (another model, as far as the folder can tell)."""
    other = tmp_path / name
    shutil.copytree(bundle_dir / "model", other)
    identity = json.loads((other / "bundle.json").read_text())
    (other / "bundle.json").write_text(json.dumps({**identity, "run_name": name, "run_id": f"id-{name}"}))
    return other


def test_another_model_into_the_same_output_stops_naming_both(bundle_dir, tmp_path):
    out = tmp_path / "out"
    run(score_cfg(bundle_dir, out))
    (out / "part-0001.parquet").unlink()  # an unfinished job: a resume would score only this file
    other = _renamed_bundle(bundle_dir, tmp_path, "other-model")
    with pytest.raises(OutputError, match=r"holds the scores of model tiny-dare .* this job uses model other-model"):
        run(score_cfg(bundle_dir, out, model=str(other)))
    assert not (out / "part-0001.parquet").exists()  # nothing written

    run(score_cfg(bundle_dir, out, model=str(other), overwrite=True))  # explicit: start over
    for path in sorted(out.glob("part-*.parquet")):
        assert pq.read_metadata(path).metadata[b"recsys.model"] == b"other-model", path.name
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["model"] == "other-model" and summary["last_run"]["files_scored"] == 3


def test_other_settings_stop_a_resume(bundle_dir, tmp_path):
    out = tmp_path / "out"
    run(score_cfg(bundle_dir, out))
    with pytest.raises(OutputError, match=r"other settings \(unseen='map' -> 'reject'\)"):
        run(score_cfg(bundle_dir, out, unseen="reject"))
    run(score_cfg(bundle_dir, out, batch_size=7))  # batch size does not change what is scored: resumes


def test_outputs_without_a_manifest_are_checked_by_their_footer(bundle_dir, tmp_path):
    out = tmp_path / "out"
    run(score_cfg(bundle_dir, out))
    (out / "_job.json").unlink()  # as written by an older version
    with pytest.raises(OutputError, match="holds the scores of model unknown"):
        run(score_cfg(bundle_dir, out, model=str(_renamed_bundle(bundle_dir, tmp_path, "b"))))


# ------------------------------------------------------------------------------------------------ lock


def test_second_job_on_a_locked_output_stops(bundle_dir, tmp_path):
    out = tmp_path / "out"
    with OutputLock(out):
        (out / ".part-0000.parquet.tmp").write_bytes(b"a live job's temp file")
        with pytest.raises(OutputError, match="another scoring job .* holds its lock"):
            run(score_cfg(bundle_dir, out))
        assert (out / ".part-0000.parquet.tmp").exists()  # the holder's temp file survives
    run(score_cfg(bundle_dir, out))  # released: the next job runs and clears the dead temp file
    assert not list(out.rglob("*.tmp")) and len(_outputs(out)) == 3


# ------------------------------------------------------------------------------------------------ summary


def test_summary_describes_the_whole_output_after_a_resume(bundle_dir, tmp_path):
    inputs = tmp_path / "in"
    frame = _one_log(bundle_dir)
    inputs.mkdir()
    for i in range(3):  # a null item in each file: rejects counted per file
        null_item = pl.when(pl.int_range(pl.len()) == i).then(None).otherwise(pl.col("item")).alias("item")
        frame.with_columns(null_item).write_parquet(inputs / f"part-{i}.parquet")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    run(score_cfg(bundle_dir, clean, inputs=inputs, unseen="reject"))
    run(score_cfg(bundle_dir, resumed, inputs=inputs, unseen="reject"))
    (resumed / "part-1.parquet").unlink()
    (resumed / "part-2.parquet").unlink()
    run(score_cfg(bundle_dir, resumed, inputs=inputs, unseen="reject"))
    full, last = (json.loads((d / "_summary.json").read_text()) for d in (clean, resumed))
    counts = ("files", "files_done", "rows_in", "rows_scored", "rows_rejected", "unseen_ids_mapped")
    assert {k: full[k] for k in counts} == {k: last[k] for k in counts}
    assert last["rows_in"] == 3 * frame.height and last["rows_rejected"] == {"null": 3}
    assert last["last_run"]["files_scored"] == 2
    assert last["last_run"]["rows_in"] == 2 * frame.height


# ------------------------------------------------------------------------------------------------ unwritable


def test_output_path_that_is_a_file_is_one_line(bundle_dir, tmp_path):
    target = tmp_path / "scores"
    target.write_text("not a folder")
    with pytest.raises(OutputError, match=r"output=.*scores is a file: give a folder"):
        run(score_cfg(bundle_dir, target))


def test_unwritable_output_is_one_line(bundle_dir, tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as a read-only mount does (root ignores chmod here)
    with pytest.raises(OutputError, match=r"output=.*: cannot create the folder .*Permission denied"):
        run(score_cfg(bundle_dir, tmp_path / "ro" / "out"))


def test_full_disk_keeps_finished_files_and_is_one_line(bundle_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original, calls = AtomicParquetWriter.write, {"n": 0}

    def write(self, frame):
        calls["n"] += 1
        if "part-0002" in self.path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, frame)

    monkeypatch.setattr(AtomicParquetWriter, "write", write)
    with pytest.raises(OutputError, match=r"cannot write the scores of part-0002\.parquet \(no space left"):
        run(score_cfg(bundle_dir, out))
    assert sorted(_outputs(out)) == ["part-0000.parquet", "part-0001.parquet"]  # finished ones kept, no partial
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(AtomicParquetWriter, "write", original)
    run(score_cfg(bundle_dir, out))  # space freed: the rerun finishes the job
    assert len(_outputs(out)) == 3


def test_user_errors_are_user_errors():
    assert issubclass(OutputError, UserError)


# ------------------------------------------------------------------------------------------------ ids, settings


def test_ids_beyond_int64_are_rejected_not_a_traceback(bundle_dir, tmp_path):
    frame = _one_log(bundle_dir).head(12)
    signed = tmp_path / "signed.parquet"
    frame.write_parquet(signed)
    big = (1 << 64) - 1
    unsigned = frame.with_columns(
        pl.col("item").cast(pl.UInt64),
        pl.col("category").cast(pl.UInt64),
        pl.col("hist_item").cast(pl.List(pl.UInt64)),
        pl.col("hist_cat").cast(pl.List(pl.UInt64)),
    ).with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(big, pl.UInt64)).otherwise(pl.col("item")).alias("item"),
        pl.when(pl.int_range(pl.len()) == 1)
        .then(pl.col("hist_item").list.concat(pl.lit([big], pl.List(pl.UInt64))))
        .otherwise(pl.col("hist_item"))
        .alias("hist_item"),
    )
    uns = tmp_path / "uns" / "signed.parquet"
    uns.parent.mkdir()
    unsigned.write_parquet(uns)
    run(score_cfg(bundle_dir, tmp_path / "a", inputs=signed))
    stats = run(score_cfg(bundle_dir, tmp_path / "b", inputs=uns))
    assert stats.rows_rejected == {"id_out_of_range": 2} and stats.rows_scored == 10
    rejects = pl.read_parquet(tmp_path / "b" / "_rejected" / "signed.parquet")
    assert rejects["reason"].to_list() == ["id_out_of_range"] * 2 and rejects["item"][0] == big
    expected = pl.read_parquet(tmp_path / "a" / "signed.parquet").slice(2)
    got = pl.read_parquet(tmp_path / "b" / "signed.parquet")
    np.testing.assert_allclose(got["score_click"].to_numpy(), expected["score_click"].to_numpy(), atol=1e-6)


def test_out_of_range_rows_in_a_list_column():
    frame = pl.DataFrame({"history": [[1, 2], [3, (1 << 63)], None, []]}, schema={"history": pl.List(pl.UInt64)})
    assert out_of_range_rows(frame, ["history"]).tolist() == [False, True, False, False]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threads", -1, r"threads=-1: must be an integer >= 1 or null"),
        ("threads", "abc", r"threads='abc': must be an integer >= 1 or null"),
        ("batch_size", 0, r"batch_size=0: must be an integer >= 1"),
        ("batch_size", 1.5, r"batch_size=1.5: must be an integer >= 1"),
        ("prefetch", -1, r"prefetch=-1: must be an integer >= 0"),
        ("engine", "spark", r"engine='spark': choose local or ray"),
        ("device", "tpu", r"device='tpu': choose cpu, cuda or cuda:<index>"),
        ("overwrite", "yes", r"overwrite='yes': must be true or false"),
    ],
)
def test_bad_settings_are_one_line_before_any_output(bundle_dir, tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        run(score_cfg(bundle_dir, tmp_path / "out", **{key: value}))
    assert not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_one_line(bundle_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="device=cuda: no CUDA device is visible"):
        run(score_cfg(bundle_dir, tmp_path / "out", device="cuda"))
    assert not (tmp_path / "out").exists()


def test_sequential_history_beyond_int64_is_rejected():
    import types

    import torch

    from recsys.bundle import IdMapper
    from recsys.scoring.seq_scorer import SeqScorer

    model = torch.nn.Linear(1, 1)
    model.num_items = 50
    bundle = types.SimpleNamespace(
        model=model, mappers={"item": IdMapper(None, None, 50)}, meta=types.SimpleNamespace(max_len=10)
    )
    frame = pl.DataFrame(
        {"user": [1, 2, 3], "history": [[1, 2], [3, 1 << 63], None]},
        schema={"user": pl.Int64, "history": pl.List(pl.UInt64)},
    )
    prepared = SeqScorer(bundle, top_n=3).prepare(frame)
    assert prepared.kept["user"].to_list() == [1]
    assert prepared.rejected["reason"].to_list() == ["id_out_of_range", "null"]


# ------------------------------------------------------------------------------------------------ device


def test_prefetch_depth_does_not_change_the_output(bundle_dir, tmp_path):
    """Batches read ahead in a thread (any depth, or none) give byte-identical files."""
    for depth in (0, 3):
        run(score_cfg(bundle_dir, tmp_path / f"d{depth}", prefetch=depth))
    for name in ("part-0000.parquet", "part-0001.parquet", "part-0002.parquet"):
        assert (tmp_path / "d0" / name).read_bytes() == (tmp_path / "d3" / name).read_bytes(), name


@pytest.mark.gpu
def test_cuda_scores_equal_cpu(bundle_dir, tmp_path):
    """device=cuda: pinned batches, non-blocking copies, same rows and scores as the CPU within float tolerance."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    run(score_cfg(bundle_dir, tmp_path / "cpu"))
    run(score_cfg(bundle_dir, tmp_path / "cuda", device="cuda", prefetch=2))
    cpu, cuda = _outputs(tmp_path / "cpu"), _outputs(tmp_path / "cuda")
    assert sorted(cpu) == sorted(cuda)
    for name in cpu:
        assert cpu[name].drop("score_click").equals(cuda[name].drop("score_click")), name
        np.testing.assert_allclose(cuda[name]["score_click"], cpu[name]["score_click"], rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "cuda" / "_summary.json").read_text())
    assert summary["last_run"]["device"] == "cuda"


# ------------------------------------------------------------------------------------------------ without Ray

BLOCKED = """
import sys
sys.modules["ray"] = None  # any `import ray` now raises ImportError, as if Ray were not installed
from omegaconf import OmegaConf
from pipelines.score import run
from recsys.errors import ConfigError
cfg = OmegaConf.create(json.loads(sys.argv[1]))
stats = run(cfg)
assert stats.rows_scored > 0
try:
    run(OmegaConf.merge(cfg, {"output": cfg.output + "_ray", "engine": "ray"}))
except ConfigError as err:
    print("RAY:", err)
"""


@pytest.mark.e2e
def test_local_engine_runs_with_ray_not_installed(bundle_dir, tmp_path):
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from tests.conftest import REPO

    cfg = json.dumps(OmegaConf.to_container(score_cfg(bundle_dir, tmp_path / "out")))
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + BLOCKED, cfg], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RAY: engine=ray needs Ray, which is not installed here: pip install -e '.[ray]'" in done.stdout
    assert len(_outputs(tmp_path / "out")) == 3
