"""The step profiler writes its summary for exactly the steps it was asked for (CPU; the CUDA columns run on the
GPU machine through benchmarks/gpu_pipeline.py)."""

from __future__ import annotations

from recsys.tracking.step_profile import StepProfile
from tests.helpers import fit_tiny_ranking


def test_step_profile_summarises_the_requested_steps(tmp_path):
    profiler = StepProfile(start_step=3, steps=2, output_dir=str(tmp_path / "run"))
    fit_tiny_ranking(tmp_path, [profiler])
    text = (tmp_path / "run" / "step_profile.txt").read_text()
    assert text.startswith("steps profiled: 2\n")
    assert "wall per step:" in text and "host operator calls per step:" in text
    operators, spans = text.split("host spans by wall time")
    ranked = [line for line in operators.splitlines() if " ms/step " in line]
    assert 0 < len(ranked) <= 20
    # the top rows are the model's own operators, with a share each and shares in descending order
    shares = [float(line.split("%")[0]) for line in ranked]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01
    # the loader's next batch is a named host range, with its share of the wall time
    loader = [line for line in spans.splitlines() if "enumerate(DataLoader)" in line]
    assert len(loader) == 1 and 0 < float(loader[0].split("%")[0]) < 100
    assert profiler.report == text
