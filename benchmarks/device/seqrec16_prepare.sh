#!/usr/bin/env bash
# Builds what benchmarks/device/seqrec16*.sh need on the GPU machine (no network there) into the git-ignored
# .device/ of a checkout, from a machine with an index: run from the repository root,
#   bash benchmarks/device/seqrec16_prepare.sh [PEERS_DIR] [SEQREC_DATA_DIR]
# (defaults: ../shared/peers and ../shared/data/seqrec, the layout of the project's machines).
#   .device/recbole_whl/recbole_site.tar.gz  RecBole 1.2.1 + colorlog 4.7.2, colorama 0.4.4, texttable, thop for
#       Python 3.12 (pure Python), installed --no-deps into one folder (extracted onto RecBole's own PYTHONPATH on
#       the device; RecBole's bundled ml-100k example data left out: 0.6 MB instead of 2.2 MB of wheels).
#       RecBole's import-time-only needs that the device image may lack (tensorboard, scikit-learn) get stand-ins
#       from benchmarks/peer_launch.py; torch, numpy, pandas, scipy, PyYAML, tqdm, psutil come from the image.
#   .device/optuna_whl/  optuna 5.0.0 + hydra-optuna-sweeper 1.3.0 wheels (the sweeps, seqrec16_sweep.sh)
#   .device/peers/       recbole_masked.py, recbole_seqrec.py (RecBole's runners, unchanged)
#   .device/data/seqrec/ Beauty.txt, Sports_and_Outdoors.txt, Yelp.txt
set -euo pipefail
PEERS=${1:-../shared/peers}
DATA=${2:-../shared/data/seqrec}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p .device/recbole_whl .device/optuna_whl .device/peers .device/data/seqrec
"$PY" -m pip download -q --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
    -d "$TMP/whl" recbole==1.2.1 colorlog==4.7.2 colorama==0.4.4 texttable==1.7.2 thop==0.1.1.post2209072238
"$PY" -m pip install -q --no-deps --no-compile --target "$TMP/site" "$TMP"/whl/*.whl
rm -rf "$TMP/site/recbole/dataset_example" "$TMP/site/bin"
tar czf .device/recbole_whl/recbole_site.tar.gz -C "$TMP/site" .
"$PY" -m pip download -q --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
    -d .device/optuna_whl optuna==5.0.0 hydra-optuna-sweeper==1.3.0
cp "$PEERS/recbole_masked.py" "$PEERS/recbole_seqrec.py" .device/peers/
for f in Beauty Sports_and_Outdoors Yelp; do cp "$DATA/$f.txt" .device/data/seqrec/; done
du -sh .device/recbole_whl .device/optuna_whl .device/peers .device/data/seqrec
