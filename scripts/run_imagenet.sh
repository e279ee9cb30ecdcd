#!/usr/bin/env bash
# Table 2 (ImageNet): ResNet18 and MobileNetV1 from scratch, then KD, AT+KD, DKD, QUEST, letKD-1, letKD-2 for
# ResNet34 -> ResNet18 and ResNet50 -> MobileNetV1 (teachers: torchvision's weights). 14 runs, 1 trial, after
# an offline stage that builds each teacher's letKD/QUEST quantizers (2 commands, one GPU each).
#   bash scripts/run_imagenet.sh --dry-run                                   # print every command
#   bash scripts/run_imagenet.sh --gpus_per_job 8                            # one machine: each run on 8 GPUs
#   bash scripts/run_imagenet.sh --backend slurm --partition gpu --gpus_per_job 8 --timeout_min 2880 --mem_gb 256
#   bash scripts/run_imagenet.sh --protocol letkd --dry-run       # every run with the letKD/QUEST recipe (docs/distributed.md)
# Other flags go to scripts/commands.py (--protocol, --methods, --save_dir, --data_folder, --extra).
source "$(dirname "$0")/_sweep.sh"
sweep imagenet "$@"
