"""Launch geometry of the N = 1 scan kernels: kernel time per tile, to choose ``plan``'s table.

    python tools/analysis/sweep_scan_tiles.py                  # GroupMamba-T shapes, fp32
    python tools/analysis/sweep_scan_tiles.py --shapes 128x87x196 --warps 2 4 8 --top 10

For each shape (``batch x dim x L``, one group scanning left to right, N = 1) every tile of
``block_d`` channels x ``block_t`` steps run by ``warps`` warps is timed, replayed from a CUDA
graph (kernel time alone), forward and backward, next to the geometry ``plan`` picks now.
Forward chunks keep ``plan``'s length (backward must cut the sequence where forward saved its
states); backward tries that length and its multiples. Prints the fastest tiles per shape.
"""
import torch
import triton

from mmgroupmamba.analysis.kernels import graph_ms, scan_benchmark_parser, scan_inputs
from mmgroupmamba.ops import triton_scan_n1
from mmgroupmamba.ops.triton_scan_n1 import LaunchConfig


def parse_args():
    parser = scan_benchmark_parser(__doc__)
    parser.add_argument('--block-d', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32])
    parser.add_argument('--warps', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--max-tile', type=int, default=4096,
                        help='largest block_d * block_t tried')
    parser.add_argument('--top', type=int, default=5)
    parser.add_argument('--rep', type=int, default=60, help='milliseconds of timing per tile')
    return parser.parse_args()


def candidate_tiles(dim: int, block_t: int, args) -> list:
    tiles = []
    for block_d in args.block_d:
        if block_d > triton.next_power_of_2(dim) or block_d * block_t > args.max_tile:
            continue
        # At least one element of the tile per thread.
        tiles += [LaunchConfig(block_d, block_t, w) for w in args.warps
                  if block_d * block_t >= 32 * w]
    return tiles


def sweep_shape(batch: int, dim: int, L: int, dtype: torch.dtype, args):
    inputs = scan_inputs(batch, dim, L, 1, dtype)
    scan_args = tuple(inputs.values())
    dy = torch.randn_like(inputs['u'])
    current_fwd, current_bwd = triton_scan_n1.plan(batch, dim, 1, L)

    def forward(cfg):
        return triton_scan_n1.forward(*scan_args, out_dtype=dtype, cfg=cfg)

    _, states = forward(current_fwd)

    def backward(cfg):
        return triton_scan_n1.backward(*scan_args, dy=dy, states=states,
                                       fwd_block_t=current_fwd.block_t, cfg=cfg)

    fwd_tiles = candidate_tiles(dim, current_fwd.block_t, args)
    bwd_tiles = []
    block_t = current_fwd.block_t
    while block_t <= max(current_bwd.block_t, min(2048, triton.next_power_of_2(L))):
        bwd_tiles += candidate_tiles(dim, block_t, args)
        block_t *= 2
    results = {}
    for name, run, tiles, current in (('forward', forward, fwd_tiles, current_fwd),
                                      ('backward', backward, bwd_tiles, current_bwd)):
        times = {cfg: graph_ms(lambda: run(cfg), args.rep) for cfg in dict.fromkeys(
            [current, *tiles])}
        results[name] = (current, times)
    return results


def _tile(cfg: LaunchConfig) -> str:
    return f'{cfg.block_d}x{cfg.block_t} w{cfg.warps}'


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(f'GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  '
          f'triton {triton.__version__}  dtype {args.dtype}  (kernel ms, CUDA-graph replay)')
    for batch, dim, L in args.shapes:
        shape = f'{batch}x{dim}x{L}'
        for name, (current, times) in sweep_shape(batch, dim, L, dtype, args).items():
            ranked = sorted(times.items(), key=lambda item: item[1])
            best = ', '.join(f'{_tile(cfg)} {ms:.4f}' for cfg, ms in ranked[:args.top])
            print(f'{shape} {name}: plan {_tile(current)} {times[current]:.4f} ms | '
                  f'best {best}', flush=True)


if __name__ == '__main__':
    main()
