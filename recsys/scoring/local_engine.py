"""``engine=local``: every file in this process, one after the other, the next batches read ahead in a thread."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from recsys.bundle import load_bundle
from recsys.scoring.ctr_scorer import ScoreStats
from recsys.scoring.job import EngineResult, Plan, loaded_identity, make_scorer, score_file
from recsys.scoring.reader import count_rows, log_schema
from recsys.system import peak_rss_mb


def score_locally(job: Plan, bundle_path: Path, identity: dict[str, Any], cfg) -> EngineResult:
    """Score ``job.todo`` here. Unreadable files or missing columns stop the job before any output."""
    device = str(cfg.get("device", "cpu"))
    bundle = load_bundle(bundle_path)
    identity = loaded_identity(identity, bundle)
    scorer = make_scorer(bundle, cfg, device)
    todo = job.todo
    for file, _ in todo:  # fail fast, before any output, on unreadable files or missing columns
        log_schema(file, scorer.required_columns)
    total = sum(count_rows(f) for f, _ in todo)
    stats, start = ScoreStats(), time.perf_counter()
    with tqdm(total=total, unit="rows", unit_scale=True, disable=not cfg.progress, desc="scoring") as bar:
        for file, target in todo:
            stats.add(
                score_file(
                    scorer,
                    file,
                    target,
                    job.rejects(target),
                    int(cfg.batch_size),
                    identity,
                    bar.update,
                    int(cfg.get("prefetch", 1)) if cfg.get("read_ahead", True) else 0,
                )
            )
    seconds = time.perf_counter() - start
    facts = {
        "engine": "local",
        "workers": 1,
        "device": device,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
    }
    return EngineResult(stats, len(todo), [], facts)
