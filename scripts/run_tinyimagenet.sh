#!/usr/bin/env bash
# Table 3 (Tiny-ImageNet): teachers, students from scratch, then every method x pair x trials (default 3).
#   bash scripts/run_tinyimagenet.sh --dry-run              # print every command
#   bash scripts/run_tinyimagenet.sh --trials 1 --gpus 0,1  # run them with scripts/launch.py (skips finished runs)
#   bash scripts/run_tinyimagenet.sh --protocol letkd --dry-run   # every method with one recipe (docs/reproducing.md)
# Other flags go to scripts/commands.py (--protocol, --methods, --pairs, --save_dir, --data_folder, --extra).
source "$(dirname "$0")/_sweep.sh"
sweep tinyimagenet "$@"
