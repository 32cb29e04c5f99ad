"""The block's fused norms on one GPU: the project's Triton kernels next to PyTorch's operators.

    python benchmarks/benchmark_norms.py                 # GroupMamba-T's token maps, batch 128

Per stage's (B, H, W, C) token map at 224x224, forward and backward together (CUDA graph
replay, kernel time alone) of each fused op of ``mmgroupmamba.ops.fused`` and of its
plain-operator reference (``*_ref``: PyTorch's LayerNorm, transposed copy, mean and adds, as the
block ran them before), as the block calls them under bf16 autocast: ``layer_norm`` (a float32
stream normalised into float32), ``mixer_norm`` (the layer's input norm, with the bf16
channel-major tokens and the channel means) and ``add_layer_norm`` (the residual sum with a bf16
branch, normalised into bf16 for the FFN). GB/s counts the forward's and backward's map reads
and writes at their dtypes over the op's time.
"""
import argparse

import torch
import triton

from mmgroupmamba.ops import fused

from common.kernels import graph_ms, token_maps


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--rep', type=int, default=50, help='milliseconds of timing per case')
    return parser.parse_args()


def cases(shape):
    """Op name -> (fused call, reference call, bytes moved): each call runs forward and
    backward with random output gradients, in the dtypes the block uses."""
    B, H, W, C = shape
    x = torch.randn(shape, device='cuda', requires_grad=True)
    branch = torch.randn(shape, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(C, device='cuda', requires_grad=True)
    bias = torch.randn(C, device='cuda', requires_grad=True)
    f32 = torch.randn(shape, device='cuda')
    b16 = torch.randn(shape, device='cuda', dtype=torch.bfloat16)
    tokens = torch.randn(B, C, H * W, device='cuda', dtype=torch.bfloat16)
    mean = torch.randn(B, C, device='cuda')
    n = x.numel()

    def call(fn, *args, grads):
        # autograd.grad, not backward: no accumulation into .grad, which would add a pass.
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        return lambda: torch.autograd.grad(list(_tuple(fn(*args))), leaves, grads)

    def pair(name, *args, grads):
        return (call(getattr(fused, name), *args, grads=grads),
                call(getattr(fused, name + '_ref'), *args, grads=grads))

    return {
        # x read, out written; backward: x, grad read, grad_x written (float32).
        'layer_norm': (*pair('layer_norm', x, weight, bias, 1e-6, torch.float32, grads=[f32]),
                       n * 4 * 5),
        # x read, out and tokens written; backward: x, 2 gradients read, grad_x written.
        'mixer_norm': (*pair('mixer_norm', x, weight, bias, 1e-5, torch.bfloat16, True,
                             grads=[f32, tokens, mean]), n * (4 * 6 + 2 * 2)),
        # x and branch read, total and out written; backward: total and 2 gradients read,
        # grad_x and grad_branch written.
        'add_layer_norm': (*pair('add_layer_norm', x, branch, weight, bias, 1e-6,
                                 torch.bfloat16, grads=[f32, b16]), n * (4 * 6 + 2 * 4)),
    }


def _tuple(out):
    return out if isinstance(out, tuple) else (out, )


def main():
    args = parse_args()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
              f'{triton.__version__}, batch {args.batch_size}, {args.image_size}px, forward + '
              'backward')
        print('| op | map (B, H, W, C) | fused ms | plain ops ms | speed-up | fused GB/s |')
        print('| --- | --- | ---: | ---: | ---: | ---: |')
        for name, shape in token_maps(args.arch, args.batch_size, args.image_size):
            for op, (ours, plain, nbytes) in cases(shape).items():
                ours_ms, plain_ms = graph_ms(ours, args.rep), graph_ms(plain, args.rep)
                print(f'| {op} | {name} {shape} | {ours_ms:.3f} | {plain_ms:.3f} | '
                      f'{plain_ms / ours_ms:.2f}x | {nbytes / ours_ms / 1e6:.0f} |')


if __name__ == '__main__':
    main()
