#!/usr/bin/env bash
# Issue 14, GPU scoring of DARE at Taobao vocabulary, in one call on the GPU machine (about 7 minutes of wall time):
#   0. `pytest -m gpu` over the GPU-marked test files (the CUDA paths against their CPU references);
#   1. in the background, what the ml-100k dim-64 grid still lacks (benchmarks/device/ctr16.sh, grid phase only, until
#      GRID_END s; AUC rows, not timings: it shares the machine with steps 2-3 only);
#   2. a DARE dim-16 bundle at Taobao vocabulary (4.07 M items): pipelines.train +benchmark=dare_scale trainer=gpu,
#      BUNDLE_STEPS steps (the scoring work does not depend on the weights' values);
#   3. 10 M rows of seq-200 logs over its vocabulary (benchmarks.scoring --prepare-only, one process per file);
#   4. after the grid has ended, alone on the machine, benchmarks.scoring through `python -m pipelines.score ... device=cuda`:
#      file_workers=FW fixed_shape=auto (with the read-only / forward-only bounds); processes=P for each P in PROCS
#      (worker processes, each its own model copy; with the read-only bound of P reader processes); with
#      BASELINES=1 the same with fixed_shape=false (the KJT batches) and file_workers=1 (one file at a time).
# Usage, from the checkout root on the device, with .device carried (whl/, device_setup.sh, pytest_whl/, and for the
# grid data/ml-100k, peers/, dare_official/, prev/dare_ml100k_runs.jsonl):
#   bash benchmarks/device/score14.sh "$OUT/score14"
# Writes into $1: scoring.jsonl (the new rows), dare_ml100k_runs.jsonl (grid rows, when the grid ran), pytest.log,
# score14.log. Back here: append scoring.jsonl to benchmarks/results/scoring.jsonl, run
# `python -m benchmarks.scoring` (no --model: rewrites the tables), replace dare_ml100k_runs.jsonl as ctr16.sh says.
# Knobs (env): ROWS=10000000 FW=8 BATCH=16384 PREFETCH=1 THREADS=8 BUNDLE_STEPS=50 GRID=1 GRID_END=200
#   GRID_DIMS=64 STEP_TIMEOUT=120 PROCS="8" PROC_THREADS=1 BASELINES=1 RSS_PROBES=0 (1: three more fixed-shape runs: allocators' decay 0, prefetch 0,
#   4 file workers) PYTEST_FILES="tests/..." (the GPU-marked files by default) PYTEST_TIMEOUT=90
set -u
OUT=${1:?usage: score14.sh OUT_FOLDER}
T0=$(date +%s)
ROWS=${ROWS:-10000000}
FW=${FW:-8}
BATCH=${BATCH:-16384}
PREFETCH=${PREFETCH:-1}
THREADS=${THREADS:-8}
BUNDLE_STEPS=${BUNDLE_STEPS:-50}
GRID=${GRID:-1}
GRID_END=${GRID_END:-200}
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
PY=${PYTHON:-python3}
W=/tmp/score14
LOG=$OUT/score14.log
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GIT_PYTHON_REFRESH=quiet
elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "== [$(elapsed) s] $* (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$LOG"; }

say "host: $(nproc) cores, $($PY --version 2>&1), commit ${RECSYS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
if ! $PY -c "import pipelines.score" >/dev/null 2>&1; then
  say "sourcing .device/device_setup.sh"
  # shellcheck disable=SC1091
  source .device/device_setup.sh >>"$LOG" 2>&1 || { say "device setup failed"; exit 3; }
fi

if [ "$GRID" = 1 ]; then
  say "1. grid in the background until ${GRID_END} s"
  mkdir -p /tmp/ctr16_work/results
  cp .device/prev/dare_ml100k_runs.jsonl /tmp/ctr16_work/results/ 2>/dev/null
  TOTAL=$((GRID_END + 20)) GRID_END=$GRID_END GRID_DIMS=${GRID_DIMS:-64} GRID_PARALLEL=4 \
    bash benchmarks/device/ctr16.sh "$W/ctr16" >"$W/ctr16.out" 2>&1 &
  GRID_PID=$!
fi

