#!/usr/bin/env bash
# The accuracy ladder of docs/studies/finetune.md: float -> PTQ -> QAT fine-tune at W8A8 and W4A4 (and W3A3
# for MobileNetV2), CIFAR-100 first 10 classes, one thread per process. Float runs first:
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh float resnet18
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh float-heldout mobilenet_v2
#     the float model trained without the 10% of training images that data.val_split: 0.1 holds
#     out (a fixed split), so that a fine-tune's lr can be tuned on images neither run has seen;
#     FLOAT_SEED=N (N > 0) trains another such model with seed N, into runs/MODEL_float-heldout-sN
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh ladder mobilenet_v2 "8 4 3" "0 1 2"
# The fine-tune lr, chosen on a validation split (10% of the training images, data.eval_on: val,
# no export), then the chosen lr's cell on the test set with export and the ladder:
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh lrsweep resnet18 8 "5e-5 1.5e-4 5e-4"
# The edge formats (docs/guide/runtimes.md): each fine-tune exported to the qnn-htp profile (INT4 weight
# storage, uint16 activations) with the ladder, then run on every runtime that takes its format:
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh edge mobilenet_v2 "W8A8 W4A8 W8A16 W4A4" "0"
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
Q=".venv/bin/qat-sadam"
case "$1" in
  float)
    $Q train "$2_float" --out "runs/$2_float" --quiet ;;
  float-heldout)
    fs=${FLOAT_SEED:-0}
    $Q train "$2_float" --out "runs/$2_float-heldout$([ "$fs" = 0 ] || echo "-s$fs")" --seed "$fs" \
      --set data.val_split=0.1 --quiet ;;
  ladder)
    for bits in $3; do
      for seed in $4; do
        [ -f "runs/finetune/$2/ptq-w$bits-s$seed/summary.json" ] || \
          $Q ptq "$2_finetune" --bits "$bits" --set seed="$seed" --out "runs/finetune/$2/ptq-w$bits-s$seed" --force --quiet
        [ -f "runs/finetune/$2/qat-w$bits-s$seed/export/validation.json" ] || \
          $Q train "$2_finetune" --bits "$bits" --seed "$seed" --out "runs/finetune/$2/qat-w$bits-s$seed" --force --quiet
      done
    done ;;
  edge)
    for bits in $3; do
      for seed in $4; do
        run="runs/finetune/$2/edge-$bits-s$seed"
        # qnn-htp takes 8- and 16-bit activations; a sub-8-bit cell (W4A4) goes to mobile-arm, HTP among its runtimes
        case "$bits" in
          *A16) tgt=qnn-htp; rts="qnn-htp,ort-web" ;;
          *A8) tgt=qnn-htp; rts="qnn-htp,ort-web,openvino,executorch-xnnpack" ;;
          *) tgt=mobile-arm; rts="qnn-htp,ort-web,openvino,executorch-xnnpack" ;;
        esac
        [ -f "$run/export/validation.json" ] || \
          $Q train "$2_finetune" --bits "$bits" --seed "$seed" --out "$run" --force --quiet --set export.target=$tgt
        [ -f "$run/export-runtimes/validation.json" ] || \
          $Q export "$run" --target $tgt --runtimes "$rts" --out "$run/export-runtimes" || true  # a failed gate is a result
      done
    done ;;
  lrsweep)
    sweep="runs/finetune/$2/lr-sweep"
    for lr in $4; do
      [ -f "$sweep/w$3-lr$lr/summary.json" ] || \
        $Q train "$2_finetune" --bits "$3" --out "$sweep/w$3-lr$lr" --force --quiet \
          --set optimizer.lr="$lr" --set data.val_split=0.1 --set data.eval_on=val --set export.enabled=false
    done
    best=$(.venv/bin/python -c 'import json, sys
accs = {lr: json.load(open(f"{sys.argv[1]}/w{sys.argv[2]}-lr{lr}/summary.json"))["final_acc"] for lr in sys.argv[3:]}
for lr, acc in accs.items(): print(f"w{sys.argv[2]} lr {lr}: val acc {acc:.3f}", file=sys.stderr)
print(max(accs, key=accs.get))' "$sweep" "$3" $4)
    echo "w$3: lr $best chosen on the validation split"
    [ -f "runs/finetune/$2/qat-w$3-lr$best-s0/export/validation.json" ] || \
      $Q train "$2_finetune" --bits "$3" --out "runs/finetune/$2/qat-w$3-lr$best-s0" --force --quiet \
        --set optimizer.lr="$best" ;;
esac
