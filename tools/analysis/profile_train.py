"""Where the time of a GroupMamba training step goes: a torch.profiler table of the CUDA kernels.

    python tools/analysis/profile_train.py --arch tiny --batch-size 128 [--eager] [--trace t.json]

Training step as in benchmark.py (forward, loss, backward, AdamW; bf16 autocast, random data).
Prints the top operators by their kernels' own CUDA time, then the step's wall time, the summed
kernel time (the difference is launch gaps and host time) and the selective scan's share.
"""
import argparse

import torch

from mmgroupmamba.analysis.speed import profile_training
from mmgroupmamba.models import GroupMambaClassifier


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3, help='profiled steps')
    parser.add_argument('--eager', action='store_true', help='without torch.compile')
    parser.add_argument('--rows', type=int, default=30, help='operators in the table')
    parser.add_argument('--trace', help='also write a Chrome trace to this file')
    return parser.parse_args()


def main():
    args = parse_args()
    model = GroupMambaClassifier(args.arch, torch_compile=not args.eager)
    prof = profile_training(model, args.batch_size, steps=args.steps)
    events = prof.key_averages()
    print(events.table(sort_by='self_device_time_total', row_limit=args.rows,
                       max_name_column_width=70))
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time for e in kernels) / 1e3 / args.steps
    scan_ms = sum(e.device_time for e in kernels if 'scan' in e.name) / 1e3 / args.steps
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    print(f'per step: {(end - start) / 1e3 / args.steps:.1f} ms wall (first to last kernel), '
          f'{kernel_ms:.1f} ms in {len(kernels) // args.steps} kernels, '
          f'scan {scan_ms:.1f} ms ({100 * scan_ms / kernel_ms:.1f}%)')
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == '__main__':
    main()
