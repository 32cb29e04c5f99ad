"""Time of one training iteration and its peak memory for detection / segmentation configs.

    python tools/analysis/benchmark_iter.py configs/mask_rcnn/gm_t_1x_coco.py \
        mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --shape 800 1216 --batch-size 2 --amp
    python tools/analysis/benchmark_iter.py configs/upernet/gm_t_160k_ade20k.py \
        mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py --shape 512 512

Each iteration is the runner's own ``model.train_step`` with the config's optimizer wrapper
(AmpOptimWrapper with --amp) on random images with random ground truth. Pretrained checkpoints
are not loaded (the weights do not change the time). SyncBN becomes BN on one process. A backbone
with ``torch_compile`` compiles during the warm-up steps.
"""
import argparse

import torch
from mmengine.config import DictAction

from mmgroupmamba.analysis.iteration import measure_train_iteration


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--amp', action='store_true', help='also time under AMP (fp16 autocast)')
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--device', default=None)
    parser.add_argument('--dynamic-shapes', action='store_true',
                        help='compile for dynamic sizes from the first step: the graph that '
                             'detection training (a new image size nearly every batch) runs '
                             'after its first change of size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='overrides applied to every config, e.g. model.backbone.with_cp=True')
    args = parser.parse_args()
    if args.dynamic_shapes:
        torch._dynamo.config.assume_static_by_default = False

    rows = []
    for config in args.configs:
        for amp in ([False, True] if args.amp else [False]):
            result = measure_train_iteration(config, tuple(args.shape), args.batch_size,
                                             amp=amp, steps=args.steps, device=args.device,
                                             cfg_options=args.cfg_options)
            rows.append((config, 'amp' if amp else 'fp32', result))
            print(f'{config} [{rows[-1][1]}]: {result}', flush=True)
    print(f'\nbatch {args.batch_size}, {args.shape[0]}x{args.shape[1]}')
    print('| config | precision | s / iter | peak GiB | params (M) |')
    print('|---|---|---|---|---|')
    for config, precision, r in rows:
        peak = '-' if r['peak_gib'] is None else f"{r['peak_gib']:.2f}"
        print(f"| {config} | {precision} | {r['seconds']:.3f} | {peak} | {r['params_m']:.1f} |")


if __name__ == '__main__':
    main()
