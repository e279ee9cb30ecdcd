#!/usr/bin/env bash
# One command that checks the GPU path end to end and prints one table (target: < 8 min on one H100):
# generated CIFAR-format data, every registered method for a few dozen steps on both paths, a kill + resume,
# the offline K=4096 quantizer on the device, and bench_train.py for kd and letkd2.
#   bash scripts/gpu_check.sh                          # --device cuda
#   bash scripts/gpu_check.sh --device cpu --tiny      # the same steps at toy sizes (what CI runs)
# Other flags: --work_dir DIR (default: a temp folder), --methods m1 m2 ... (default: every registered method).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
