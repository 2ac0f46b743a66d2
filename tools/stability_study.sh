#!/usr/bin/env bash
# The depthwise stability study (docs/results.md, "Low-bit fine-tuning of depthwise networks"): a
# float checkpoint fine-tuned at low bit widths under AdamW, AdamW with or without BatchNorm
# re-estimation, Nagel et al.'s dampening and freezing, S-Adam (residual, reference, with freezing),
# and the effective-lr control of each S-Adam cell; INT8 accuracy on ORT with the ladder.
#   QAT_SADAM_DATA=../shared/data bash tools/finetune_study.sh float mobilenet_v2     # the checkpoint first
#   QAT_SADAM_DATA=../shared/data bash tools/stability_study.sh mobilenet_v2 4 3      # MODEL BITS SEEDS
#   CELLS=adamw,sadam bash tools/stability_study.sh mobilenet_v2 4 1                   # a subset of the cells
#   SPLIT=val CELLS="adamw@lr=1.5e-4,adamw,adamw@lr=1.5e-3" bash tools/stability_study.sh mobilenet_v2 4 1
#     lr tuning: 10% of the training images held out and scored (torch), nothing exported,
#     into runs/stability/MODEL-wBITS-val
#   FLOAT=heldout SPLIT=val CELLS=... bash tools/stability_study.sh mobilenet_v2 4 1
#     the same from runs/MODEL_float-heldout (finetune_study.sh float-heldout), which never saw the
#     held-out images; with or without SPLIT=val every run trains on the other 90% only, into
#     runs/stability/MODEL-wBITS-heldout[-val]
# Each cell is one `qat-sadam compare` cell (finished ones are reused, so the study resumes); the
# fine-tune recipe's schedule (cosine) applies to every optimizer. One thread per process.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
model=$1 bits=$2 seeds=${3:-3}
freeze="freezing.enabled=true"
all="adamw@bn_reestimate_batches=0,adamw,adamw@dampening.enabled=true,adamw@$freeze"
all+=",sadam,adamw-effective@of=sadam,sadam-reference,adamw-effective@of=sadam-reference"
all+=",sadam@$freeze,adamw-effective@$freeze@of=sadam@$freeze"
out="runs/stability/$model-w$bits" split=()
if [ "${FLOAT:-all}" = heldout ]; then
  out+="-heldout" split+=(--set "model.checkpoint=runs/${model}_float-heldout" --set data.val_split=0.1)
fi
if [ "${SPLIT:-test}" = val ]; then
  out+="-val" split+=(--set data.val_split=0.1 --set data.eval_on=val --set export.enabled=false)
else
  split+=(--export export/cpu-x86.yaml)
fi
.venv/bin/qat-sadam compare "recipes/${model}_finetune.yaml" --bits "$bits" --seeds "$seeds" --quiet \
    --out "$out" "${split[@]}" --optimizers "${CELLS:-$all}"
