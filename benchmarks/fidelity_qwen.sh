#!/usr/bin/env bash
# Fidelity of a transfer-only migration on the real Qwen pair: a fresh arithmetic LoRA-100 on the 0.5B,
# migrated to the 1.5B without LFT; the report's fidelity on 32 evaluation prompts (issue 22, item 1).
set -euo pipefail
cd "$(dirname "$0")/.."
M=~/.cache/lorasuite/models
W=${WORKDIR:-runs/fidelity-qwen}; mkdir -p $W
lscpu | grep "Model name" > $W/cpu.txt; uptime >> $W/cpu.txt
if [ ! -f $W/adapter/adapter_model.safetensors ]; then
  /usr/bin/time -v .venv/bin/lorasuite -q train --model $M/qwen2.5-coder-0.5b-instruct/hf --data task:arithmetic:train --samples 100 --epochs 1 --output $W/adapter 2> $W/train.time
fi
/usr/bin/time -v .venv/bin/lorasuite migrate --old-model $M/qwen2.5-coder-0.5b-instruct/hf --new-model $M/qwen2.5-coder-1.5b-instruct/hf \
  --adapter $W/adapter --output $W/migrated --no-lft --eval-data task:arithmetic:test --eval-samples 32 --cache-root $W/cache > $W/migrate.json 2> $W/migrate.err
python3 -c "import json;r=json.load(open('$W/migrated/migration_report.json'));print(json.dumps(r['fidelity'],indent=1));print(json.dumps(r.get('evaluation'),indent=1))"
