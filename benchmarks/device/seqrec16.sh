#!/usr/bin/env bash
# Ours (SASRec, MQSA-TED; both protocols from one training run each) vs RecBole SASRec (both protocols from one run
# each) on Beauty, Sports and Yelp, seed 0, one GPU, everything at once, ending within DEADLINE_S + ~20 s.
# On the GPU machine, from the repository root, after `source .device/device_setup.sh` (PYTHONPATH=/tmp/site:$PWD):
#   bash benchmarks/device/seqrec16.sh $OUT/seqrec [DEADLINE_S=440]
# Needs .device/{recbole_whl,peers,data/seqrec} (benchmarks/device/seqrec16_prepare.sh builds them).
# Writes OUT_DIR/seqrec.jsonl (every row, our seconds_to_recbole_best against the RecBole rows of this call) and
# OUT_DIR/seqrec16.log (each process's last lines). Append seqrec.jsonl to benchmarks/results/seqrec.jsonl, then
# `python -m benchmarks.seqrec --table-only` rebuilds seqrec.md.
# Runs are cut at the deadline, not lost: ours get trainer.max_time (then test their best checkpoint), RecBole a
# --time-budget-s; such rows say stopped_by time_limit / converged false. 9 processes share the GPU and 16 cores
# (2 threads each).
# A small check elsewhere (CPU, one process at a time, a cut-down data folder):
#   SEQREC16_TRAINER=default SEQREC16_DATA=/tmp/tiny SEQREC16_DATASETS=beauty SEQREC16_SERIAL=1 \
#   SEQREC16_ARGS="--max-epochs 1" bash benchmarks/device/seqrec16.sh /tmp/out 400
set -u
OUTDIR=${1:?usage: seqrec16.sh OUT_DIR [DEADLINE_S]}
DEADLINE=${2:-440}
W=/tmp/seqrec16
rm -rf "$W" && mkdir -p "$W/recbole_site" "$OUTDIR"
T0=$(date +%s)
tar xzf .device/recbole_whl/recbole_site.tar.gz -C "$W/recbole_site" || exit 3
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
DATASETS=${SEQREC16_DATASETS:-beauty sports yelp}
# shellcheck disable=SC2206  # SEQREC16_ARGS: extra benchmark arguments, split on spaces
COMMON=(--trainer "${SEQREC16_TRAINER:-gpu}" --seeds 0 --data-dir "${SEQREC16_DATA:-$PWD/.device/data/seqrec}"
    --deadline-s "$DEADLINE" --work "$W/runs" ${SEQREC16_ARGS:-})
lane() {  # lane NAME ARGS...: one benchmark process in the background, its own jsonl and log
    local name=$1
    shift
    timeout -k 10 $((DEADLINE + 15)) python3 -m benchmarks.seqrec "${COMMON[@]}" --out "$W/$name.jsonl" \
        --table "$W/$name.md" "$@" > "$W/$name.log" 2>&1 &
    if [ -n "${SEQREC16_SERIAL:-}" ]; then wait; fi
}
for d in $DATASETS; do  # (a) RecBole first: its budget is the longest
    lane "recbole_$d" --models recbole_sasrec --datasets "$d" --recbole-dir .device/peers \
        --recbole-pythonpath "$W/recbole_site" --recbole-threads 2 --recbole-budget-s 300 --recbole-margin-s "${SEQREC16_RECBOLE_MARGIN:-135}"
done
for d in $DATASETS; do  # (b) ours, both protocols per run
    for m in sasrec mqsa_ted; do
        lane "${m}_$d" --models "$m" --datasets "$d"
    done
done
wait
cat "$W"/recbole_*.jsonl "$W"/sasrec_*.jsonl "$W"/mqsa_ted_*.jsonl > "$OUTDIR/seqrec.jsonl" 2>/dev/null
python3 -m benchmarks.seqrec --table-only --out "$OUTDIR/seqrec.jsonl" --table "$W/seqrec.md" 2>&1 | tail -3
{
    echo "seqrec16: $(( $(date +%s) - T0 )) s wall, $(wc -l < "$OUTDIR/seqrec.jsonl") rows"
    nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
    for f in "$W"/*.log; do echo "== $(basename "$f")"; grep -v -i "warn" "$f" | tail -6; done
    cat "$W/seqrec.md"
} > "$OUTDIR/seqrec16.log" 2>&1
