"""benchmarks/gpu_pipeline.py's markdown table: one row per case and per set of ``--extra`` overrides, so an A/B run
(e.g. ``data.resident=false``) does not stand in for the case's latest plain line."""

from __future__ import annotations

from benchmarks.gpu_pipeline import variant, write_markdown


def _line(case: str, command: str, samples: float, commit: str) -> dict:
    return {
        "case": case, "entry": "pipelines.train", "model": "dare", "dataset": "scale", "device": "cuda",
        "status": "ok", "seconds": 50.0, "samples_per_s": samples, "sec_per_epoch": 1.0, "peak_gpu_mb": 100.0,
        "torch": "2.11", "torchrec": "1.6.1", "fbgemm": "cpu", "commit": commit, "command": command,
    }  # fmt: skip


def test_each_override_set_is_its_own_row(tmp_path):
    base = "python -m pipelines.train +benchmark=dare_scale trainer=gpu hydra.run.dir=/tmp/run"
    lines = [
        _line("dare_scale", base, 500_000.0, "aaa"),
        _line("dare_scale", base, 800_000.0, "bbb"),
        _line("dare_scale", f"{base} objective.dense_optimizer.fused=false", 700_000.0, "bbb"),
        _line("resume_after_kill", f"{base} ; kill -9 ; same + resume=auto", 3_000.0, "ccc"),
    ]
    assert [variant(line) for line in lines] == [
        "dare_scale", "dare_scale", "dare_scale objective.dense_optimizer.fused=false", "resume_after_kill",
    ]  # fmt: skip
    out = tmp_path / "table.md"
    write_markdown(lines, [], out)
    rows = [r for r in out.read_text().splitlines() if r.startswith("| dare_scale") or r.startswith("| resume")]
    assert len(rows) == 3
    assert rows[0].startswith("| dare_scale |") and "800,000" in rows[0] and "500,000" not in out.read_text()
    assert rows[1].startswith("| dare_scale objective.dense_optimizer.fused=false |") and "700,000" in rows[1]
    assert rows[2].startswith("| resume_after_kill |")
