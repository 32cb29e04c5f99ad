"""Where the time of a GroupMamba training step goes: a torch.profiler table of the CUDA kernels.

    python benchmarks/profile_train.py --arch tiny --batch-size 128 [--eager] [--trace t.json]

Training step as in benchmark_classifier.py (forward, loss, backward, AdamW; bf16 autocast,
random data). First times ``--timed-steps`` untraced steps (throughput and peak memory, as
benchmark_classifier.py), then traces ``--steps`` and prints: the top operators by their kernels'
own CUDA time, the kernel time by kind of kernel (GEMM, Inductor's fused kernels, scan, ...), the
most expensive kernels, and the step's wall time against its summed kernel time (the difference
is launch gaps and host time).
"""
import argparse

from mmgroupmamba.models import GroupMambaClassifier
from mmgroupmamba.models.compiling import COMPILE_MODES

from common.speed import profile_summary, profile_training


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
    print()
    print(profile_summary(prof, args.steps, args.kernels))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == '__main__':
    main()
