#!/usr/bin/env bash
# Issue 16, CTR part, on the GPU machine in about 8 minutes of wall time (TOTAL seconds):
#   1. the paired grid through pipelines.train (benchmarks/dare_ml100k.py: DIN, TWIN, DARE; dims 16 then 64; seeds
#      1-5; early stopping on val/auc, patience 3), GRID_PARALLEL runs at once, until GRID_END seconds after the start
#      (dim 16 first: every dim-16 run starts before the first dim-64 one; runs still going at GRID_END are stopped);
#   2. then the authors' code (benchmarks/dare_official.py: thuml/DARE @ c72e087), DARE, TWIN, DIN one after another
#      (never two at once), seed 1 for all three first, then seed 2, 3, until TOTAL.
# The official-format data is converted in the background during phase 1 (one CPU core).
#
# Usage, from the checkout root on the device, with .device carried:
#   bash benchmarks/device/ctr16.sh "$OUT/ctr16"
# .device must hold: whl/ + device_setup.sh (the package's wheels; sourced here unless pipelines.train already
# imports), data/ml-100k/{u.data,u.item} (MovieLens-100k), peers/{convert_ml100k.py,run_official.py} (the peer scripts),
# dare_official/ (thuml/DARE's training code at c72e087, as benchmarks/dare_official.py exports it).
# Writes three files into $1: dare_ml100k_runs.jsonl (grid rows), dare_official.jsonl (official rows), ctr16.log.
# Back on the CPU machine: append both jsonl files to benchmarks/results/ and run the two scripts with --report-only.
#
# Knobs (env): TOTAL=480 GRID_END=300 GRID_PARALLEL=8 GRID_THREADS=2 GRID_SEEDS="1 2 3 4 5" GRID_DIMS="16 64"
#   GRID_MODELS="din twin dare" GRID_MAX_EPOCHS=30 GRID_PATIENCE=3 GRID_OVERRIDES="trainer=gpu"
#   OFF_MODELS="DARE twin DIN" OFF_SEEDS="1 2 3" OFF_EPOCHS=2 OFF_THREADS=4 DATA_PATH=.device/data/ml-100k
#   PEERS=.device/peers OFFICIAL=.device/dare_official WORK=/tmp/ctr16_work
# CPU smoke test (tiny; 12 minutes on 2 busy cores, most of it the official epoch): TOTAL=1500 GRID_END=600
#   GRID_PARALLEL=2 GRID_THREADS=1 GRID_SEEDS=1 GRID_DIMS=16 GRID_MAX_EPOCHS=1 OFF_THREADS=2
#   GRID_OVERRIDES="trainer=default trainer.limit_train_batches=5" OFF_MODELS=DARE OFF_SEEDS=1 OFF_EPOCHS=1
#   PYTHON=.venv/bin/python PEERS=... OFFICIAL=... DATA_PATH=... bash benchmarks/device/ctr16.sh /tmp/ctr16_out
set -u
OUT=${1:?usage: ctr16.sh OUT_FOLDER}
T0=$(date +%s)
TOTAL=${TOTAL:-480}
GRID_END=${GRID_END:-300}
GRID_PARALLEL=${GRID_PARALLEL:-8}
GRID_THREADS=${GRID_THREADS:-2}
GRID_SEEDS=${GRID_SEEDS:-1 2 3 4 5}
GRID_DIMS=${GRID_DIMS:-16 64}
GRID_MODELS=${GRID_MODELS:-din twin dare}
GRID_MAX_EPOCHS=${GRID_MAX_EPOCHS:-30}
GRID_PATIENCE=${GRID_PATIENCE:-3}
GRID_OVERRIDES=${GRID_OVERRIDES:-trainer=gpu}
OFF_MODELS=${OFF_MODELS:-DARE twin DIN}
OFF_SEEDS=${OFF_SEEDS:-1 2 3}
OFF_EPOCHS=${OFF_EPOCHS:-2}
OFF_THREADS=${OFF_THREADS:-4}
DATA_PATH=${DATA_PATH:-.device/data/ml-100k}
PEERS=${PEERS:-.device/peers}
OFFICIAL=${OFFICIAL:-.device/dare_official}
WORK=${WORK:-/tmp/ctr16_work}
PY=${PYTHON:-python3}
RES=$WORK/results
LOG=$OUT/ctr16.log
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true GIT_PYTHON_REFRESH=quiet
elapsed() { echo $(($(date +%s) - T0)); }
say() { echo "== [$(elapsed) s] $*" | tee -a "$LOG"; }
collect() {  # the only files that go back
  for f in dare_ml100k_runs.jsonl dare_official.jsonl; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/$f"; done
}
trap collect EXIT

