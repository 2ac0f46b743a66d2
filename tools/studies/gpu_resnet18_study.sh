#!/usr/bin/env bash
# ResNet-18 (CIFAR stem) W4A4 on a CIFAR-100 subset, AdamW vs S-Adam residual vs S-Adam reference
# (and AdamW at each S-Adam cell's effective lr),
# three seeds run side by side on one GPU, then the table, the plots and an INT8 export of seed 0's
# S-Adam run validated on ONNX Runtime CPU. Data: .cache/gpu (15,000 train / 5,000 test images
# of CIFAR-100, made by tools/studies/make_gpu_subset.py because the device machine takes 64 MiB at most).
#   EPOCHS=10 DEVICE=cuda OUT=/tmp/out bash tools/studies/gpu_resnet18_study.sh
set -uo pipefail
EPOCHS=${EPOCHS:-10}
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-runs/gpu-resnet18}
EXTRA=${EXTRA:-}
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CELLS="adamw,sadam,sadam-reference@k=2,adamw-effective,adamw-effective@of=sadam"
ARGS="resnet18 --optimizers $CELLS --seeds 1 --out $RESULTS --quiet \
  --set data.root=.cache/gpu --set epochs=$EPOCHS --set device=$DEVICE --set export.target=cpu-x86-vnni $EXTRA"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
mkdir -p "$(dirname "$RESULTS")"
start=$(date +%s)
for s in 0 1 2; do
  timeout "${PHASE_TIMEOUT:-400}" $PY -m qat_sadam compare $ARGS --first-seed $s > "${RESULTS}-seed$s.log" 2>&1 &
done
wait
echo "three seeds done in $(( $(date +%s) - start )) s"
timeout 90 $PY -m qat_sadam compare ${ARGS/--seeds 1/--seeds 3}
timeout 150 $PY -m qat_sadam export "$RESULTS/sadam/seed0" --target cpu-x86-vnni -o "$RESULTS/sadam/seed0/export" --data-root .cache/gpu
tail -n 3 "${RESULTS}"-seed*.log
