"""Launch geometry of the depthwise stencil kernel: kernel time per tile, to choose ``plan``.

    python benchmarks/sweep_depthwise_tiles.py                      # GroupMamba-T, batch 128
    python benchmarks/sweep_depthwise_tiles.py --maps "stage 1 FFN" --warps 4 8 --top 10

For each of the variant's depthwise maps (``common.kernels.depthwise_maps``: the FFN's
channels-last maps with GELU, the SS2D mixer's NCHW maps with SiLU) every tile of
``rows`` output rows x ``block_w`` columns x ``block_c`` channels run by ``warps`` warps is timed,
replayed from a CUDA graph (kernel time alone), in the stencil's three passes as training runs
them: ``forward`` (convolution and activation), ``activation_grad`` (the convolution recomputed
for the activation's slope; the FFN's also writes the activation, as its backward asks) and
``dgrad`` (the input gradient, the kernel's taps turned; the weight-gradient kernel that
``backward`` also runs does not depend on the tile). Prints the fastest tiles per map and pass
next to the one ``plan`` picks for that pass, with the bandwidth of one read and one write of
the map.
"""
import torch
import triton

from mmgroupmamba.ops.triton import depthwise_conv as stencil

from common.kernels import (candidate_stencil_tiles, depthwise_maps, graph_ms,
                            maps_benchmark_parser, print_sweep)

PASSES = ('forward', 'activation_grad', 'dgrad')


def parse_args():
    parser = maps_benchmark_parser(__doc__)
    parser.add_argument('--maps', nargs='+', help='map names (default: all), e.g. "stage 1 FFN"')
    parser.add_argument('--passes', nargs='+', default=list(PASSES), choices=PASSES)
    parser.add_argument('--rows', type=int, nargs='+', default=[1, 2, 4, 8, 16])
    parser.add_argument('--warps', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--top', type=int, default=5)
    parser.add_argument('--rep', type=int, default=40, help='milliseconds of timing per tile')
    return parser.parse_args()


def _runs(x, weight, bias, grad, activation, channels_last):
    """Pass name -> ``run(cfg)``."""
    return {
        'forward': lambda cfg: stencil.forward(x, weight, bias, activation, cfg=cfg),
        'activation_grad': lambda cfg: stencil.activation_grad(
            grad, x, weight, bias, activation, with_output=channels_last, cfg=cfg),
        'dgrad': lambda cfg: stencil.backward(grad, x, weight, True, cfg=cfg),
    }


def _tile(cfg: stencil.StencilConfig) -> str:
    return f'{cfg.rows} x {cfg.block_w}w x {cfg.block_c}c, {cfg.warps} warps'


def main():
    args = parse_args()
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
          f'{triton.__version__}, bfloat16, batch {args.batch_size}, {args.image_size}px')
    for name, shape, channels_last, activation in depthwise_maps(args.arch, args.batch_size,
                                                                 args.image_size):
        if args.maps and name not in args.maps:
            continue
        x = torch.randn(shape, device='cuda', dtype=torch.bfloat16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(shape[1], 1, 3, 3, device='cuda')
        bias = torch.randn(shape[1], device='cuda')
        grad = torch.randn_like(x)
        nbytes = 2 * x.numel() * x.element_size()
        tiles = candidate_stencil_tiles(shape, channels_last, args.rows, args.warps)
        runs = _runs(x, weight, bias, grad, activation, channels_last)
        layout = 'NHWC' if channels_last else 'NCHW'
        for pass_name in args.passes:
            planned = stencil.plan(x, mirrored=pass_name == 'dgrad')
            # dict.fromkeys: the planned tile first, each tile once.
            times = {cfg: graph_ms(lambda: runs[pass_name](cfg), args.rep)
                     for cfg in dict.fromkeys([planned, *tiles])}
            print_sweep(f'{name} {tuple(shape)} {layout}, {activation}, {pass_name}', times,
                        planned, nbytes, args.top, _tile)


if __name__ == '__main__':
    main()
