"""Launch geometry of the token LayerNorm kernels: kernel time per tile, to choose their plan.

    python benchmarks/sweep_norm_tiles.py                        # GroupMamba-T, batch 128
    python benchmarks/sweep_norm_tiles.py --stages 3 4 --passes backward --top 10

A program of ``ops.triton.layer_norm`` normalises ``BLOCK_L`` rows of all ``C`` channels with
``warps`` warps. For each stage's token map (``common.kernels.token_maps``) every ``BLOCK_L`` of
``--rows`` and warp count of ``--warps`` is timed, replayed from a CUDA graph (kernel time
alone), in the three variants the block runs: ``residual`` (the residual sum before the FFN,
its branch scaled per image, bf16 output), ``mixer`` (the GroupMamba layer's input norm, with the
channel-major bf16 copy and the channel means) and ``backward`` (every gradient input: output,
channel-major copy, means, the residual stream's, and the residual's gradient written scaled).
Prints the fastest tiles per map and variant next to the planned one, with the bandwidth of the
tensors each variant reads and writes.
"""
import torch
import triton

from mmgroupmamba.ops.triton import layer_norm

from common.kernels import graph_ms, maps_benchmark_parser, print_sweep, token_maps

VARIANTS = ('residual', 'mixer', 'backward')


def parse_args():
    parser = maps_benchmark_parser(__doc__)
    parser.add_argument('--stages', type=int, nargs='+', default=[1, 2, 3, 4])
    parser.add_argument('--passes', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--rows', type=int, nargs='+', default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument('--warps', type=int, nargs='+', default=[1, 2, 4, 8])
    parser.add_argument('--top', type=int, default=5)
    parser.add_argument('--rep', type=int, default=40, help='milliseconds of timing per tile')
    return parser.parse_args()


def candidate_tiles(C: int, L: int, rows, warps):
    """``(BLOCK_C, BLOCK_L, warps)`` worth timing: all channels (the kernels need them in one
    program), ``BLOCK_L`` of ``rows`` up to L rounded up to a power of two, and warp counts
    with at least one element per thread."""
    block_c = triton.next_power_of_2(C)
    return [(block_c, r, w) for r in rows for w in warps
            if r <= max(1, triton.next_power_of_2(L)) and 32 * w <= block_c * r]


def runs(B: int, L: int, C: int, device: str = 'cuda'):
    """Variant -> (run(cfg), bytes read and written)."""
    cuda = dict(device=device)
    M = B * L
    x = torch.randn(M, C, **cuda)
    branch = torch.randn(M, C, **cuda, dtype=torch.bfloat16)
    weight, bias = torch.randn(C, **cuda), torch.randn(C, **cuda)
    scale = torch.rand(B, **cuda)
    mean, rstd = torch.randn(M, **cuda), torch.rand(M, **cuda)
    grad_out = torch.randn(M, C, **cuda, dtype=torch.bfloat16)
    grad_tokens = torch.randn(B, C, L, **cuda, dtype=torch.bfloat16)
    grad_means = torch.randn(B, C, **cuda)
    grad_input = torch.randn(M, C, **cuda)
    n = M * C
    return {
        # x (f32) and the branch (bf16) read; the sum (f32) and the output (bf16) written.
        'residual': (lambda cfg: layer_norm.forward(
            x, weight, bias, 1e-6, torch.bfloat16, B, residual=branch, residual_scale=scale,
            cfg=cfg), n * (4 + 2 + 4 + 2)),
        # x (f32) read; the output (f32) and the channel-major tokens (bf16) written.
        'mixer': (lambda cfg: layer_norm.forward(
            x, weight, bias, 1e-5, torch.float32, B, token_dtype=torch.bfloat16,
            channel_means=True, cfg=cfg), n * (4 + 4 + 2)),
        # x, the gradients at the output, tokens and input read; grad_x (f32) and the
        # residual's gradient (bf16) written.
        'backward': (lambda cfg: layer_norm.backward(
            grad_out, x, weight, mean, rstd, B, grad_tokens=grad_tokens, grad_means=grad_means,
            grad_input=grad_input, residual_dtype=torch.bfloat16, residual_scale=scale,
            cfg=cfg), n * (4 + 2 + 2 + 4 + 4 + 2)),
    }


def _tile(cfg) -> str:
    return f'{cfg[1]} rows x {cfg[0]}c, {cfg[2]} warps'


def main():
    args = parse_args()
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
          f'{triton.__version__}, batch {args.batch_size}, {args.image_size}px')
    for stage, (name, (B, H, W, C)) in enumerate(
            token_maps(args.arch, args.batch_size, args.image_size), start=1):
        if stage not in args.stages:
            continue
        L = H * W
        tiles = candidate_tiles(C, L, args.rows, args.warps)
        for variant, (run, nbytes) in runs(B, L, C).items():
            if variant not in args.passes:
                continue
            planned = layer_norm.plan(C, L, backward=variant == 'backward')
            times = {cfg: graph_ms(lambda: run(cfg), args.rep)
                     for cfg in dict.fromkeys([planned, *tiles])}
            print_sweep(f'{name} tokens ({B}, {L}, {C}), {variant}', times, planned, nbytes,
                        args.top, _tile)


if __name__ == '__main__':
    main()
