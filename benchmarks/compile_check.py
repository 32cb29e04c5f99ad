r"""Whether the compiled GroupMamba backbone follows changing image sizes: graphs compiled per size,
time per call and errors against eager.

    python benchmarks/compile_check.py --detection-sizes 20 --batch-size 2 --device cuda
    python benchmarks/compile_check.py --arch tiny --sizes 512x512 512x683 640x480 --eval
    python benchmarks/compile_check.py --backend aot_eager --sizes 64x96 80x112 96x80
    python benchmarks/compile_check.py --arch tiny --detection-sizes 4 --batch-size 2 \
        --device cuda --dynamic-shapes    # one dynamic graph from the first size

A size that compiles a graph after the first change of size means the compiled graph is
specialised on the size (each new detection batch would compile again). ``--backend aot_eager``
checks what Dynamo and AOTAutograd trace, without Inductor, much faster.
"""
import argparse

from mmgroupmamba.models.compiling import COMPILE_MODES

from common.compiling import check_compiled_backbone, detection_sizes

ONE_BLOCK_ARCH = dict(embed_dims=(64, 128, 348, 448), depths=(1, 1, 1, 1), stem_channels=32,
                      mlp_ratios=(8, 8, 4, 4))


def _size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a size is HxW, e.g. 800x1216, got {text!r}')
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f'sizes must be positive, got {text!r}')
    return h, w


def _print_row(row) -> None:
    grad = f"{row['gradient_error']:.1e}" if 'gradient_error' in row else '-'
    print(f"| {row['size'][0]}x{row['size'][1]} | {row['graphs']} | {row['seconds']:.2f} | "
          f"{row['output_error']:.1e} | {grad} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='one-block',
                        choices=['one-block', 'tiny', 'small', 'base'],
                        help="a variant, or one block per stage at GroupMamba-T's widths "
                             "(default; compiles in minutes on a small CPU)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument('--sizes', type=_size, nargs='+', metavar='HxW')
    sizes.add_argument('--detection-sizes', type=int, metavar='N',
                       help="N sizes as mmdet's 1333x800 keep-ratio resize padded to 32 makes them")
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--eval', action='store_true', help='inference only (no gradients)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--mode', default='default', choices=COMPILE_MODES)
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--dynamic-shapes', action='store_true',
                        help='compile for dynamic sizes from the first size (no static graph)')
    args = parser.parse_args()

    arch = ONE_BLOCK_ARCH if args.arch == 'one-block' else args.arch
    sizes = args.sizes or detection_sizes(args.detection_sizes or 3)
    print('| size | graphs compiled | seconds | output error | gradient error |')
    print('|---|---:|---:|---:|---:|', flush=True)
    rows = check_compiled_backbone(arch, sizes, batch_size=args.batch_size, train=not args.eval,
                                   device=args.device, mode=args.mode, backend=args.backend,
                                   dynamic=args.dynamic_shapes, on_row=_print_row)
    # A static graph and then a dynamic one, or one dynamic graph: later sizes reuse it.
    settled = 1 if args.dynamic_shapes else 2
    later = sum(row['graphs'] for row in rows[settled:])
    print(f"\n{len(rows)} sizes; graphs compiled after the {('first', 'second')[settled - 1]} "
          f'size: {later}')


if __name__ == '__main__':
    main()
