"""FLOPs and parameters of a GroupMamba model, selective scan included.

    python tools/analysis/get_flops.py configs/mask_rcnn/gm_t_1x_coco.py --shape 800 1280
    python tools/analysis/get_flops.py configs/upernet/<config>.py --shape 512 2048
    python tools/analysis/get_flops.py --arch tiny --shape 224 224

How each number is counted: see mmgroupmamba/analysis/flops.py.
"""
import argparse

from mmengine.config import DictAction

from mmgroupmamba.analysis.flops import classifier_flops, config_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument('config', nargs='?',
                        help='detection, segmentation or classification config')
    target.add_argument('--arch', choices=('tiny', 'small', 'base'),
                        help='count a bare GroupMambaClassifier instead of a config')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=None,
                        help='input height and width (default: 224 224 for --arch, else 800 1280)')
    parser.add_argument('--no-scan', action='store_true',
                        help='leave the selective scan uncounted (a plain fvcore count)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config keys')
    args = parser.parse_args()

    if args.arch:
        report = classifier_flops(args.arch, args.shape or (224, 224), count_scan=not args.no_scan)
        name = f'GroupMambaClassifier({args.arch})'
    else:
        report = config_flops(args.config, args.shape or (800, 1280), args.cfg_options,
                              count_scan=not args.no_scan)
        name = args.config
    print(f'{name}\ninput shape: {tuple(report.input_shape)}\n'
          f'FLOPs: {report.flops / 1e9:.2f} G (multiply-adds counted once)\n'
          f'params: {report.params / 1e6:.2f} M')
    for op, flops in report.by_operator.most_common():
        print(f'  {op:>20}: {flops / 1e9:9.3f} G')
    if report.unsupported:
        print('not counted (element-wise or unpriced): '
              + ', '.join(sorted(op.split('::')[-1] for op in report.unsupported)))


if __name__ == '__main__':
    main()