say "0. pytest -m gpu"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$W/pytest_site" .device/pytest_whl/*.whl >>"$LOG" 2>&1
PYTHONPATH="$W/pytest_site:${PYTHONPATH:-}" timeout "${PYTEST_TIMEOUT:-90}" $PY -m pytest -m gpu -q -p no:cacheprovider \
  ${PYTEST_FILES:-tests/test_gpu.py tests/test_kernels.py tests/test_cuda_graph.py tests/test_sync_free.py \
  tests/test_scoring_fixed_shape.py tests/test_scoring_outputs.py tests/test_id_map.py \
  tests/test_scoring_processes.py} >"$OUT/pytest.log" 2>&1
say "pytest exit $? ($(tail -1 "$OUT/pytest.log"))"

say "2. bundle: pipelines.train +benchmark=dare_scale trainer=gpu trainer.max_steps=$BUNDLE_STEPS"
RUN=$W/bundle_run
timeout "$STEP_TIMEOUT" $PY -m pipelines.train +benchmark=dare_scale trainer=gpu "trainer.max_steps=$BUNDLE_STEPS" \
  "hydra.run.dir=$RUN" >"$W/bundle.log" 2>&1
say "bundle exit $?"
[ -d "$RUN/model" ] || { tail -20 "$W/bundle.log" >>"$LOG"; say "no bundle"; exit 4; }

say "3. $ROWS rows of logs"
timeout "$STEP_TIMEOUT" $PY -m benchmarks.scoring --model "$RUN" --rows "$ROWS" --prepare-only >"$W/logs.log" 2>&1
say "logs exit $? ($(du -sh logs/benchmarks/scoring 2>/dev/null | cut -f1))"

if [ -n "${GRID_PID:-}" ]; then
  wait "$GRID_PID"
  say "grid done: $(grep -c . /tmp/ctr16_work/results/dare_ml100k_runs.jsonl) rows"
  cp /tmp/ctr16_work/results/dare_ml100k_runs.jsonl "$OUT/" 2>/dev/null
  grep -E "^\[dare_ml100k\]|^\|" "$W/ctr16/ctr16.log" 2>/dev/null | tail -12 >>"$LOG"
fi

# the new rows only: the benchmark appends to benchmarks/results/scoring.jsonl (copied out even when the call is cut)
BEFORE=$(wc -l <benchmarks/results/scoring.jsonl)
trap 'tail -n +$((BEFORE + 1)) benchmarks/results/scoring.jsonl >"$OUT/scoring.jsonl"' EXIT
bench() {
  say "4. benchmarks.scoring $*"
  timeout "$STEP_TIMEOUT" $PY -m benchmarks.scoring --model "$RUN" --rows "$ROWS" --device cuda --threads "$THREADS" \
    --batch-size "$BATCH" --prefetch "$PREFETCH" "$@" >>"$W/bench.log" 2>&1
  say "exit $?: $(tail -n +$((BEFORE + 1)) benchmarks/results/scoring.jsonl | tail -1 | cut -c1-400)"
  tail -n +$((BEFORE + 1)) benchmarks/results/scoring.jsonl >"$OUT/scoring.jsonl"
}
bench --file-workers "$FW" --fixed-shape auto
for P in ${PROCS-8}; do  # torch/pyarrow/polars threads per process: PROC_THREADS (the 2026-12-03 runs had 8 each)
  THREADS=${PROC_THREADS:-1} bench --processes "$P" --fixed-shape auto
done
if [ "${RSS_PROBES:-0}" = 1 ]; then  # where the host memory of FW file threads goes (issue 14: peak RSS <= 4 GiB)
  DECAY0=dirty_decay_ms:0,muzzy_decay_ms:0  # jemalloc of polars (_RJEM_) and of pyarrow (JE_ARROW_): no retention
  bench --file-workers "$FW" --fixed-shape auto --no-bounds --job-env "_RJEM_MALLOC_CONF=$DECAY0" \
    "JE_ARROW_MALLOC_CONF=$DECAY0" MALLOC_ARENA_MAX=2
  PREFETCH=0 bench --file-workers "$FW" --fixed-shape auto --no-bounds
  bench --file-workers 4 --fixed-shape auto --no-bounds
fi
if [ "${BASELINES:-1}" = 1 ]; then
  bench --file-workers "$FW" --fixed-shape false --no-bounds
  bench --file-workers 1 --fixed-shape auto --no-bounds
fi
grep -v "^{" "$W/bench.log" | grep -iv "warn" | tail -15 >>"$LOG"
say "done"
