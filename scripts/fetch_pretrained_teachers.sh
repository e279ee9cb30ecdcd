#!/usr/bin/env bash
# Fetch RepDistiller's published CIFAR-100 teachers into save/models/<name>_vanilla/ckpt_epoch_240.pth.
# RepDistiller's own server is dead; mdistiller's GitHub release 'checkpoints' holds the same files
# (same keys) as cifar_teachers.tar. After unpacking, every file is loaded strictly into its
# architecture (weights_only) and its sha256 printed.
#   bash scripts/fetch_pretrained_teachers.sh [--dry-run] [--save_dir ./save]
set -euo pipefail
URL=https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar
save_dir=./save; dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --save_dir) save_dir=$2; shift ;;
    *) echo "error: unknown flag $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
run() { if [ "$dry" = 1 ]; then echo "$*"; else "$@"; fi; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
run mkdir -p "$save_dir/models"
run curl -fL --retry 3 -o "$tmp/cifar_teachers.tar" "$URL"
run tar -xf "$tmp/cifar_teachers.tar" -C "$tmp"
if [ "$dry" = 1 ]; then
  echo "# then: move every <name>_vanilla/ folder found in the archive to $save_dir/models/ and verify it"
  exit 0
fi
found=0
while IFS= read -r ckpt; do
  folder=$(dirname "$ckpt"); name=$(basename "$folder")
  rm -rf "${save_dir:?}/models/$name"
  mv "$folder" "$save_dir/models/$name"
  found=$((found + 1))
done < <(find "$tmp" -path '*_vanilla/ckpt_epoch_240.pth')
[ "$found" -gt 0 ] || { echo "error: no <name>_vanilla/ckpt_epoch_240.pth in the archive" >&2; exit 1; }
"${PYTHON:-python}" - "$save_dir" <<'PY'
import hashlib, sys
from pathlib import Path
from helper.options import teacher_name_from_path
from train_student import load_teacher
for ckpt in sorted(Path(sys.argv[1], 'models').glob('*_vanilla/ckpt_epoch_240.pth')):
    name = teacher_name_from_path(str(ckpt))
    load_teacher(str(ckpt), name, 100, trust=False)
    print(f'{ckpt}  {name}  sha256 {hashlib.sha256(ckpt.read_bytes()).hexdigest()}  loads strictly')
PY
