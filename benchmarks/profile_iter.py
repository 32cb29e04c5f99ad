r"""Where the time of a detection or segmentation training iteration goes: torch.profiler tables.

    python benchmarks/profile_iter.py configs/upernet/gm_t_160k_ade20k.py --shape 512 512
    python benchmarks/profile_iter.py configs/mask_rcnn/gm_t_1x_coco.py --shape 800 1216 \
        --cfg-options model.backbone.torch_compile=True

The iteration is benchmark_iter.py's (the config's ``train_step`` on random data). Prints the top
operators by their own host time and by their kernels' device time, then the kernel time by kind,
the most expensive kernels, and the iteration's wall time against its summed kernel time (the
difference is launch gaps and host time).
"""
import argparse

from mmengine.config import DictAction

from common.iteration import profile_train_iteration
from common.speed import profile_summary


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, default=[800, 1216], metavar=('H', 'W'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--amp', action='store_true', help='fp16 autocast (AmpOptimWrapper)')
    parser.add_argument('--steps', type=int, default=3, help='profiled iterations')
    parser.add_argument('--rows', type=int, default=25, help='operators per table')
    parser.add_argument('--kernels', type=int, default=20, help='kernels listed by name')
    parser.add_argument('--device', default=None)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='config overrides, e.g. model.backbone.torch_compile=True')
    parser.add_argument('--trace', help='also write a Chrome trace to this file')
    args = parser.parse_args()

    prof = profile_train_iteration(args.config, tuple(args.shape), args.batch_size, amp=args.amp,
                                   steps=args.steps, device=args.device,
                                   cfg_options=args.cfg_options)
    events = prof.key_averages()
    for sort_by in ('self_cpu_time_total', 'self_device_time_total'):
        print(f'\n{args.config}: operators by {sort_by} over {args.steps} iterations')
        print(events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    print(profile_summary(prof, args.steps, args.kernels))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == '__main__':
    main()
