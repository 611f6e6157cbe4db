"""Batch scoring of parquet logs with a trained model (bounded memory, atomic, resumable).

    python -m pipelines.score input='data/logs/*.parquet' model=logs/train/runs/<run> output=data/scores

One output file per input file, written under a temporary name and renamed when complete, with the
model's identity in the parquet footer. A rerun skips finished outputs, so a killed job resumes by
running the same command again.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP, so before importing it): on a
# shared machine, or beside the read-ahead thread, spinning workers starve the thread with the work
# (measured on 2 busy cores: 2k rows/s at threads=2 with spinning, 35k passive). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import glob
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from recsys.bundle import load_bundle, resolve_bundle
from recsys.config_schema import validate_score
from recsys.data.schema import DataValidationError
from recsys.io import write_json_atomic
from recsys.scoring.ctr_scorer import CTRScorer, ScoreStats
from recsys.scoring.reader import count_rows, iter_batches, log_schema, run_ahead
from recsys.scoring.seq_scorer import SeqScorer
from recsys.scoring.writer import AtomicParquetWriter
from recsys.system import peak_rss_mb

log = logging.getLogger("pipelines.score")


def input_files(spec: str) -> list[Path]:
    """A file, a folder (all ``*.parquet`` below it) or a glob; sorted; at least one file."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True))
    if not files:
        raise FileNotFoundError(f"input={spec}: no parquet files found")
    return files


def input_root(spec: str) -> Path:
    """The folder outputs are laid out relative to: the folder given, a file's parent, or a glob's fixed prefix."""
    path = Path(spec)
    if path.is_dir():
        return path
    if path.exists():
        return path.parent
    prefix = spec[: min((spec.find(c) for c in "*?[" if c in spec), default=len(spec))]
    return Path(prefix) if prefix.endswith("/") else Path(prefix).parent


def score_file(
    scorer: CTRScorer,
    file: Path,
    target: Path,
    rejects: Path,
    batch_size: int,
    identity: dict,
    bar: tqdm,
    read_ahead: bool = True,
) -> ScoreStats:
    """Score one file into ``target`` (and its rejects) atomically; with ``read_ahead`` the next batch is read
    and mapped in a background thread while the model scores the current one."""
    schema = log_schema(file, scorer.required_columns)
    columns = list(dict.fromkeys([*scorer.required_columns, *[c for c in scorer.keep_columns if c in schema]]))
    stats = ScoreStats()
    meta = {
        "recsys.model": identity.get("run_name", ""),
        "recsys.run_id": str(identity.get("run_id", "")),
        "recsys.weights_sha256": identity.get("weights_sha256", ""),
        "recsys.input": file.name,
    }
    with AtomicParquetWriter(target, meta) as out, AtomicParquetWriter(rejects, meta) as bad:
        frames = iter_batches(file, columns, batch_size)
        for prepared in run_ahead(frames, scorer.prepare) if read_ahead else map(scorer.prepare, frames):
            scored, rejected, batch_stats = scorer.finish(prepared)
            out.write(scored) if scored.height else None
            bad.write(rejected) if rejected.height else None
            stats.add(batch_stats)
            bar.update(batch_stats.rows_in)
        if bad.rows:
            bad.commit()
        else:
            bad.abort()
        out.commit(scorer.output_schema(dict(schema)))
    return stats


def make_scorer(bundle, cfg: DictConfig):
    """:class:`CTRScorer` for CTR / multi-task bundles, :class:`SeqScorer` (top-N items) for sequential ones."""
    if bundle.tasks:
        return CTRScorer(bundle, unseen=cfg.unseen, keep_columns=list(cfg.keep_columns))
    return SeqScorer(bundle, top_n=int(cfg.top_n), unseen=cfg.unseen, keep_columns=list(cfg.keep_columns))


def run(cfg: DictConfig) -> ScoreStats:
    validate_score({k: cfg[k] for k in ("threads", "batch_size", "top_n") if k in cfg})  # before any file is read
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    output = Path(cfg.output)
    files = input_files(str(cfg.input))
    bundle = load_bundle(resolve_bundle(str(cfg.model), output / "_model"))
    scorer = make_scorer(bundle, cfg)
    root = input_root(str(cfg.input)).resolve()
    targets = [output / f.resolve().relative_to(root) for f in files]
    for stale in output.rglob(".*.tmp") if output.exists() else []:  # left by a killed run
        stale.unlink()
    todo = [(f, t) for f, t in zip(files, targets) if not t.exists()]
    log.info(
        "%d input files, %d already scored, model %s",
        len(files),
        len(files) - len(todo),
        bundle.identity.get("run_name"),
    )
    for file, _ in todo:  # fail fast, before any output, on unreadable files or missing columns
        log_schema(file, scorer.required_columns)
    total = sum(count_rows(f) for f, _ in todo)
    stats, start = ScoreStats(), time.perf_counter()
    with tqdm(total=total, unit="rows", unit_scale=True, disable=not cfg.progress, desc="scoring") as bar:
        for file, target in todo:
            rejects = output / "_rejected" / target.relative_to(output)
            stats.add(
                score_file(
                    scorer,
                    file,
                    target,
                    rejects,
                    int(cfg.batch_size),
                    bundle.identity,
                    bar,
                    bool(cfg.get("read_ahead", True)),
                )
            )
    seconds = time.perf_counter() - start
    summary = {
        "files": len(files),
        "files_scored": len(todo),
        "rows_in": stats.rows_in,
        "rows_scored": stats.rows_scored,
        "rows_rejected": dict(stats.rows_rejected),
        "unseen_ids_mapped": stats.unseen_ids_mapped,
        "seconds": round(seconds, 3),
        "rows_per_s": round(stats.rows_in / seconds, 1) if seconds > 0 else None,
        "model": bundle.identity.get("run_name"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
    }
    write_json_atomic(output / "_summary.json", summary)
    print("scoring summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return stats


@hydra.main(version_base="1.3", config_path="../configs", config_name="score")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (DataValidationError, FileNotFoundError, ValueError) as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
