#!/usr/bin/env bash
# Every method (the letKD Table-1 methods, RepDistiller's other criteria, ReviewKD, OFD, DIST, CTKD, MLKD and the
# +LS / +DOT variants) x RepDistiller's 13 CIFAR-100 pairs x trials (default 5), each with its published settings;
# the letKD/QUEST quantizers first (offline stages). Cells a method cannot run are listed as '# left out:' lines.
#   bash scripts/run_cifar_extended.sh --dry-run                     # print every command
#   bash scripts/run_cifar_extended.sh --protocol letkd --dry-run    # every method with the letKD authors' recipe
#   bash scripts/run_cifar_extended.sh --trials 1 --gpus 0,1         # run them with scripts/launch.py (skips finished runs)
# Other flags go to scripts/commands.py (--methods, --pairs, --protocol, --save_dir, --data_folder, --extra).
source "$(dirname "$0")/_sweep.sh"
sweep extended "$@"