say "host: $(nproc) cores, $($PY --version 2>&1), $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader >>"$LOG" 2>&1 || true
if ! $PY -c "import pipelines.train" >/dev/null 2>&1; then
  say "sourcing .device/device_setup.sh"
  # shellcheck disable=SC1091
  source .device/device_setup.sh >>"$LOG" 2>&1 || { say "device setup failed"; exit 3; }
fi
if command -v nvidia-smi >/dev/null; then  # GPU load every 15 s, to read the sharing from
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 15 >"$WORK/smi.csv" 2>&1 &
  SMI=$!
fi

say "prepare ml-100k (pipelines.prepare)"
$PY -m pipelines.prepare data=ml100k "data.path=$DATA_PATH" 2>&1 | grep -E "ready at|rror" | tee -a "$LOG"
OFFARGS=(--peers "$PEERS" --official "$OFFICIAL" --work "$WORK/official" --results "$RES" --models $OFF_MODELS
  --seeds $OFF_SEEDS --epochs "$OFF_EPOCHS" --python "$PY" "data.path=$DATA_PATH")
OMP_NUM_THREADS=1 $PY -m benchmarks.dare_official "${OFFARGS[@]}" --prepare-only >"$WORK/convert.log" 2>&1 &
CONVERT=$!

say "phase 1: grid (parallel $GRID_PARALLEL, models $GRID_MODELS, dims $GRID_DIMS, seeds $GRID_SEEDS) until ${GRID_END} s"
LEFT=$((GRID_END - $(elapsed)))
OMP_NUM_THREADS=$GRID_THREADS MKL_NUM_THREADS=$GRID_THREADS POLARS_MAX_THREADS=$GRID_THREADS timeout -k 15 $((LEFT + 30)) \
  $PY -m benchmarks.dare_ml100k --models $GRID_MODELS --seeds $GRID_SEEDS --dims $GRID_DIMS \
  --patience "$GRID_PATIENCE" --max-epochs "$GRID_MAX_EPOCHS" --parallel "$GRID_PARALLEL" --deadline "$LEFT" \
  --results "$RES" $GRID_OVERRIDES "data.path=$DATA_PATH" >"$WORK/grid.out" 2>"$WORK/grid.err"
RC=$?
say "grid exit $RC ($(cat "$RES/dare_ml100k_runs.jsonl" 2>/dev/null | wc -l) rows)"
grep -E "^\[dare_ml100k\]|^\|" "$WORK/grid.err" "$WORK/grid.out" | cut -c1-400 >>"$LOG"
grep -v "^\[dare_ml100k\]" "$WORK/grid.err" | tail -40 >>"$LOG"
collect

wait "$CONVERT"
RC=$?
say "conversion exit $RC"
tail -3 "$WORK/convert.log" >>"$LOG"
LEFT=$((TOTAL - $(elapsed) - 15))
say "phase 2: official code ($OFF_MODELS; seeds $OFF_SEEDS; $OFF_EPOCHS epochs), ${LEFT} s left"
if [ "$LEFT" -gt 20 ]; then
  OMP_NUM_THREADS=$OFF_THREADS MKL_NUM_THREADS=$OFF_THREADS timeout -k 10 $((LEFT + 10)) \
    $PY -m benchmarks.dare_official "${OFFARGS[@]}" --deadline "$LEFT" >"$WORK/official.out" 2>&1
  RC=$?
  say "official exit $RC"
  grep -E "^\[dare_official\]|Error|error" "$WORK/official.out" | cut -c1-400 | tail -40 >>"$LOG"
fi
if [ -n "${SMI:-}" ]; then
  kill "$SMI" 2>/dev/null
  echo "== GPU utilization / memory every 15 s: $(tr '\n' ';' <"$WORK/smi.csv" | cut -c1-3000)" >>"$LOG"
fi
collect
say "done"
