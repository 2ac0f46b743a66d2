#!/usr/bin/env bash
# The accuracy ladder of docs/finetune.md: float -> PTQ -> QAT fine-tune at W8A8 and W4A4 (and W3A3
# for MobileNetV2), CIFAR-100 first 10 classes, one thread per process. Float runs first:
#   QAT_SADAM_DATA=../shared/data bash tools/finetune_study.sh float resnet18
#   QAT_SADAM_DATA=../shared/data bash tools/finetune_study.sh ladder mobilenet_v2 "8 4 3" "0 1 2"
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
Q=".venv/bin/qat-sadam"
case "$1" in
  float)
    $Q train "recipes/$2_float.yaml" --out "runs/$2_float" --quiet ;;
  ladder)
    for bits in $3; do
      for seed in $4; do
        [ -f "runs/finetune/$2/ptq-w$bits-s$seed/summary.json" ] || \
          $Q ptq "recipes/$2_finetune.yaml" --bits "$bits" --set seed="$seed" --out "runs/finetune/$2/ptq-w$bits-s$seed" --force --quiet
        [ -f "runs/finetune/$2/qat-w$bits-s$seed/export/validation.json" ] || \
          $Q train "recipes/$2_finetune.yaml" --bits "$bits" --seed "$seed" --out "runs/finetune/$2/qat-w$bits-s$seed" --force --quiet
      done
    done ;;
esac
