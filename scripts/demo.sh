#!/usr/bin/env bash
# Set up and run the main job: the whole ablation plan at demo scale on built-in data, then the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m memtrans ablate plans/memorizing_transformers.yaml --preset demo --jobs 2 "$@"
