"""Batch scoring of parquet logs with a trained model (bounded memory, atomic, resumable).

    python -m pipelines.score input='data/logs/*.parquet' model=logs/train/runs/<run> output=data/scores

One output file per input file, written under a temporary name and renamed when complete, with the
model's identity and the file's counts in the parquet footer. A rerun skips finished outputs, so a killed
job resumes by running the same command again; it resumes only with the same model and settings
(``overwrite=true`` starts over), and one job at a time holds the output folder. ``engine=ray`` runs the
same job on Ray workers (``recsys/scoring/ray_engine.py``); ``device=cuda`` scores on the GPU.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP, so before importing it): on a
# shared machine, or beside the read-ahead thread, spinning workers starve the thread with the work
# (measured on 2 busy cores: 2k rows/s at threads=2 with spinning, 35k passive). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipelines._cli import entry_point
from recsys.bundle import resolve_bundle
from recsys.data.schema import DataValidationError
from recsys.scoring.ctr_scorer import ScoreStats
from recsys.scoring.job import (
    OutputLock,
    check_device,
    check_identity,
    check_settings,
    plan,
    read_identity,
    remove_stale_temps,
    summarise,
)

log = logging.getLogger("pipelines.score")


def run(cfg: DictConfig) -> ScoreStats:
    """Score the input into ``cfg.output`` with ``cfg.engine``; returns this invocation's counts.

    Files that fail in a Ray worker do not stop the others: the summary lists them and the job then raises
    :class:`DataValidationError` naming them (exit code 2).
    """
    cfg = check_settings(cfg)
    if cfg.engine == "local":
        check_device(str(cfg.device))  # Ray workers check theirs
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    output = Path(cfg.output)
    job = plan(str(cfg.input), output)
    with OutputLock(output):
        remove_stale_temps(output)
        bundle_path = resolve_bundle(str(cfg.model), output / "_model")
        identity = read_identity(bundle_path, cfg)
        check_identity(output, identity, bool(cfg.get("overwrite", False)))
        log.info(
            "%d input files, %d already scored, model %s",
            len(job.files),
            len(job.files) - len(job.todo),
            identity["model"],
        )
        if cfg.get("engine", "local") == "ray":
            from recsys.scoring.ray_engine import score_with_ray  # Ray is optional: imported only here

            result = score_with_ray(job, bundle_path, identity, cfg)
        else:
            from recsys.scoring.local_engine import score_locally

            result = score_locally(job, bundle_path, identity, cfg)
        seconds = result.facts["seconds"]
        last_run = {
            "files_scored": result.files_scored,
            **result.stats.to_dict(),
            "rows_per_s": round(result.stats.rows_in / seconds, 1) if seconds > 0 else None,
            **result.facts,
        }
        summary = summarise(job, identity, last_run, result.failed)
    print("scoring summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if result.failed:
        raise DataValidationError(
            f"{len(result.failed)} of {len(job.files)} files failed (the others are scored; rerun after fixing "
            f"them): " + "; ".join(result.failed)
        )
    return result.stats


@entry_point("score")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
