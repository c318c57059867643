#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU: the cuda test suite, then
# `scripts/benchmark.py train` for ours and timm's ConvNeXt, into one dated report folder.
#
#     bash scripts/gpu_check.sh [REPORT_DIR]     # default: $OUT if set, else gpu_report/
#
# Each part has its own time limit (seconds; environment variables CUDA_SUITE_SECONDS,
# BENCHMARK_SECONDS), so that a hung part still leaves the others' figures. About 9 minutes on
# an H200 with the defaults. Copy the figures into docs/PERFORMANCE.md with the device, date,
# commit and command that device.txt and the logs record.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-${OUT:-gpu_report}}
mkdir -p "$report"
if [ -d shared/golden ] && [ -z "${EMONEXT_GOLDEN_DIR:-}" ]; then
    export EMONEXT_GOLDEN_DIR="$PWD/shared/golden"  # the official outputs, for the parity tests
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python - <<'PY'
import sys, timm, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, timm {timm.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
PY
} > "$report/device.txt" 2>&1
cat "$report/device.txt"

# Floors only: the machine's own CUDA build of torch stays.
python -m pip install --quiet --disable-pip-version-check -r requirements.txt \
    > "$report/pip.txt" 2>&1 || echo "pip install failed: see $report/pip.txt"

echo "== cuda suite (limit ${CUDA_SUITE_SECONDS:-300} s)"
timeout "${CUDA_SUITE_SECONDS:-300}" python -m pytest -m cuda -v -rA tests \
    > "$report/cuda_suite.txt" 2>&1
echo "exit status $?" >> "$report/cuda_suite.txt"
tail -n 40 "$report/cuda_suite.txt"

echo "== benchmark.py train, ours and timm (limit ${BENCHMARK_SECONDS:-240} s)"
timeout "${BENCHMARK_SECONDS:-240}" python scripts/benchmark.py train --amp --setups ours,timm \
    > "$report/benchmark_train.txt" 2>&1
echo "exit status $?" >> "$report/benchmark_train.txt"
tail -n 40 "$report/benchmark_train.txt"
