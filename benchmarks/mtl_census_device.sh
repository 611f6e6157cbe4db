#!/bin/bash
# The census tower searches on the device machine, all five at once (configs/hparams_search/<tower>.yaml, one
# sweep process per tower, its own Optuna and MLflow sqlite stores), then 5 seeds of each search's best
# configuration on test (benchmarks/mtl_census.py --tuned), one process per tower. About 8 minutes of wall time
# with the defaults; a sweep still running at its time limit keeps its complete trials (the budget is
# reported as the complete trials, the rows' `trials`).
#
#   bash benchmarks/mtl_census_device.sh $OUT [TRIALS=8] [ACCEL=gpu]
#
# Needs, carried in the git-ignored .device/: the wheels of .device/device_setup.sh plus optuna 5.0.0,
# hydra-optuna-sweeper 1.3.0 and colorlog (pip download --no-deps ... -d .device/whl), and the census files in
# .device/data/mtl/census_kdd/ (census-income.test.gz, split_seed2026/*.npy; about 4 MB).
# Writes to $OUT: rows.jsonl (mtl.jsonl rows, tuned: true), curves.jsonl (per-epoch validation AUC of the
# tuned runs), studies.tgz (each tower's optuna.db), log.txt. Back home:
#   cat rows.jsonl >> benchmarks/results/mtl.jsonl; tar xzf studies.tgz -C <folder>; then
#   python -m benchmarks.mtl_census --table --search-db <folder>/<tower>/optuna.db   (one tower's searches)
# Environment: TOWERS (default all five), SEARCH_S / TUNED_S (time limits of the two phases), PARALLEL=0 (one
# process at a time, for a check on a small machine), EXTRA (overrides for every run, e.g. a tiny check:
# "trainer.limit_train_batches=3 trainer.max_epochs=1"), BENCH_ARGS (extra options of the tuned runs, e.g.
# "--seeds 1 --max-epochs 1"), SETUP (default .device/device_setup.sh; none = skip).
set -u
OUT=${1:?usage: mtl_census_device.sh OUT_FOLDER [TRIALS] [ACCEL]}
TRIALS=${2:-8}
ACCEL=${3:-gpu}
TOWERS=${TOWERS:-"mmoe ple shared_bottom switch taskexpert"}
SEARCH_S=${SEARCH_S:-300}
TUNED_S=${TUNED_S:-150}
PARALLEL=${PARALLEL:-1}
EXTRA=${EXTRA:-}
BENCH_ARGS=${BENCH_ARGS:-}
SETUP=${SETUP:-.device/device_setup.sh}
PY=${PY:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ "$SETUP" != none ]; then
  # shellcheck disable=SC1090
  source "$SETUP" || exit 3
  export RECSYS_SHARED_DATA=${RECSYS_SHARED_DATA:-$PWD/.device/data}
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI  # each tower: sqlite stores in its own log folder
W=${WORK:-/tmp/mtl_census_device}
rm -rf "$W" && mkdir -p "$W"
T0=$(date +%s)
say() { echo "== $1 at $(($(date +%s) - T0)) s, load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc --all) cores" | tee -a "$OUT/log.txt"; }
trainer=cpu
[ "$ACCEL" = gpu ] && trainer=gpu
wait_all() { [ "$PARALLEL" = 1 ] && wait; true; }

say "search: $TOWERS, $TRIALS trials each, $ACCEL"
for t in $TOWERS; do
  # shellcheck disable=SC2086
  cmd=(timeout "$SEARCH_S" "$PY" -m pipelines.train -m "hparams_search=$t" "hydra.sweeper.n_trials=$TRIALS"
    "trainer=$trainer" "paths.log_dir=$W/$t" $EXTRA)
  if [ "$PARALLEL" = 1 ]; then "${cmd[@]}" >"$W/search_$t.log" 2>&1 & else "${cmd[@]}" >"$W/search_$t.log" 2>&1; fi
done
wait_all
say "search done"

for t in $TOWERS; do
  # shellcheck disable=SC2086
  cmd=(timeout "$TUNED_S" "$PY" -m benchmarks.mtl_census --models "$t" --tuned "$W/$t/optuna.db"
    --accelerator "$ACCEL" --threads "$OMP_NUM_THREADS" --out "$W/rows_$t.jsonl" --curves "$W/curves_$t.jsonl"
    --md "$W/no.md" $BENCH_ARGS --set $EXTRA)
  if [ "$PARALLEL" = 1 ]; then "${cmd[@]}" >"$W/tuned_$t.log" 2>&1 & else "${cmd[@]}" >"$W/tuned_$t.log" 2>&1; fi
done
wait_all
say "tuned runs done"

cat "$W"/rows_*.jsonl >"$OUT/rows.jsonl" 2>/dev/null
cat "$W"/curves_*.jsonl >"$OUT/curves.jsonl" 2>/dev/null
(cd "$W" && tar czf "$OUT/studies.tgz" ./*/optuna.db)
for t in $TOWERS; do
  {
    echo "--- $t"
    grep -h -E "best of|val auc|Error|error" "$W/tuned_$t.log" | tail -8
    tail -3 "$W/search_$t.log"
  } >>"$OUT/log.txt"
done
say "end: $(wc -l <"$OUT/rows.jsonl") rows"
