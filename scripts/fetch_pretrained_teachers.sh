#!/usr/bin/env bash
# Fetch RepDistiller's published CIFAR-100 teachers into save/models/<name>_vanilla/ckpt_epoch_240.pth.
# RepDistiller's own server is dead; mdistiller's GitHub release 'checkpoints' holds the same files
# (same keys) as cifar_teachers.tar. After unpacking, every file is loaded strictly into its
# architecture (weights_only) and its sha256 printed.
#   bash scripts/fetch_pretrained_teachers.sh [--dry-run] [--save_dir ./save]
set -euo pipefail
URL=https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar
# the teachers of RepDistiller's 13 CIFAR-100 pairs (scripts/settings.py CIFAR_TEACHERS; vgg13 and ResNet50 for the
# extended sweep's vgg13 -> vgg8 / MobileNetV2 and ResNet50 -> MobileNetV2 / vgg8)
TEACHERS="wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50"
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
  echo "# expected: $(for t in $TEACHERS; do printf '%s ' "$save_dir/models/${t}_vanilla/ckpt_epoch_240.pth"; done)"
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
missing=""
for t in $TEACHERS; do
  [ -f "$save_dir/models/${t}_vanilla/ckpt_epoch_240.pth" ] || missing="$missing $t"
done
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
if [ -n "$missing" ]; then
  echo "error: the archive has no teacher for:$missing. Train one (python train_teacher.py --model NAME --trial 0) and copy" >&2
  echo "  its ckpt_epoch_240.pth to $save_dir/models/NAME_vanilla/ckpt_epoch_240.pth (the sweeps' teacher path)" >&2
  exit 1
fi
