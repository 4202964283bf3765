#!/usr/bin/env bash
# The prepared device check (issue 13 item 7): one table, <= 8 minutes on one modern GPU.
#   bash benchmarks/gpu_check.sh           full shapes on CUDA (tiny shapes automatically without CUDA)
#   bash benchmarks/gpu_check.sh --tiny    tiny shapes on any device, a minute or two on a CPU (CI)
# Extra arguments go to benchmarks/gpu_check.py (--device, --skip tests,retrieval,train,ablate, --batch N).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/gpu_check.py "$@"
