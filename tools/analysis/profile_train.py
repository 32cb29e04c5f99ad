"""Where the time of a GroupMamba training step goes: a torch.profiler table of the CUDA kernels.

    python tools/analysis/profile_train.py --arch tiny --batch-size 128 [--eager] [--trace t.json]

Training step as in benchmark.py (forward, loss, backward, AdamW; bf16 autocast, random data).
First times ``--timed-steps`` untraced steps (throughput and peak memory, as benchmark.py), then
traces ``--steps`` and prints: the top operators by their kernels' own CUDA time, the kernel time
by kind of kernel (GEMM, Inductor's fused kernels, scan, ...), the most expensive kernels, and the
step's wall time against its summed kernel time (the difference is launch gaps and host time).
"""
import argparse
from collections import defaultdict

import torch

from mmgroupmamba.analysis.speed import kernel_kind, profile_training
from mmgroupmamba.models import GroupMambaClassifier
from mmgroupmamba.models.groupmamba import COMPILE_MODES


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=3, help='profiled steps')
    parser.add_argument('--timed-steps', type=int, default=10,
                        help='untraced steps per timed window before profiling (0: no timing)')
    parser.add_argument('--kernels', type=int, default=25, help='kernels listed by name')
    parser.add_argument('--eager', action='store_true', help='without torch.compile')
    parser.add_argument('--compile-mode', default='default', choices=COMPILE_MODES,
                        help="torch.compile mode ('reduce-overhead': CUDA graphs)")
    parser.add_argument('--rows', type=int, default=30, help='operators in the table')
    parser.add_argument('--trace', help='also write a Chrome trace to this file')
    return parser.parse_args()


def main():
    args = parse_args()
    compile_mode = False if args.eager else args.compile_mode
    model = GroupMambaClassifier(args.arch, torch_compile=compile_mode)
    prof, timing = profile_training(model, args.batch_size, steps=args.steps,
                                    timed_steps=args.timed_steps)
    if timing is not None:
        print(f"untraced: {timing['images_per_s']:.1f} img/s "
              f"({timing['step_ms']:.1f} ms per step), peak {timing['peak_gib']:.2f} GiB, "
              f"warm-up {timing['warmup_s']:.1f} s")
    events = prof.key_averages()
    print(events.table(sort_by='self_device_time_total', row_limit=args.rows,
                       max_name_column_width=70))
    # Device-side events minus the annotations the optimizer and autograd place on the GPU timeline.
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, 'is_user_annotation', False)]
    kernel_ms = sum(e.device_time for e in kernels) / 1e3 / args.steps
    by_kind, by_name = defaultdict(lambda: [0., 0]), defaultdict(lambda: [0., 0])
    for event in kernels:
        for table, key in ((by_kind, kernel_kind(event.name)), (by_name, event.name)):
            table[key][0] += event.device_time / 1e3 / args.steps
            table[key][1] += 1
    print('\nkernel time per step by kind:')
    for kind, (ms, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f'  {kind:<20} {ms:8.2f} ms {100 * ms / kernel_ms:5.1f}%  '
              f'{count // args.steps:5d} launches')
    print(f'\ntop {args.kernels} kernels per step:')
    for name, (ms, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.kernels]:
        print(f'  {ms:7.2f} ms {count // args.steps:4d}x  {kernel_kind(name):<18} {name[:110]}')
    scan_ms = by_kind['selective scan'][0]
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    print(f'per step: {(end - start) / 1e3 / args.steps:.1f} ms wall (first to last kernel), '
          f'{kernel_ms:.1f} ms in {len(kernels) // args.steps} kernels, '
          f'scan {scan_ms:.1f} ms ({100 * scan_ms / kernel_ms:.1f}%)')
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == '__main__':
    main()
