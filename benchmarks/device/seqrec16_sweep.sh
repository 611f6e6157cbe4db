#!/usr/bin/env bash
# MQSA-TED's hyper-parameters for Sports and Yelp by Optuna on the validation split only (configs/hparams_search/
# mqsa_ted.yaml: objective = best val NDCG@20, test_after_fit=false: no trial reads the test split), then the best
# trial's config trained once more with both protocols by benchmarks.seqrec --tuned-from, whose rows (tuned: true,
# trials, tuned_params) are the test numbers to record. Its own device call (it does not fit beside seqrec16.sh).
# On the GPU machine, from the repository root, after `source .device/device_setup.sh`:
#   [WORKERS=8] bash benchmarks/device/seqrec16_sweep.sh $OUT/sweep [SWEEP_S=330] [TRIALS=40] [DEADLINE_S=560]
# WORKERS (default 1): trials of each dataset's study at once, each its own `python -m pipelines.train` process
# (hydra/launcher=processes hydra.launcher.n_jobs=$WORKERS; the sweeper asks a trial whenever a slot frees). One
# MQSA-TED trial is host-bound (80-120 s, the GPU mostly idle), so WORKERS=8 runs about 8x the trials in the same
# SWEEP_S. The two datasets' sweeps run side by side: 2 x WORKERS trainings
# share the machine, each with OMP_NUM_THREADS=4/WORKERS (at least 1). WORKERS=1: Hydra's basic launcher (trials
# one after another in the sweep's process), as before. Stopped at SWEEP_S, the running trials are
# marked failed and re-run by the next call.
# SWEEP_S: wall seconds of the two concurrent sweeps (then stopped; finished trials stay in the study); TRIALS: the
# study's total budget; DEADLINE_S: the whole call. Writes OUT_DIR/{seqrec_tuned.jsonl, sweep.log,
# optuna_sports.db, optuna_yelp.db}. Resumable over calls: carry the two .db files back as
# .device/seqrec16_studies/optuna_<dataset>.db (else benchmarks/results/studies/optuna_<dataset>.db, the studies
# kept in git, is read) and the next call continues the same studies (the sweeper counts
# the finished trials against TRIALS and draws new points).
# Needs .device/optuna_whl and .device/data/seqrec (benchmarks/device/seqrec16_prepare.sh).
# A small check elsewhere: SEQREC16_TRAINER=default SEQREC16_DATA=/tmp/tiny SEQREC16_DATASETS=sports \
#   bash benchmarks/device/seqrec16_sweep.sh /tmp/out 120 2 300
set -u
OUTDIR=${1:?usage: seqrec16_sweep.sh OUT_DIR [SWEEP_S] [TRIALS] [DEADLINE_S]}
SWEEP_S=${2:-330}
TRIALS=${3:-40}
DEADLINE=${4:-560}
WORKERS=${WORKERS:-1}
case "$WORKERS" in ''|*[!0-9]*|0) echo "WORKERS=$WORKERS: give an integer >= 1" >&2; exit 2 ;; esac
LAUNCHER=()  # WORKERS=1: Hydra's basic launcher, in process
[ "$WORKERS" -gt 1 ] && LAUNCHER=(hydra/launcher=processes "hydra.launcher.n_jobs=$WORKERS" hydra.launcher.grace_s=15)
THREADS=$(( 4 / WORKERS )); [ "$THREADS" -ge 1 ] || THREADS=1
W=/tmp/seqrec16_sweep
rm -rf "$W" && mkdir -p "$W" "$OUTDIR"
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .device/optuna_whl/*.whl || exit 3
export PYTHONPATH="$W/site:${PYTHONPATH:-}" OMP_NUM_THREADS=4 MKL_NUM_THREADS=4
DATA=${SEQREC16_DATA:-$PWD/.device/data/seqrec}
TRAINER=${SEQREC16_TRAINER:-gpu}
DATASETS=${SEQREC16_DATASETS:-sports yelp}
declare -A FILE=([sports]=Sports_and_Outdoors.txt [yelp]=Yelp.txt)
for d in $DATASETS; do
    mkdir -p "$W/$d"
    for db in ".device/seqrec16_studies/optuna_$d.db" "benchmarks/results/studies/optuna_$d.db"; do  # carried, else kept
        if [ -f "$db" ]; then cp "$db" "$W/$d/optuna.db" && chmod u+w "$W/$d/optuna.db"; break; fi
    done
    # per trial: up to 60 epochs, early stopping after 5 without a validation NDCG@20 gain
    # stopped at SWEEP_S: the launcher sends its jobs SIGTERM and SIGKILLs them after grace_s, before timeout's -k
    OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS timeout -k 20 "$SWEEP_S" \
        python3 -m pipelines.train -m hparams_search=mqsa_ted "data=$d" \
        "data.path=$DATA/${FILE[$d]}" "trainer=$TRAINER" trainer.enable_progress_bar=false trainer.enable_model_summary=false \
        test_after_fit=false trainer.max_epochs=60 callbacks.early_stopping.patience=5 \
        "hydra.sweeper.n_trials=$TRIALS" "paths.log_dir=$W/$d" ${LAUNCHER[@]+"${LAUNCHER[@]}"} > "$W/sweep_$d.log" 2>&1 &
done
wait
LEFT=$(( DEADLINE - ($(date +%s) - T0) - 15 ))
for d in $DATASETS; do  # the best trial so far, both protocols, patience 20 (as the untuned rows)
    cp "$W/$d/optuna.db" "$OUTDIR/optuna_$d.db" 2>/dev/null
    timeout -k 10 $((LEFT + 10)) python3 -m benchmarks.seqrec --trainer "$TRAINER" --models mqsa_ted --datasets "$d" \
        --seeds 0 --data-dir "$DATA" --tuned-from "sqlite:///$W/$d/optuna.db" --deadline-s "$LEFT" \
        --work "$W/runs" --out "$W/tuned_$d.jsonl" --table "$W/tuned_$d.md" > "$W/tuned_$d.log" 2>&1 &
done
wait
cat "$W"/tuned_*.jsonl > "$OUTDIR/seqrec_tuned.jsonl" 2>/dev/null
{
    echo "seqrec16_sweep: $(( $(date +%s) - T0 )) s wall"
    for d in $DATASETS; do
        python3 - "$W/$d/optuna.db" "$d" <<'PY'
import sys
import warnings
warnings.simplefilter("ignore")
import optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name=f"mqsa_ted-{sys.argv[2]}", storage=f"sqlite:///{sys.argv[1]}")
for t in study.trials:
    print(sys.argv[2], t.number, t.state.name, t.value, t.params, t.duration)
PY
    done
    for f in "$W"/*.log; do echo "== $(basename "$f")"; grep -v -i "warn\|return cls" "$f" | tail -4; done
} > "$OUTDIR/sweep.log" 2>&1
