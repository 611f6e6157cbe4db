#!/usr/bin/env bash
# Issue 14, DARE training throughput at Taobao vocabulary through `python -m pipelines.train +benchmark=dare_scale
# trainer=gpu`, in one call on the GPU machine (about 5-6 minutes of wall time with the defaults):
#   0. `pytest -m gpu` over the GPU-marked test files (PYTEST=0 skips it);
#   1. benchmarks.gpu_pipeline, one run at a time, in the order of RUNS: each word is `case[:override,override...]`,
#      e.g. `dare_scale dare_scale:data.resident=false dare_scale` interleaves the splits held on the GPU with the
#      host loader (A/B side by side); every run writes its step_profile.txt (steps 372-381);
#   2. with CPROFILE=1, one more dare_scale run under cProfile (the host's Python per function; times inflated).
# Usage, from the checkout root on the device, with .device carried (whl/, device_setup.sh, pytest_whl/):
#   source .device/device_setup.sh && bash benchmarks/device/train14.sh "$OUT/train14"
# Writes into $1: gpu_pipeline.jsonl and scale.jsonl (the new lines), logs.tgz (train14.log, each run's log and
# step_profile.txt, the 50-step windows of perf/samples_per_s, cprof.txt, load.log, pytest.log). Back here: append
# the two .jsonl files to benchmarks/results/, then `python -m benchmarks.gpu_pipeline --out
# benchmarks/results/gpu_pipeline.jsonl --table-only`.
# Knobs (env): RUNS="dare_scale dare_scale:data.resident=false dare_scale dare_scale_d128" CPROFILE=1 PYTEST=1
#   RUN_TIMEOUT=150 PYTEST_TIMEOUT=120 PYTEST_FILES="tests/..." (the GPU-marked files by default)
set -u
OUT=${1:?usage: train14.sh OUT_FOLDER}
RUNS=${RUNS:-dare_scale dare_scale:data.resident=false dare_scale dare_scale_d128}
CPROFILE=${CPROFILE:-1}
PYTEST=${PYTEST:-1}
RUN_TIMEOUT=${RUN_TIMEOUT:-150}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-120}
PYTEST_FILES=${PYTEST_FILES:-$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')}
export RECSYS_ROOT=${RECSYS_ROOT:-/tmp/train14_root} RECSYS_COMMIT=${RECSYS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
W=/tmp/train14
rm -rf "$W" && mkdir -p "$W/runs" "$OUT"
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $* (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$W/train14.log"; }
( while sleep 10; do
    echo "$(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg) gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used,clocks.sm --format=csv,noheader 2>/dev/null)"
  done ) > "$W/load.log" 2>&1 &
MONITOR=$!
# the runs' checkpoints (4M-row tables: GBs) and model bundles stay on the device
trap 'kill $MONITOR 2>/dev/null; tar czf "$OUT/logs.tgz" --exclude="*.ckpt" --exclude=model --exclude=pytest_site -C /tmp train14 2>/dev/null' EXIT

if [ "$PYTEST" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/pytest_site" .device/pytest_whl/*.whl \
        > /dev/null 2>&1
    say "pytest -m gpu $PYTEST_FILES"
    # shellcheck disable=SC2086
    PYTHONPATH="$W/pytest_site:${PYTHONPATH:-}" timeout "$PYTEST_TIMEOUT" python3 -m pytest -m gpu -q \
        -p no:cacheprovider $PYTEST_FILES > "$W/pytest.log" 2>&1
    say "pytest exit $? ($(tail -1 "$W/pytest.log"))"
fi

i=0
for run in $RUNS; do
    i=$((i + 1))
    case_name=${run%%:*}
    extra=()
    [ "$run" != "$case_name" ] && IFS=, read -r -a extra <<< "${run#*:}"
    label="$i-$case_name"
    say "run $label: $case_name ${extra[*]:-}"
    timeout "$RUN_TIMEOUT" python3 -m benchmarks.gpu_pipeline --cases "$case_name" --work "$W/runs/$label" \
        --out "$OUT/gpu_pipeline.jsonl" --scale-out "$OUT/scale.jsonl" ${extra[@]+--extra "${extra[@]}"} \
        > "$W/runs/$label.log" 2>&1
    say "exit $?: $(grep '^{' "$W/runs/$label.log" | tail -1)"
done

say "50-step windows of perf/samples_per_s, one line per run (torch_ops tag, data_on_device tag: windows)"
python3 - "$RECSYS_ROOT" >> "$W/train14.log" 2>&1 <<'PY'
import glob, sqlite3, sys
for db in sorted(glob.glob(f"{sys.argv[1]}/**/mlflow.db", recursive=True)):
    con = sqlite3.connect(db)
    for run, in con.execute("select run_uuid from runs order by start_time").fetchall():
        tags = dict(con.execute("select key, value from tags where run_uuid=?", (run,)).fetchall())
        rows = con.execute(
            "select value from metrics where run_uuid=? and key='perf/samples_per_s' order by step", (run,)
        ).fetchall()
        print(tags.get("torch_ops", "-"), tags.get("data_on_device", "-"), [round(v) for v, in rows])
PY

if [ "$CPROFILE" = 1 ]; then
    say "cProfile: pipelines.train +benchmark=dare_scale trainer=gpu"
    timeout "$RUN_TIMEOUT" python3 -m cProfile -o "$W/cprof.out" -m pipelines.train +benchmark=dare_scale trainer=gpu \
        "hydra.run.dir=$W/runs/cprofile" > "$W/runs/cprofile.log" 2>&1
    say "exit $?"
    python3 - "$W/cprof.out" > "$W/cprof.txt" 2>&1 <<'PY'
import pstats, sys
stats = pstats.Stats(sys.argv[1])
stats.sort_stats("tottime").print_stats(40)
stats.sort_stats("cumulative").print_stats(150)
PY
    rm -f "$W/cprof.out"
fi
say done
