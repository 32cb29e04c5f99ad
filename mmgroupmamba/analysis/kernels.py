"""Timing of GPU kernels (the selective scan's) and the inputs the scan benchmarks share.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call). A
Python call's host work counts whenever it takes longer than that flush, so short kernels are
also timed replayed from a captured CUDA graph (:func:`graph_ms`): kernel time alone.
"""
import argparse
from typing import Callable, Dict, Tuple

import torch

# One channel group of GroupMamba-T's stages at 224x224 and batch 128 (dim 87 at L 4096: a long
# sequence), the shapes of the scan benchmarks, ``batch x dim x L``.
SCAN_SHAPES = ('128x16x3136', '128x32x784', '128x87x196', '128x112x49', '128x87x4096')


def scan_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The scan benchmarks' shared options: ``--shapes`` (``batch x dim x L``) and ``--dtype``."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', nargs='+', type=parse_scan_shape, default=[
        parse_scan_shape(shape) for shape in SCAN_SHAPES], metavar='BxDxL')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    return parser


def parse_scan_shape(text: str) -> Tuple[int, int, int]:
    try:
        batch, dim, L = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a shape is batch x dim x L, e.g. 128x16x3136, got '
                                         f'{text!r}')
    return batch, dim, L


def kernel_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median milliseconds of ``fn()`` after warm-up, host work included."""
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode='median')


def graph_ms(fn: Callable[[], object], rep: int = 200) -> float:
    """Median milliseconds of ``fn`` replayed from a CUDA graph (no host launch work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside capture: compilation, cached device tensors
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return kernel_ms(graph.replay, rep)


def scan_inputs(batch: int, dim: int, L: int, N: int = 1, dtype: torch.dtype = torch.float32,
                device: str = 'cuda') -> Dict[str, object]:
    """Keyword arguments of ``scan_forward`` for one channel group scanning left to right, with
    D, delta_bias and softplus as in the model (decays in (0.2, 1.2), as after training)."""
    dev = dict(device=device)
    return dict(u=torch.randn(batch, dim, L, **dev).to(dtype),
                delta=(0.5 * torch.randn(batch, dim, L, **dev)).to(dtype),
                A=-(0.2 + torch.rand(dim, N, **dev)),
                B=torch.randn(batch, 1, N, L, **dev).to(dtype),
                C=torch.randn(batch, 1, N, L, **dev).to(dtype),
                D=torch.randn(dim, **dev), delta_bias=torch.randn(dim, **dev),
                delta_softplus=True, directions=(0, ), spatial_shape=(1, L))


def scan_io_bytes(inputs: Dict[str, object]) -> int:
    """Bytes a forward must move: u, delta, B and C read, y (as large as u) written."""
    return sum(inputs[k].numel() * inputs[k].element_size() for k in ('u', 'delta', 'B', 'C', 'u'))
