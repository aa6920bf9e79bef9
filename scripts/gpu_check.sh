#!/usr/bin/env bash
# The GPU checks (scripts/gpu_check.py): under 8 minutes on one H100/H200; one summary table at
# the end, the same as JSON in gpu_check.json. Without a GPU it says so and exits 0.
#   bash scripts/gpu_check.sh [--only parity,sampling] [--out FILE]
set -u
cd "$(dirname "$0")/.." || exit 1
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
