"""Depthwise 3x3 convolution speed on one GPU: the project's Triton op next to cuDNN.

    python benchmarks/benchmark_depthwise_conv.py                 # GroupMamba-T, batch 128
    python benchmarks/benchmark_depthwise_conv.py --dtype float32 --batch-size 64

The maps are GroupMamba-T's at 224x224: each stage's FFN convolution (channels-last, hidden
width, followed by GELU) and SS2D convolution (NCHW, the stage's width, followed by SiLU). Per
map: forward, and backward (input, weight and bias gradients) through autograd, of the op
(``depthwise_conv2d(..., activation=...)``, the activation in its kernel) and of cuDNN
(``F.conv2d`` on the same layout, weights cast to the map's dtype as autocast would, then the
activation); ``--no-activation`` times the convolutions alone. The bandwidth column is the op's
forward (the map read once and written once, over its time) next to a plain copy of the map,
the bound a stencil could reach. Times are medians of CUDA-event timings after warm-up.
"""
import torch
import torch.nn.functional as F
import triton

from mmgroupmamba.ops import depthwise_conv2d

from common.kernels import maps_benchmark_parser, depthwise_maps, kernel_ms

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def parse_args():
    parser = maps_benchmark_parser(__doc__)
    parser.add_argument('--dtype', default='bfloat16', choices=list(DTYPES))
    parser.add_argument('--no-activation', action='store_true',
                        help='the convolutions without the activations that follow them')
    return parser.parse_args()


def forward_backward_ms(conv, x, weight, bias):
    """(forward ms, backward ms) of ``conv(x, weight, bias)``."""
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    grad_y = torch.randn_like(x)
    forward = kernel_ms(lambda: conv(*inputs), rep=100)
    y = conv(*inputs)
    backward = kernel_ms(lambda: torch.autograd.grad(y, inputs, grad_y, retain_graph=True),
                         rep=100)
    return forward, backward


_ACTIVATIONS = {None: lambda y: y, 'silu': F.silu, 'gelu': F.gelu}


def op(activation):
    return lambda x, weight, bias: depthwise_conv2d(x, weight, bias, activation=activation)


def cudnn(activation):
    def conv(x, weight, bias):
        y = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype), padding=1, groups=x.shape[1])
        return _ACTIVATIONS[activation](y)
    return conv


def main():
    args = parse_args()
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = True
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, triton '
          f'{triton.__version__}, {args.dtype}, batch {args.batch_size}, {args.image_size}px')
    print('| map | shape (B, C, H, W) | layout, activation | op fwd ms | op bwd ms | cuDNN fwd ms '
          '| cuDNN bwd ms | op fwd GB/s | copy GB/s |')
    print('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
    totals = [0., 0., 0., 0.]
    for name, shape, channels_last, activation in depthwise_maps(args.arch, args.batch_size,
                                                       args.image_size):
        activation = None if args.no_activation else activation
        x = torch.randn(shape, device='cuda', dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(shape[1], 1, 3, 3, device='cuda')
        bias = torch.randn(shape[1], device='cuda')
        times = [*forward_backward_ms(op(activation), x, weight, bias),
                 *forward_backward_ms(cudnn(activation), x, weight, bias)]
        totals = [t + s for t, s in zip(totals, times)]
        nbytes = 2 * x.numel() * x.element_size()
        copy_ms = kernel_ms(x.clone, rep=100)
        layout = ('NHWC' if channels_last else 'NCHW') + f', {activation or "none"}'
        print(f'| {name} | {tuple(shape)} | {layout} | ' + ' | '.join(f'{t:.3f}' for t in times)
              + f' | {nbytes / times[0] / 1e6:.0f} | {nbytes / copy_ms / 1e6:.0f} |')
    print('| all maps | | | ' + ' | '.join(f'{t:.3f}' for t in totals) + ' | | |')


if __name__ == '__main__':
    main()
