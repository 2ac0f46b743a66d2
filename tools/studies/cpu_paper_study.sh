#!/usr/bin/env bash
# The stability study's CPU runs on the paper's small CNN (docs/studies/results.md), as two queues that
# share this machine's two cores (one thread each).  Every cell is a `qat-sadam compare` call, so
# each can be rerun alone; finished cells are reused.
#   QAT_SADAM_DATA=../shared/data bash tools/studies/cpu_paper_study.sh [queue1|queue2]
set -euo pipefail
QS=${QS:-.venv/bin/qat-sadam}
R=paper_cnn_cifar100
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C() { $QS compare "$R" --quiet "$@"; }

queue1() {
  # Run 1 completed: the paper's cells at lr 1e-3 plus S-Adam reference k=2 and AdamW at the
  # residual estimator's effective lr.
  C --seeds 3 --out runs/study-paper-cifar100 \
    --optimizers adamw,sadam-reference@k=8,adamw-effective,prox_sgd,sadam,adamw-effective@of=sadam,sadam-reference@k=2
  lr_sensitivity
}

lr_sensitivity() {
  # Final accuracy across lr (the lr 1e-3 points are the cells above), seed by seed so that a
  # cut-short study still covers every lr.
  for seed in 0 1 2; do
    for lr in 0.0001 0.0003 0.003; do
      C --seeds 1 --first-seed $seed --out runs/study-paper-cifar100 --optimizers "adamw@lr=$lr,sadam@lr=$lr,sadam-reference@k=2@lr=$lr"
    done
  done
}

tuned_baseline() {
  # The AdamW setting that won the validation sweep (cosine, lr 5e-4), on the test set.
  C --seeds 3 --set schedule.name=cosine --out runs/study-paper-cifar100-cosine --optimizers adamw@lr=0.0005
}

queue2() {
  # Equal-budget tuning on a validation split (10% of the training set; test set untouched):
  # six residual-estimator settings against six AdamW lr / schedule settings, seed 0.
  local V=(--seeds 1 --set data.val_split=0.1 --set data.eval_on=val)
  C "${V[@]}" --out runs/tune-paper-val \
    --optimizers sadam,sadam@lam=1,sadam@lam=4,sadam@radius_multiple=0.5,sadam@radius_multiple=2,sadam@rho_ema=0.99,adamw@lr=0.0001,adamw@lr=0.0003,adamw@lr=0.0005,adamw
  C "${V[@]}" --out runs/tune-paper-val-cosine --set schedule.name=cosine --optimizers adamw@lr=0.0005,adamw
  # 4 bits on the same CNN (levels -8..7, scale 7/max|x|, the paper's 4-bit quantizer).
  C --seeds 3 --bits 4 --set quant.weight.max_level=7 --set quant.activation.max_level=7 --out runs/study-paper-4bit \
    --optimizers adamw,sadam-reference@k=2,adamw-effective,sadam,adamw-effective@of=sadam
  # The paper's small-batch, high-noise setting: batch 8, two epochs, one seed.
  C --seeds 1 --set data.batch_size=8 --set epochs=2 --out runs/study-paper-batch8 \
    --optimizers adamw,sadam-reference@k=8,adamw-effective,sadam,adamw-effective@of=sadam
}

"${1:-queue1}"
