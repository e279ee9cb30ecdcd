#!/usr/bin/env bash
# Every CIFAR-100 teacher and every Table-1 student from scratch (train_teacher.py).
#   bash scripts/run_cifar_vanilla.sh --dry-run              # print every command
#   bash scripts/run_cifar_vanilla.sh --trials 1 --gpus 0,1  # run them with scripts/launch.py (skips finished runs)
# Other flags go to scripts/commands.py (--methods, --pairs, --save_dir, --data_folder, --extra).
source "$(dirname "$0")/_sweep.sh"
sweep vanilla "$@"
