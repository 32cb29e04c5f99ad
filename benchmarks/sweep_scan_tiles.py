"""Launch geometry of the N = 1 scan kernels: kernel time per tile, to choose ``plan``'s table.

    python benchmarks/sweep_scan_tiles.py                  # GroupMamba-T shapes, fp32
    python benchmarks/sweep_scan_tiles.py --shapes 128x87x196 --warps 2 4 8 --top 10

For each shape (``batch x dim x L``, one group scanning left to right, N = 1) every tile of
``block_d`` channels x ``block_t`` steps run by ``warps`` warps is timed, replayed from a CUDA
graph (kernel time alone), forward and backward, next to the geometry ``plan`` picks now.
Chunk lengths run from 128 steps to the first that covers the sequence (``--block-t`` sets
them); backward skips those that do not start where forward saved a state. Prints the fastest
tiles per shape.
"""
import torch
import triton

from mmgroupmamba.ops.triton.scan_n1 import LaunchConfig

from common.kernels import scan_benchmark_parser, sweep_scan_tiles


def parse_args():
    parser = scan_benchmark_parser(__doc__)
    parser.add_argument('--block-d', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32])
    parser.add_argument('--block-t', type=int, nargs='+', help='chunk lengths (powers of two)')
    parser.add_argument('--passes', nargs='+', default=['forward', 'backward'],
                        choices=['forward', 'backward'])
    parser.add_argument('--warps', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--max-tile', type=int, default=4096,
                        help='largest block_d * block_t tried')
    parser.add_argument('--top', type=int, default=5)
    parser.add_argument('--rep', type=int, default=60, help='milliseconds of timing per tile')
    return parser.parse_args()


def _tile(cfg: LaunchConfig) -> str:
    return f'{cfg.block_d}x{cfg.block_t} w{cfg.warps}'


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(f'GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  '
          f'triton {triton.__version__}  dtype {args.dtype}  (kernel ms, CUDA-graph replay)')
    for batch, dim, L in args.shapes:
        shape = f'{batch}x{dim}x{L}'
        for name, current, times in sweep_scan_tiles(
                batch, dim, L, dtype, block_ds=args.block_d, block_ts=args.block_t,
                warps=args.warps, max_tile=args.max_tile, rep=args.rep, passes=args.passes):
            ranked = sorted(times.items(), key=lambda item: item[1])
            best = ', '.join(f'{_tile(cfg)} {ms:.4f}' for cfg, ms in ranked[:args.top])
            print(f'{shape} {name}: plan {_tile(current)} {times[current]:.4f} ms | '
                  f'best {best}', flush=True)


if __name__ == '__main__':
    main()
