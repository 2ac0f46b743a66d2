#!/usr/bin/env bash
# The stability study's run 2 at a budget two CPU cores afford (docs/studies/results.md §3.1): ResNet-18
# (CIFAR stem) W4A4 with LSQ on the first 10 classes of CIFAR-100 (5,000 train / 1,000 test
# images), 3 epochs at batch 64; AdamW vs S-Adam residual vs S-Adam reference (k=2), 3 seeds, then
# AdamW at each S-Adam cell's effective lr (`adamw-effective`: of the reference cell).  Two lanes share the two cores (one thread each);
# every cell is a `qat-sadam compare` call and finished cells are reused.
#   QAT_SADAM_DATA=../shared/data bash tools/studies/cpu_resnet18_study.sh lane1 & (lane2, lane3 likewise); then exports, report
set -euo pipefail
QS=${QS:-.venv/bin/qat-sadam}
OUT=${OUT:-runs/study-resnet18-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
C() { $QS compare resnet18 --quiet --out "$OUT" --seeds 1 \
        --set data.classes=10 --set epochs=3 --set data.batch_size=64 --set export.enabled=false "$@"; }
CELLS=adamw,sadam,sadam-reference@k=2

lane1() {
  C --first-seed 0 --optimizers $CELLS
  C --first-seed 1 --optimizers adamw,sadam
  C --first-seed 0 --optimizers sadam-reference@k=2,adamw-effective
  C --first-seed 1 --optimizers sadam,adamw-effective@of=sadam
}

lane2() {
  C --first-seed 2 --optimizers $CELLS
  C --first-seed 1 --optimizers sadam-reference@k=2
  C --first-seed 0 --optimizers sadam,adamw-effective@of=sadam
  C --first-seed 2 --optimizers sadam-reference@k=2,adamw-effective
}

lane3() {  # started beside the two lanes once sadam seed 2 had finished
  C --first-seed 2 --optimizers sadam,adamw-effective@of=sadam
  C --first-seed 1 --optimizers sadam-reference@k=2,adamw-effective
}

exports() {  # seed 0 of the trained cells, exported and run on ONNX Runtime CPU
  C --report-only --export cpu-x86-vnni --optimizers adamw,sadam,sadam-reference@k=2
}

report() {
  C --seeds 3 --report-only \
    --optimizers adamw,sadam,sadam-reference@k=2,adamw-effective,adamw-effective@of=sadam
}

"${1:?lane1, lane2 or report}"
