#!/usr/bin/env bash
# The quickstart: Mask R-CNN with a GroupMamba-T backbone, trained from scratch on the CPU on a
# small generated COCO-format dataset, then evaluated (COCO bbox and segm AP) with pictures of
# its predictions. About 20 minutes on 2 CPU cores after the environment exists.
#
#   bash tools/quickstart.sh            (WORK_DIR=... to write elsewhere than work_dirs/quickstart)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash tools/setup_env.sh

python=.venv/bin/python
config=configs/mask_rcnn/gm_t_toy_coco.py
data=data/toy_coco
work_dir=${WORK_DIR:-work_dirs/quickstart}
say() { printf '\n[quickstart] %s\n' "$*"; }

if [ ! -f "$data/annotations/val.json" ]; then
  say "making the toy dataset in $data"
  "$python" tools/make_toy_data.py coco "$data"
fi

say "training $config (log every 10 iterations; checkpoint and val metrics at the end)"
start=$(date +%s)
"$python" tools/train.py "$config" --work-dir "$work_dir"
checkpoint=$(cat "$work_dir/last_checkpoint")
say "trained in $(( $(date +%s) - start )) s"

say "testing $checkpoint: COCO bbox/segm AP and pictures of the predictions"
test_dir="$work_dir/test"
"$python" tools/test.py "$config" "$checkpoint" --work-dir "$test_dir" --show-dir pictures \
  --out "$test_dir/predictions.pkl"

log=$(ls -t "$test_dir"/*/*.log | head -n 1)
pictures=$(ls -td "$test_dir"/*/pictures | head -n 1)
say "done
  metrics:     $log (the 'coco/bbox_mAP' and 'coco/segm_mAP' lines)
  pictures:    $pictures (boxes and masks drawn on the val images)
  checkpoint:  $checkpoint
  predictions: $test_dir/predictions.pkl"
grep -o 'coco/bbox_mAP: [0-9.]*\|coco/segm_mAP: [0-9.]*' "$log" | tail -n 2
