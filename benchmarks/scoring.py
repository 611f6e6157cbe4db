"""Batch-scoring throughput against its two lower bounds (issue 3's benchmark; run by hand).

    .venv/bin/python -m benchmarks.scoring --model logs/train/runs/<dare run> [--model <dare x mmoe run>] \
        --rows 1000000 10000000 --threads 2

For each model bundle and size: generate Taobao-schema logs (history length 200, ids drawn from the
bundle's id maps, 10 files, row groups of 50k) under logs/benchmarks/scoring/, then measure in one run
  * the scoring job end to end (`python -m pipelines.score`, a subprocess: rows/s and peak RSS),
  * read-only: the job's reader over the same files and columns (rows/s),
  * forward-only: the model's forward on in-memory tensors of the same batch size (rows/s).
JSON lines go to benchmarks/results/scoring.jsonl (model, rows, rows_per_s, peak_rss_mb,
read_only_rows_per_s, forward_only_rows_per_s, threads) and a table to benchmarks/results/scoring.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.bundle import load_bundle, resolve_bundle
from recsys.data.batch import CTRBatch, make_ctr_kjt
from recsys.scoring.reader import SCORING_COLUMNS, iter_batches

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def generate_logs(bundle_dir: Path, folder: Path, rows: int, seq: int = 200, files: int = 10, seed: int = 0) -> None:
    """Taobao-schema logs (raw ids of the bundle's vocabulary); skipped when already complete."""
    done = folder / "_COMPLETE"
    if done.exists():
        return
    bundle = load_bundle(bundle_dir)
    vocab = bundle.meta.vocab()
    rng = np.random.default_rng(seed)

    def raw(column: str, size: int, limit: int) -> np.ndarray:
        rows_ = rng.integers(1, limit + 1, size)
        mapper = bundle.mappers[column]
        if mapper.raw is None:
            return rows_
        lookup = np.empty(limit + 1, dtype=np.int64)
        lookup[mapper.rows] = mapper.raw
        return lookup[rows_]

    folder.mkdir(parents=True, exist_ok=True)
    per_file = rows // files
    for i in range(files):
        n = per_file if i < files - 1 else rows - per_file * (files - 1)
        offsets = pa.array(np.arange(n + 1, dtype=np.int64) * seq)
        table = pa.table({
            "user": rng.integers(1, 1_000_000, n),
            "item": raw("item", n, vocab.num_items),
            "category": raw("category", n, vocab.num_categories),
            "timestamp": np.full(n, 1_512_000_000, dtype=np.int64),
            "hist_item": pa.LargeListArray.from_arrays(offsets, pa.array(raw("item", n * seq, vocab.num_items))),
            "hist_cat": pa.LargeListArray.from_arrays(offsets, pa.array(raw("category", n * seq, vocab.num_categories))),
        })
        pq.write_table(table, folder / f"part-{i:04d}.parquet", row_group_size=50_000)
    done.touch()


def read_only(folder: Path, batch_size: int) -> float:
    start, rows = time.perf_counter(), 0
    for file in sorted(folder.glob("part-*.parquet")):
        for frame in iter_batches(file, [*SCORING_COLUMNS, "timestamp"], batch_size):
            rows += frame.height
    return rows / (time.perf_counter() - start)


@torch.inference_mode()
def forward_only(bundle_dir: Path, batch_size: int, seq: int = 200, batches: int = 20) -> float:
    bundle = load_bundle(bundle_dir)
    vocab = bundle.meta.vocab()
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((batch_size,), seq, dtype=torch.int64)
    sparse = make_ctr_kjt(
        torch.randint(1, vocab.num_items + 1, (batch_size * seq,), generator=g),
        torch.randint(1, vocab.num_categories + 1, (batch_size * seq,), generator=g),
        lengths,
        torch.randint(1, vocab.num_items + 1, (batch_size,), generator=g),
        torch.randint(1, vocab.num_categories + 1, (batch_size,), generator=g),
    )
    batch = CTRBatch(sparse=sparse)
    bundle.model(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        bundle.model(batch)
    return batches * batch_size / (time.perf_counter() - start)


def score(bundle_dir: Path, folder: Path, out: Path, batch_size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "pipelines.score", f"input={folder}", f"model={bundle_dir}", f"output={out}",
           f"batch_size={batch_size}", f"threads={threads}", "progress=false", f"hydra.run.dir={out}_hydra"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return json.loads((out / "_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="training run folders or bundle folders")
    parser.add_argument("--rows", nargs="+", type=int, default=[1_000_000, 10_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = REPO / "logs" / "benchmarks" / "scoring"
    rows_out = []
    for model in args.model:
        bundle_dir = resolve_bundle(model, work / "_download")
        name = json.loads((bundle_dir / "bundle.json").read_text())["run_name"]
        for rows in args.rows:
            folder = work / f"{bundle_dir.parent.name}-{rows}"
            generate_logs(bundle_dir, folder, rows)
            out = work / f"scores-{bundle_dir.parent.name}-{rows}-{int(time.time())}"
            summary = score(bundle_dir, folder, out, args.batch_size, args.threads)
            row = {
                "model": name, "rows": rows, "rows_per_s": summary["rows_per_s"],
                "peak_rss_mb": summary["peak_rss_mb"],
                "read_only_rows_per_s": round(read_only(folder, args.batch_size), 1),
                "forward_only_rows_per_s": round(forward_only(bundle_dir, args.batch_size), 1),
                "threads": args.threads,
            }
            rows_out.append(row)
            with (RESULTS / "scoring.jsonl").open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    lines = ["| model | rows | rows/s | read-only rows/s | forward-only rows/s | bound ratio | peak RSS (MB) | threads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in [json.loads(l) for l in (RESULTS / "scoring.jsonl").read_text().splitlines()]:
        bound = min(r["read_only_rows_per_s"], r["forward_only_rows_per_s"])
        lines.append(f"| {r['model']} | {r['rows']:,} | {r['rows_per_s']:,.0f} | {r['read_only_rows_per_s']:,.0f} | "
                     f"{r['forward_only_rows_per_s']:,.0f} | {bound / r['rows_per_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['threads']} |")
    (RESULTS / "scoring.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
