#!/usr/bin/env bash
# Issue 14, sequential models through `python -m pipelines.train` on one GPU: the training step replayed as one CUDA
# graph over fixed-shape batches (objective.cuda_graph=true; data.fixed_shape is on by default there) beside the
# jagged eager step, then the time to RecBole's best with the graph. One run at a time, nothing else on the machine.
# On the GPU machine, from the repository root, .device carried (whl/, pytest_whl/, data/seqrec):
#   source .device/device_setup.sh && bash benchmarks/device/seqrec14.sh "$OUT/seqrec14" [DEADLINE_S=420]
#   0. pytest -m gpu over the sequential fixed-shape and CUDA-graph tests (PYTEST=0 skips it; PYTEST_FILES others);
#   1. A/B on Beauty, AB_EPOCHS epochs per run (short: not results), for each of AB_MODELS: jagged eager
#      (data.fixed_shape=false), padded eager (data.fixed_shape=true), padded + graph -> OUT/ab.jsonl (AB_VARIANTS:
#      ';'-separated override lists);
#   2. MODELS on DATASETS with the graph, patience 10, at most 80 epochs, both protocols -> OUT/seqrec.jsonl.
# Back here: append OUT/seqrec.jsonl to benchmarks/results/seqrec.jsonl, then `python -m benchmarks.seqrec --table-only`
# (which fills seconds_to_recbole_best against the measured RecBole rows there).
set -u
OUTDIR=${1:?usage: seqrec14.sh OUT_DIR [DEADLINE_S]}
DEADLINE=${2:-420}
AB_EPOCHS=${AB_EPOCHS:-4}
AB_MODELS=${AB_MODELS-sasrec mqsa_ted}
MODELS=${MODELS:-sasrec mqsa_ted}
DATASETS=${DATASETS:-beauty}
W=/tmp/seqrec14
rm -rf "$W" && mkdir -p "$W" "$OUTDIR"
T0=$(date +%s)
say() { echo "== [$(( $(date +%s) - T0 )) s] $* (load $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$OUTDIR/seqrec14.log"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
COMMON=(--trainer gpu --seeds 0 --data-dir "$PWD/.device/data/seqrec" --work "$W/runs")

if [ "${PYTEST:-1}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/pytest_site" .device/pytest_whl/*.whl \
        > /dev/null 2>&1
    say "pytest -m gpu"
    PYTHONPATH="$W/pytest_site:${PYTHONPATH:-}" timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider \
        ${PYTEST_FILES:-tests/test_seq_fixed_shape.py tests/test_cuda_graph.py} > "$OUTDIR/pytest.log" 2>&1
    say "pytest exit $? ($(tail -1 "$OUTDIR/pytest.log"))"
fi

for m in $AB_MODELS; do
    IFS=';' read -r -a variants <<< "${AB_VARIANTS:-data.fixed_shape=false;data.fixed_shape=true;data.fixed_shape=true objective.cuda_graph=true}"
    for variant in "${variants[@]}"; do
        say "A/B $m: $variant"
        # shellcheck disable=SC2086  # the variant is a list of overrides
        timeout -k 10 "$(left)" python3 -m benchmarks.seqrec "${COMMON[@]}" --models "$m" --datasets beauty \
            --max-epochs "$AB_EPOCHS" --out "$OUTDIR/ab.jsonl" --table "$W/ab.md" $variant > "$W/ab.log" 2>&1
        say "exit $?: $(grep -o '"epoch_times": \[[^]]*\]' "$OUTDIR/ab.jsonl" | tail -1) $(grep -o '"train_times": \[[^]]*\]' "$OUTDIR/ab.jsonl" | tail -1)"
    done
done

say "crossing runs: $MODELS on $DATASETS, $(left) s left"
timeout -k 10 "$(left)" python3 -m benchmarks.seqrec "${COMMON[@]}" --models $MODELS --datasets $DATASETS \
    --max-epochs 80 --patience 10 --deadline-s "$(( $(left) - 10 ))" --out "$OUTDIR/seqrec.jsonl" \
    --table "$W/seqrec.md" objective.cuda_graph=true > "$OUTDIR/crossing.log" 2>&1
say "exit $?; $(wc -l < "$OUTDIR/seqrec.jsonl" 2>/dev/null) rows"
grep -rhoE "CUDA graph: [0-9]+ steps replayed, [0-9]+ eager|not graphed.*|runs eagerly.*" "$W/runs" 2>/dev/null | sort | uniq -c | head
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null
