"""The README's commands, run the way a user types them: in a fresh copy of the repository (cwd), with the venv
on PATH as after ``source .venv/bin/activate`` and ``.venv/`` present, no tracking URI or path set, and no
override the README does not print.

Every shell command of the README must appear in ``PLAN`` (so the README and this test cannot drift apart),
either to be run or with the reason it is not run here:

- ``make train`` / ``make test`` / ``make unit`` create a venv (pip downloads for minutes) and rerun the suite;
  ``make train``'s command, ``python -m pipelines.train recsys=dare``, is run below as printed.
- ``mlflow ui`` is a server that runs until stopped (tests/test_tracking.py starts a real server).
- commands with ``<...>`` need a value the user fills in (a path to their data, a run id).
- the resume block needs a run killed half-way (tests/test_fault_tolerance.py kills and resumes one).
- ``torchrun`` runs are covered by tests/test_distributed.py (2 ranks, against a single-process reference);
  ``data=beauty`` needs the Beauty file.
- ``data.source.download=true`` fetches from the internet, which CI does not have.
- the other plain training examples (``recsys=twin``, ``trainer.max_epochs=3``) are the default run with
  another backbone or more epochs: each costs minutes of CPU and adds nothing the run below does not check.

The runs are bounded as printed: the default run is 2 epochs on the synthetic data, the sweep 1 epoch each.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RUN = "run"
PLAN = {
    "make train": "creates a venv (minutes of downloads); its command is run as printed",
    "make test": "runs the whole suite, this test included",
    "mlflow ui --backend-store-uri sqlite:///logs/mlflow.db --host 127.0.0.1": "a server: tests/test_tracking.py",
    "python -m pipelines.train recsys=twin": "the default run with another backbone: minutes, nothing new",
    "python -m pipelines.train recsys=dare recsys.attention_dim=8 trainer.max_epochs=3": "3 epochs: minutes",
    "python -m pipelines.train recsys=din data=ml100k data.path=.cache/ml-100k data.source.download=true": (
        "downloads ml-100k (no internet in CI)"
    ),
    "python -m pipelines.train recsys=dare data=taobao data.path=<UserBehavior.csv> trainer=gpu": "<...> + CUDA",
    "python -m pipelines.train recsys=dare": RUN,  # = make train
    "RUN=$(ls -td logs/train/runs/*_dare | head -1)": RUN,
    "python -m pipelines.prepare data=synthetic export.split=test export.dir=logs/example_logs": RUN,
    "python -m pipelines.score input=logs/example_logs model=$RUN output=logs/example_scores": RUN,
    "python -m pipelines.score input=<user,history parquet> model=<mqsa_ted run> output=<dir> top_n=10 "
    "keep_columns=[user]": "<...>",
    "python -m pipelines.score input=logs/example_logs model=$RUN output=logs/ray_scores engine=ray ray.workers=2": (
        "engine=ray on a local Ray instance: tests/test_scoring_ray.py"
    ),
    "ray start --head --port=6379": "starts a Ray cluster node (a server); tests/test_scoring_ray.py joins one",
    "ray start --address=<head ip>:6379": "<...>",
    "python -m pipelines.score input=/shared/logs model=/shared/runs/<run> output=/shared/scores engine=ray "
    "ray.address=auto": "<...>",
    "python -m pipelines.train -m recsys=din,dare trainer.max_epochs=1": RUN,
    "python -m pipelines.train -m hydra/sweeper=optuna hparams_search=dare hydra.sweeper.n_trials=20": (
        "20 trials of 2 epochs: an hour of CPU; tests/test_optuna_sweep.py runs a 2-trial search"
    ),
    "python -m pipelines.train -m hparams_search=sasrec data=sports test_after_fit=false": (
        "needs the Sports file; tests/test_optuna_sweep.py runs a 2-trial search"
    ),
    "python -m pipelines.train -m hparams_search=mqsa_ted data=sports trainer=gpu test_after_fit=false "
    "hydra/launcher=processes hydra.launcher.n_jobs=8": (
        "needs the Sports file and CUDA; tests/test_process_launcher.py runs 2 trials at once"
    ),
    "python -m pipelines.compare experiment=synthetic metric=test/auc": RUN,
    "python -m pipelines.train recsys=dare resume=auto": "needs a killed run: tests/test_fault_tolerance.py",
    "python -m pipelines.train recsys=dare resume=<mlflow run id>": "<...>",
    "torchrun --nproc_per_node 2 -m pipelines.train recsys=dare trainer=dmp": "tests/test_distributed.py",
    "python -m pipelines.train recsys=mqsa_ted data=beauty trainer=gpu objective.cuda_graph=true": (
        "needs the Beauty file and CUDA; benchmarks/device/seqrec14.sh runs it, tests/test_seq_fixed_shape.py the step"
    ),
    "torchrun --nproc_per_node 2 -m pipelines.train recsys=sasrec data=beauty trainer=dmp "
    "trainer.sharding.item=row_wise": "needs the Beauty file; tests/test_distributed.py",
}
# the order a user follows: train (make train), score its run, sweep, compare
ORDER = [
    "python -m pipelines.train recsys=dare",
    "RUN=$(ls -td logs/train/runs/*_dare | head -1)",
    "python -m pipelines.prepare data=synthetic export.split=test export.dir=logs/example_logs",
    "python -m pipelines.score input=logs/example_logs model=$RUN output=logs/example_scores",
    "python -m pipelines.train -m recsys=din,dare trainer.max_epochs=1",
    "python -m pipelines.compare experiment=synthetic metric=test/auc",
]


def readme_commands() -> list[str]:
    """Every command of the README's ``bash`` blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def test_every_readme_command_is_planned():
    commands = readme_commands()
    assert set(commands) == set(PLAN), {"not planned": set(commands) - set(PLAN), "gone": set(PLAN) - set(commands)}
    assert [c for c in ORDER if PLAN[c] == RUN] == ORDER and {c for c, v in PLAN.items() if v == RUN} == set(ORDER)
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and "make unit" in readme
    assert "../shared/data/" not in readme.replace("`../shared/data` beside", "")


@pytest.mark.e2e
@pytest.mark.slow
def test_readme_commands_run_as_printed(tmp_path):
    clone = tmp_path / "recsys-mtl"
    ignore = shutil.ignore_patterns(".git", ".venv", "logs", ".cache", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(REPO, clone, ignore=ignore)
    venv = Path(sys.prefix)
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RECSYS_ROOT", "PYTHONPATH"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(venv), PYTHONUNBUFFERED="1")
    script = "set -euo pipefail\n" + "\n".join(ORDER) + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    logs = clone / "logs"
    assert (logs / "mlflow.db").exists() and list((logs / "train" / "runs").glob("*_dare/model/bundle.json"))
    assert (logs / "example_scores" / "_summary.json").exists() and list((logs / "example_scores").glob("*.parquet"))
    assert len(list((logs / "train" / "multiruns").glob("*/*/metrics.json"))) == 2  # din and dare
    table = (logs / "compare" / "synthetic_test_auc.md").read_text()
    assert "| din" in table and "| dare" in table
