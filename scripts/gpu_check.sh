#!/usr/bin/env bash
# The GPU evidence in one time-boxed call (scripts/gpu_check.py says what each section measures):
#   bash scripts/gpu_check.sh [--budget_s 480] [--out DIR]        # --device cuda
#   bash scripts/gpu_check.sh --device cpu --tiny                 # the same checks at toy sizes (the tests)
# Works from a plain checkout (no pip install): the repository goes on PYTHONPATH. The interpreter is $PYTHON, or
# the first of python3 / python that imports torch (bare GPU machines may have python3 only).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=""
for candidate in ${PYTHON:-} python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  echo "gpu_check.sh: no python3 or python that imports torch (set PYTHON=...)" >&2
  exit 2
fi
exec "$py" scripts/gpu_check.py "$@"
