#!/usr/bin/env bash
# Table 1: every method x every CIFAR-100 pair x trials (default 5), each with its published settings.
#   bash scripts/run_cifar_distill.sh --dry-run              # print every command
#   bash scripts/run_cifar_distill.sh --trials 1 --gpus 0,1  # run them with scripts/launch.py (skips finished runs)
#   bash scripts/run_cifar_distill.sh --protocol repdistiller --dry-run   # every method with one recipe (docs/reproducing.md)
# Other flags go to scripts/commands.py (--protocol, --methods, --pairs, --save_dir, --data_folder, --extra).
source "$(dirname "$0")/_sweep.sh"
sweep distill "$@"
