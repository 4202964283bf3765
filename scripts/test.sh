#!/usr/bin/env bash
# Set up (with test tools) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec ${PYTHON:-python3} -m pytest -n 2 tests "$@"
