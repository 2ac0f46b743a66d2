#!/usr/bin/env bash
# The depthwise stability study (docs/studies/results.md, "Low-bit fine-tuning of depthwise networks"): a
# float checkpoint fine-tuned at low bit widths under AdamW, AdamW with or without BatchNorm
# re-estimation, Nagel et al.'s dampening and freezing, S-Adam (residual, reference, with freezing),
# and the effective-lr control of each S-Adam cell; INT8 accuracy on ORT with the ladder.
#   QAT_SADAM_DATA=../shared/data bash tools/studies/finetune_study.sh float mobilenet_v2     # the checkpoint first
#   QAT_SADAM_DATA=../shared/data bash tools/studies/stability_study.sh mobilenet_v2 4 3      # MODEL BITS SEEDS
#   CELLS=adamw,sadam bash tools/studies/stability_study.sh mobilenet_v2 4 1                   # a subset of the cells
#   SPLIT=val CELLS="adamw@lr=1.5e-4,adamw,adamw@lr=1.5e-3" bash tools/studies/stability_study.sh mobilenet_v2 4 1
#     lr tuning: 10% of the training images held out and scored (torch), nothing exported,
#     into runs/stability/MODEL-wBITS-val
#   FLOAT=heldout SPLIT=val CELLS=... bash tools/studies/stability_study.sh mobilenet_v2 4 1
#     the same from runs/MODEL_float-heldout (finetune_study.sh float-heldout), which never saw the
#     held-out images; with or without SPLIT=val every run trains on the other 90% only, into
#     runs/stability/MODEL-wBITS-heldout[-val]; FLOAT_SEED=N (N > 0) starts from the held-out float
#     model of seed N (runs/MODEL_float-heldout-sN), into runs/stability/MODEL-wBITS-heldout-sN[-val]
#   JOBS=2 ... bash tools/studies/stability_study.sh mobilenet_v2 3 3
#     one process per (seed, cell), JOBS at a time (logs in OUT/logs/): the cells first, then each
#     adamw-effective@...@of=X control with its X (reused), then the tables over all of them
# Each cell is one `qat-sadam compare` cell (finished ones are reused, so the study resumes); the
# fine-tune recipe's schedule (cosine) applies to every optimizer. One thread per process.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
model=$1 bits=$2 seeds=${3:-3}
freeze="freezing.enabled=true"
all="adamw@bn_reestimate_batches=0,adamw,adamw@dampening.enabled=true,adamw@$freeze"
all+=",sadam,adamw-effective@of=sadam,sadam-reference,adamw-effective@of=sadam-reference"
all+=",sadam@$freeze,adamw-effective@$freeze@of=sadam@$freeze"
out="runs/stability/$model-w$bits" split=()
if [ "${FLOAT:-all}" = heldout ]; then
  tag=-heldout; [ "${FLOAT_SEED:-0}" = 0 ] || tag+="-s$FLOAT_SEED"
  out+="$tag" split+=(--set "model.checkpoint=runs/${model}_float$tag" --set data.val_split=0.1)
fi
if [ "${SPLIT:-test}" = val ]; then
  out+="-val" split+=(--set data.val_split=0.1 --set data.eval_on=val --set export.enabled=false)
else
  split+=(--export cpu-x86)
fi
cells=${CELLS:-$all} jobs=${JOBS:-1}
compare() {
  .venv/bin/qat-sadam compare "${model}_finetune" --bits "$bits" --quiet --out "$out" "${split[@]}" "$@"
}
in_parallel() {  # reads "SEED CELLS" lines; runs each as one compare, $jobs at a time; fails if any did
  local s c pid failed=0 pids=()
  mkdir -p "$out/logs"
  while read -r s c; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=1; done
    compare --seeds 1 --first-seed "$s" --optimizers "$c" > "$out/logs/seed$s-${c//[^A-Za-z0-9.-]/_}.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || { echo "a cell failed: see $out/logs/" >&2; exit 1; }
}
if [ "$jobs" -gt 1 ]; then
  IFS=, read -ra list <<< "$cells"
  for c in "${list[@]}"; do
    [[ $c != adamw-effective* || $c == *@of=* ]] || { echo "JOBS: name the S-Adam cell of $c with @of=" >&2; exit 2; }
  done
  pairs() {  # "SEED CELLS" lines: the cells (1) or each effective-lr control after its S-Adam cell (2)
    for s in $(seq 0 $((seeds - 1))); do
      for c in "${list[@]}"; do
        if [[ $c != adamw-effective* ]]; then [ "$1" = 1 ] && echo "$s $c"
        else [ "$1" = 2 ] && echo "$s ${c#*@of=},$c"; fi
      done
    done; true
  }
  pairs 1 | in_parallel
  pairs 2 | in_parallel
  compare --seeds "$seeds" --optimizers "$cells" --report-only
else
  compare --seeds "$seeds" --optimizers "$cells"
fi
