r"""Selective-scan speed on one GPU: Triton kernels next to the torch (reference) path.

    python benchmarks/benchmark_scan.py                      # GroupMamba-T shapes, fp32
    python benchmarks/benchmark_scan.py --dtype bfloat16 --shapes 128x16x3136

Shapes are ``batch x dim x L``: one channel group scanning left to right, N = 1, with D,
delta_bias and softplus as in the model; ``--all-directions`` scans four groups instead, one per
direction, over the most nearly square ``H x W`` map of ``L`` tokens, as the model does:

    python benchmarks/benchmark_scan.py --all-directions --shapes 128x64x3136 128x128x784 \
        128x348x196 128x448x49 2x64x60800 2x448x950

Effective bandwidth counts the bytes of u, delta, B and C read and y written, over forward time.
Times are medians of CUDA-event timings after warm-up, with the L2 cache flushed before each
call; a call's Python and launch work counts when it takes longer than that flush. The "graph"
columns replay the Triton calls as captured CUDA graphs: kernel time alone.
"""
import torch
import triton

from mmgroupmamba.ops import torch_scan

from mmgroupmamba.ops.triton import scan as triton_scan

from common.kernels import (graph_ms, kernel_ms, scan_benchmark_parser, scan_inputs,
                            scan_io_bytes)


def parse_args():
    parser = scan_benchmark_parser(__doc__)
    parser.add_argument('--state-dim', type=int, default=1)
    parser.add_argument('--all-directions', action='store_true',
                        help='four channel groups, one per scan direction (dim divisible by 4)')
    return parser.parse_args()


def benchmark_shape(batch, dim, L, N, dtype, all_directions=False):
    """Returns ``{backend: (forward ms, backward ms)}`` and the bytes the forward must move."""
    inputs = scan_inputs(batch, dim, L, N, dtype, all_directions=all_directions)
    args = tuple(inputs.values())
    dy = torch.randn_like(inputs['u'])
    times = {}
    for name, backend in (('triton', triton_scan), ('torch', torch_scan)):
        _, saved = backend.scan_forward(*args, dtype)
        times[name] = (kernel_ms(lambda: backend.scan_forward(*args, dtype)),
                       kernel_ms(lambda: backend.scan_backward(*args, dy, saved)))
    _, saved = triton_scan.scan_forward(*args, dtype)
    times['graph'] = (graph_ms(lambda: triton_scan.scan_forward(*args, dtype)),
                      graph_ms(lambda: triton_scan.scan_backward(*args, dy, saved)))
    return times, scan_io_bytes(inputs)


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(f'GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  '
          f'triton {triton.__version__}  dtype {args.dtype}  N {args.state_dim}  '
          f'directions {"all four" if args.all_directions else "left_right"}')
    header = (f'{"shape":>14} | {"triton fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9} | '
              f'{"graph fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9} | '
              f'{"torch fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9}')
    print(header)
    print('-' * len(header))
    for batch, dim, L in args.shapes:
        shape = f'{batch}x{dim}x{L}'
        times, io_bytes = benchmark_shape(batch, dim, L, args.state_dim, dtype,
                                           args.all_directions)
        cells = []
        for name in ('triton', 'graph', 'torch'):
            fwd, bwd = times[name]
            cells.append(f'{fwd:13.4f} {bwd:8.4f} {io_bytes / fwd / 1e6:9.0f}')
        print(f'{shape:>14} | ' + ' | '.join(cells))


if __name__ == '__main__':
    main()
