r"""Time of one training iteration and its peak memory for detection / segmentation configs.

    python benchmarks/benchmark_iter.py configs/mask_rcnn/gm_t_1x_coco.py \
        mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --shape 800 1216 --batch-size 2 --amp
    python benchmarks/benchmark_iter.py configs/upernet/gm_t_160k_ade20k.py \
        mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py --shape 512 512
    python benchmarks/benchmark_iter.py mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py \
        configs/mask_rcnn/gm_t_1x_coco.py --steps 20 --detection-sizes 12
    python benchmarks/benchmark_iter.py configs/mask_rcnn/gm_t_1x_coco.py \
        mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py --eager --amp   # eager vs published

Each iteration is the runner's own ``model.train_step`` with the config's optimizer wrapper
(AmpOptimWrapper under --precision amp) on random images with random ground truth. Pretrained
checkpoints are not loaded (the weights do not change the time). SyncBN becomes BN on one
process. A backbone with ``torch_compile`` compiles during the warm-up steps; ``--eager`` runs
GroupMamba backbones without it (the published Swin-T configs are eager as they are).

``--detection-sizes N`` then runs one iteration at each of N sizes as mmdet's 1333x800 resize
and padding make them, as detection training changes size nearly every batch: per size, the
time (compilations included), the graphs ``torch.compile`` compiled, the Triton binaries of the
project's kernels compiled and the peak memory; then the median time of the iterations that
compiled nothing.
"""
import argparse
import statistics

from mmengine.config import DictAction

from common.compiling import detection_sizes
from common.iteration import measure_train_iteration


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='+')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--amp', action='store_true',
                        help='also time under AMP (fp16 autocast): --precision fp32 amp')
    parser.add_argument('--precision', nargs='+', choices=['fp32', 'amp'], default=['fp32'])
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--device', default=None)
    parser.add_argument('--detection-sizes', type=int, default=0, metavar='N',
                        help='then one iteration at each of N detection input sizes')
    parser.add_argument('--eager', action='store_true',
                        help='GroupMamba backbones without torch_compile (eager vs eager)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='overrides applied to every config, e.g. model.backbone.with_cp=True')
    args = parser.parse_args()
    sizes = detection_sizes(args.detection_sizes) if args.detection_sizes else []

    precisions = ['fp32', 'amp'] if args.amp else args.precision
    rows = []
    for config in args.configs:
        for precision in precisions:
            result = measure_train_iteration(
                config, tuple(args.shape), args.batch_size, amp=precision == 'amp',
                steps=args.steps,
                device=args.device, cfg_options=args.cfg_options, sizes=sizes, eager=args.eager,
                on_size=lambda row: print(f"  {row['size'][0]}x{row['size'][1]}: "
                                          f"{row['seconds']:.3f} s, {row['graphs']} graphs and "
                                          f"{row['kernels']} kernels compiled, "
                                          f"peak {_gib(row['peak_gib'])} GiB",
                                          flush=True))
            rows.append((config, precision, result))
            print(f"{config} [{precision}]: {result['seconds']:.3f} s, "
                  f"peak {_gib(result['peak_gib'])} GiB", flush=True)
    print(f'\nbatch {args.batch_size}, {args.shape[0]}x{args.shape[1]}')
    print('| config | precision | s / iter | peak GiB | params (M) |')
    print('|---|---|---|---|---|')
    for config, precision, r in rows:
        print(f"| {config} | {precision} | {r['seconds']:.3f} | {_gib(r['peak_gib'])} | "
              f"{r['params_m']:.1f} |")
    if sizes:
        print(f'\nbatch {args.batch_size}, {len(sizes)} detection sizes, one iteration each')
        print('| config | precision | graphs compiled | kernels compiled | '
              'median s / iter without compiling | largest peak GiB |')
        print('|---|---|---|---|---|---|')
        for config, precision, r in rows:
            steady = [row['seconds'] for row in r['sizes'] if not row['graphs'] + row['kernels']]
            median = f'{statistics.median(steady):.3f} ({len(steady)})' if steady else '-'
            peaks = [row['peak_gib'] for row in r['sizes'] if row['peak_gib'] is not None]
            print(f"| {config} | {precision} | {sum(row['graphs'] for row in r['sizes'])} | "
                  f"{sum(row['kernels'] for row in r['sizes'])} | {median} | "
                  f"{_gib(max(peaks, default=None))} |")


def _gib(value):
    return '-' if value is None else f'{value:.2f}'


if __name__ == '__main__':
    main()
