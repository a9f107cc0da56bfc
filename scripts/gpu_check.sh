#!/usr/bin/env bash
# Issue 20's GPU targets in one short run (under 8 minutes on one H200): bench TOAST vs a bare TopDownViT step,
# TOAST-Lite vs TOAST, TOAST's forward vs the backbone's, finetune's training TFLOP/s fraction with and without
# torch.compile / fused AdamW, and a decoded-cache finetune trial's wall time vs steps x step time (+ the loader).
# Figures land in OUT (default results/gpu-check-<date>): bench.csv, loader.csv, trial.json, summary.json.
#
#   scripts/gpu_check.sh [OUT]            # on the GPU machine
#   scripts/gpu_check.sh OUT --smoke      # tiny settings: a CPU smoke test (a minute or two)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
shift || true
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1
export HARNESS_CACHE_DIR="${HARNESS_CACHE_DIR:-$OUT/cache}"
mkdir -p "$OUT"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' | tee "$OUT/device.txt"
"$PY" tests/benchmarks/gpu_targets.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
rm -rf "$OUT/cache"
echo "figures in $OUT"
