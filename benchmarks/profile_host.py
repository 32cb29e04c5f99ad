"""Where the host time of an eager GroupMamba training step goes: the host cost of single calls,
then cProfile of whole steps.

    python benchmarks/profile_host.py                     # GroupMamba-T, batch 8, CUDA
    python benchmarks/profile_host.py --batch-size 128 --rows 60

Eager GroupMamba trains host-bound (``profile_train.py --eager`` shows the GPU idle most of a
step at any batch): Python, autograd and a few thousand launches per step set the pace. First,
per call, the host time of a loop of calls whose GPU work is tiny (before synchronising) next to
its wall time: PyTorch operators (an elementwise add, a batched matmul, a linear layer), a bare
Triton launch, and the project's ops, so that the cost of Triton's launch path, of the ops'
Python and of autograd can be told apart. Then the step (forward, loss, backward, AdamW; bf16
autocast, random data, as benchmark_classifier.py) under cProfile: Python functions by their own
time and by cumulated time (a C call such as a launch counts where it is made).
"""
import argparse
import cProfile
import io
import pstats
import time
from typing import Callable, Dict, Tuple

import torch

from mmgroupmamba.models import GroupMambaClassifier
from mmgroupmamba.models.groupmamba import FFN, GroupedSS2D
from mmgroupmamba.ops import SCAN_DIRECTIONS, depthwise_conv2d, selective_scan
from mmgroupmamba.ops.fused import layer_norm

from common.speed import training_step


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=5, help='profiled steps')
    parser.add_argument('--calls', type=int, default=300, help='calls per single-call timing')
    parser.add_argument('--rows', type=int, default=40, help='functions listed per ordering')
    parser.add_argument('--device', default='cuda')
    return parser.parse_args()


def host_cost(fn: Callable[[], object], device: torch.device, calls: int) -> Tuple[float, float]:
    """(host, wall) microseconds per call of ``fn`` over ``calls`` calls after a warm-up: host
    until the last call returns, wall until the device has run them all."""
    for _ in range(10):
        fn()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    _synchronize(device)
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def single_calls(device: torch.device) -> Dict[str, Callable[[], object]]:
    """Small calls by name: single operators and ops (one to three kernels each), and a block's
    mixer and FFN forward and backward (a few dozen each)."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    a = torch.randn(64, 64, **bf16)
    weights, tokens = torch.randn(8, 16, 16, **bf16), torch.randn(8, 16, 64, **bf16)
    linear = torch.nn.Linear(64, 64).to(**bf16)
    maps = torch.randn(2, 64, 8, 8, **bf16)
    maps_grad = maps.clone().requires_grad_()
    conv_weight, conv_bias = torch.randn(64, 1, 3, 3, device=device), torch.randn(64, device=device)
    u, delta = torch.randn(2, 64, 64, device=device), torch.randn(2, 64, 64, device=device)
    A = -torch.rand(64, 1, device=device)
    B, C = torch.randn(2, 4, 1, 64, device=device), torch.randn(2, 4, 1, 64, device=device)
    D, delta_bias = torch.randn(64, device=device), torch.randn(64, device=device)
    norm = torch.nn.LayerNorm(64).to(device)
    rows = torch.randn(2, 8, 8, 64, device=device)
    calls = {
        'torch add, 64x64 bf16': lambda: a + a,
        'torch bmm, 8 x (16x16 @ 16x64) bf16': lambda: torch.bmm(weights, tokens),
        'torch linear, 64x64 bf16 (addmm)': lambda: linear(a),
    }
    if device.type == 'cuda':
        from mmgroupmamba.ops.triton import depthwise_conv as triton_depthwise_conv
        calls['Triton stencil launch (ops.triton module)'] = (
            lambda: triton_depthwise_conv.forward(maps, conv_weight, conv_bias, 'silu'))
    mixer, ffn = GroupedSS2D(64).to(device), FFN(64, 256).to(device)
    mixer_tokens = torch.randn(2, 64, 64, device=device, requires_grad=True)
    rows_grad = rows.clone().requires_grad_()
    calls.update({
        'mixer (ops.mixer), forward and backward': (
            lambda: mixer.forward_tokens(mixer_tokens, (8, 8)).sum().backward()),
        'FFN (ops.fused.ffn), forward and backward': lambda: ffn(rows_grad).sum().backward(),
        'depthwise_conv2d + SiLU, no grad': (
            lambda: depthwise_conv2d(maps, conv_weight, conv_bias, activation='silu')),
        'depthwise_conv2d + SiLU, forward and backward': (
            lambda: depthwise_conv2d(maps_grad, conv_weight, conv_bias,
                                     activation='silu').sum().backward()),
        'selective_scan, 4 directions, no grad': (
            lambda: selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True,
                                   spatial_shape=(8, 8), directions=SCAN_DIRECTIONS)),
        'fused layer_norm, no grad': lambda: layer_norm(rows, norm.weight, norm.bias, norm.eps),
    })
    return calls


def main():
    args = parse_args()
    device = torch.device(args.device)
    print(f'device {device}, torch {torch.__version__}')
    print('host and wall time per call, us:')
    for name, fn in single_calls(device).items():
        with torch.no_grad() if 'no grad' in name else torch.enable_grad():
            host, wall = host_cost(fn, device, args.calls)
        print(f'  {name:48s} {host:9.1f} {wall:9.1f}')

    step = training_step(GroupMambaClassifier(args.arch), args.batch_size, args.image_size,
                         device=args.device)
    for _ in range(3):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _synchronize(device)
    print(f'\nbatch {args.batch_size}, {args.image_size} px: '
          f'{(time.perf_counter() - start) / args.steps * 1e3:.1f} ms per step untraced')
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    _synchronize(device)
    profile.disable()
    for order in ('tottime', 'cumulative'):
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats(order).print_stats(args.rows)
        print(f'\n{args.steps} steps under cProfile, by {order}:')
        print(text.getvalue().split('\n\n', 1)[-1].rstrip())


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


if __name__ == '__main__':
    main()
