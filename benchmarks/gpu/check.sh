#!/usr/bin/env bash
# The GPU device check: one script, one CUDA device, about eight minutes.
#
#   benchmarks/gpu/check.sh [OUT_DIR]            # default OUT_DIR: device-check
#   ROPELM_NANOGPT=~/nanoGPT/model.py benchmarks/gpu/check.sh results/h200
#
# Runs `ropelm-exp device-check` from the repository root: the conformance suite
# on CUDA in bf16, training tokens/s and MFU of the rope_base model (beside
# nanoGPT's model.py when ROPELM_NANOGPT names a local copy), `bench` of every
# variant at T=1024 and 4096, and the quickstart end to end. Results:
# OUT_DIR/device_check.json and OUT_DIR/device_check.md. On a machine without
# CUDA it prints one sentence and exits 0.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c "import ropelm.cli" 2>/dev/null; then
    echo "ropelm (with its dependencies) is not installed for $PYTHON; run \`pip install -e .\` in $(pwd) first." >&2
    exit 1
fi
exec "$PYTHON" -m ropelm.cli device-check --out "${1:-device-check}"
