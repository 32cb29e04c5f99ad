"""Selective-scan speed on one GPU: Triton kernels next to the torch (reference) path.

    python tools/analysis/benchmark_scan.py                      # GroupMamba-T shapes, fp32
    python tools/analysis/benchmark_scan.py --dtype bfloat16 --shapes 128x16x3136

Shapes are ``batch x dim x L``: one channel group scanning left to right, N = 1, with D,
delta_bias and softplus as in the model. Effective bandwidth counts the bytes of u, delta, B and
C read and y written, over forward time. Times are medians of CUDA-event timings after warm-up,
with the L2 cache flushed before each call; a call's Python and launch work counts when it takes
longer than that flush. The "graph" columns replay the Triton calls as captured CUDA graphs: kernel
time alone.
"""
import argparse

import torch
import triton

from mmgroupmamba.ops import torch_scan, triton_scan

DEFAULT_SHAPES = ('128x16x3136', '128x32x784', '128x87x196', '128x112x49', '128x87x4096')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', default=list(DEFAULT_SHAPES))
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--state-dim', type=int, default=1)
    return parser.parse_args()


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode='median')


def graph_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph (no host launch work in the timing)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compilation, cached device tensors
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay)


def benchmark_shape(batch, dim, L, N, dtype):
    """Returns ``{backend: (forward ms, backward ms)}`` and the bytes the forward must move."""
    dev = dict(device='cuda')
    u = torch.randn(batch, dim, L, **dev).to(dtype)
    delta = (0.5 * torch.randn(batch, dim, L, **dev)).to(dtype)
    A = -(0.2 + torch.rand(dim, N, **dev))
    B = torch.randn(batch, 1, N, L, **dev).to(dtype)
    C = torch.randn(batch, 1, N, L, **dev).to(dtype)
    D, delta_bias = torch.randn(dim, **dev), torch.randn(dim, **dev)
    args = (u, delta, A, B, C, D, delta_bias, True, (0, ), (1, L))
    dy = torch.randn_like(u)
    times = {}
    for name, backend in (('triton', triton_scan), ('torch', torch_scan)):
        _, saved = backend.scan_forward(*args, dtype)
        times[name] = (time_ms(lambda: backend.scan_forward(*args, dtype)),
                       time_ms(lambda: backend.scan_backward(*args, dy, saved)))
    _, saved = triton_scan.scan_forward(*args, dtype)
    times['graph'] = (graph_ms(lambda: triton_scan.scan_forward(*args, dtype)),
                      graph_ms(lambda: triton_scan.scan_backward(*args, dy, saved)))
    io_bytes = sum(t.numel() * t.element_size() for t in (u, delta, B, C, u))  # y as large as u
    return times, io_bytes


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    print(f'GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  '
          f'triton {triton.__version__}  dtype {args.dtype}  N {args.state_dim}')
    header = (f'{"shape":>14} | {"triton fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9} | '
              f'{"graph fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9} | '
              f'{"torch fwd ms":>13} {"bwd ms":>8} {"fwd GB/s":>9}')
    print(header)
    print('-' * len(header))
    for shape in args.shapes:
        batch, dim, L = (int(x) for x in shape.split('x'))
        times, io_bytes = benchmark_shape(batch, dim, L, args.state_dim, dtype)
        cells = []
        for name in ('triton', 'graph', 'torch'):
            fwd, bwd = times[name]
            cells.append(f'{fwd:13.4f} {bwd:8.4f} {io_bytes / fwd / 1e6:9.0f}')
        print(f'{shape:>14} | ' + ' | '.join(cells))


if __name__ == '__main__':
    main()
