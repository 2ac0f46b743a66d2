#!/usr/bin/env bash
# The paper's Tiny ImageNet set-up through `qat-sadam compare` on a GPU machine, three seeds side by
# side. Data: .cache/tin/tinyimagenet_subset.npz (a copy of ../shared/data's, 27 MB, carried over).
#   PHASE_TIMEOUT=150 bash tools/studies/gpu_tinyimagenet_study.sh
set -uo pipefail
PY=${PY:-python3}
RESULTS=${RESULTS:-runs/gpu-tinyimagenet}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 QAT_SADAM_CACHE=.cache
mkdir -p "$(dirname "$RESULTS")"
$PY -c "from qat_sadam.train.data import load_data; d = load_data({'name': 'tinyimagenet', 'root': '.cache/tin'}); print(d.train.x.shape)"
for s in 0 1 2; do
  timeout "${PHASE_TIMEOUT:-150}" $PY -m qat_sadam compare paper_cnn_tinyimagenet \
    --optimizers adamw,sadam-reference@k=8,adamw-effective,prox_sgd,sadam --seeds 1 --first-seed $s \
    --out "$RESULTS" --quiet --set data.root=.cache/tin --set device=cuda > "${RESULTS}-seed$s.log" 2>&1 &
done
wait
ls "$RESULTS"/*/
