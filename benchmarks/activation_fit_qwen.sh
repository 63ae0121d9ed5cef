#!/usr/bin/env bash
# Transfer fitted on activations against the weight-fitted transfer on the real Qwen pair (issue 22, item 2):
# the arithmetic LoRA-100 of benchmarks/fidelity_qwen.sh migrated transfer-only with --transfer-fit weights and
# activations (same adapter, calibration, 32 evaluation prompts: fidelity and accuracy), then the fit
# diagnostics (benchmarks/activation_fit_diagnostics.py). WORKDIR holds the adapter and cache of
# fidelity_qwen.sh (reused: activations, the weight-fitted layers, the fixed eval rows).
# CALIBRATION (optional): --calibration-data, e.g. task:arithmetic:train (the adapter's own prompts); FITS: which fits.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=${PYTHON:-/work/main/.venv/bin/python}
M=~/.cache/lorasuite/models
W=${WORKDIR:-runs/fidelity-qwen}; TAG=${TAG:-builtin}
test -f $W/adapter/adapter_model.safetensors || WORKDIR=$W benchmarks/fidelity_qwen.sh
EXTRA=(); if [ -n "${CALIBRATION:-}" ]; then EXTRA=(--calibration-data "$CALIBRATION"); fi
for FIT in ${FITS:-weights activations}; do
  OUT=$W/migrated-$FIT-$TAG
  lscpu | grep "Model name" > $OUT.cpu.txt; uptime >> $OUT.cpu.txt
  /usr/bin/time -v nice -n 19 $PY -m flows.cli migrate --old-model $M/qwen2.5-coder-0.5b-instruct/hf \
    --new-model $M/qwen2.5-coder-1.5b-instruct/hf --adapter $W/adapter --output $OUT --no-lft \
    --eval-data task:arithmetic:test --eval-samples 32 --cache-root $W/cache --transfer-fit $FIT "${EXTRA[@]}" \
    > $OUT.json 2> $OUT.err
  uptime >> $OUT.cpu.txt
  $PY -c "import json;r=json.load(open('$OUT/migration_report.json'));print('$FIT', json.dumps({k: r.get(k) for k in ('fidelity','evaluation')}))"
done
nice -n 19 $PY benchmarks/activation_fit_diagnostics.py --old-model $M/qwen2.5-coder-0.5b-instruct/hf \
  --new-model $M/qwen2.5-coder-1.5b-instruct/hf --adapter $W/adapter --cache-root $W/cache ${CALIBRATION:+--calibration-data $CALIBRATION} \
  --output $W/diagnostics-$TAG.json
