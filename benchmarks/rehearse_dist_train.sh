#!/usr/bin/env bash
# Rehearsal of the headline job through the shipped entry point and config:
#
#   bash benchmarks/rehearse_dist_train.sh WORK_DIR [CONFIG [KEY=VALUE ...]]
#
# `tools/dist_train.sh CONFIG 1` (one rank through torchrun and DDP; NCCL on a GPU) on a
# COCO-format toy dataset at COCO-like sizes (640 px on the longer side, landscape and portrait,
# so the pipeline's 1333x800 resize gives changing sizes as on COCO), in two runs: the first
# epoch (training, a validation, a checkpoint), then a resume from that checkpoint for the
# second. CONFIG defaults to configs/mask_rcnn/gm_t_1x_coco.py, as shipped except: the dataset,
# its three classes, a random-weight backbone checkpoint in place of the ImageNet one (written by
# tools/cls2backbone.py from a random classifier, so the config's pretrained loading runs) and a
# logging interval of 10 iterations. Then benchmarks/summarize_run.py prints iteration time,
# memory and loss per window of iterations, the validations and where the resume started.
#
# Sizes come from the environment: NUM_TRAIN (600: 300 iterations per epoch at the config's
# batch of 2), NUM_VAL (50), IMAGE_SIZE (640), MAX_OBJECTS (12). KEY=VALUE pairs after CONFIG
# join both runs' --cfg-options, e.g. `model.backbone.torch_compile=False` for the eager backbone.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mkdir -p "$1" && cd "$1" && pwd)
config=${2:-$root/configs/mask_rcnn/gm_t_1x_coco.py}
shift $(( $# >= 2 ? 2 : 1 ))
python=${PYTHON:-python}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

data=$work/data
if [ ! -f "$data/annotations/val.json" ]; then
  "$python" "$root/tools/make_toy_data.py" coco "$data" --image-size "${IMAGE_SIZE:-640}" \
    --num-train "${NUM_TRAIN:-600}" --num-val "${NUM_VAL:-50}" \
    --max-objects "${MAX_OBJECTS:-12}" --aspect-ratios 0.75 0.667 1 1.333 1.5
fi
if [ ! -f "$work/backbone.pth" ]; then
  "$python" - "$work/classifier.pth" <<'EOF'
import sys

import torch

from mmgroupmamba.models import GroupMambaClassifier

torch.manual_seed(0)
torch.save({'state_dict': GroupMambaClassifier('tiny').state_dict()}, sys.argv[1])
EOF
  "$python" "$root/tools/cls2backbone.py" "$work/classifier.pth" "$work/backbone.pth"
fi

dataset=()
for split in train val test; do
  dataset+=("${split}_dataloader.dataset.data_root=$data/"
            "${split}_dataloader.dataset.ann_file=annotations/${split/test/val}.json"
            "${split}_dataloader.dataset.data_prefix.img=${split/test/val}/"
            "${split}_dataloader.dataset.metainfo.classes=[circle,square,triangle]")
done
options=("${dataset[@]}"
         "val_evaluator.ann_file=$data/annotations/val.json"
         "test_evaluator.ann_file=$data/annotations/val.json"
         "model.roi_head.bbox_head.num_classes=3" "model.roi_head.mask_head.num_classes=3"
         "model.backbone.init_cfg.checkpoint=$work/backbone.pth"
         "default_hooks.logger.interval=10")

run() {
  PYTHON="$python" bash "$root/tools/dist_train.sh" "$config" 1 --work-dir "$work/run" "$@"
}
echo "== first epoch: training, validation, checkpoint"
run --cfg-options "${options[@]}" "$@" train_cfg.max_epochs=1
echo "== resume for the second epoch"
run --resume --cfg-options "${options[@]}" "$@" train_cfg.max_epochs=2
"$python" "$root/benchmarks/summarize_run.py" "$work/run"
