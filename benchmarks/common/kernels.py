"""Timing of GPU kernels (the selective scan's, the depthwise stencil's) and the inputs the kernel
benchmarks share.

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call). A
Python call's host work counts whenever it takes longer than that flush, so short kernels are
also timed replayed from a captured CUDA graph (:func:`graph_ms`): kernel time alone.
"""
import argparse
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from mmgroupmamba.ops.triton import depthwise_conv as triton_depthwise_conv
from mmgroupmamba.ops.triton import scan as triton_scan
from mmgroupmamba.ops.triton import scan_n1 as triton_scan_n1
from mmgroupmamba.ops.triton.depthwise_conv import StencilConfig
from mmgroupmamba.ops.triton.scan_n1 import LaunchConfig

# One channel group of GroupMamba-T's stages at 224x224 and batch 128 (dim 87 at L 4096: a long
# sequence), the shapes of the scan benchmarks, ``batch x dim x L``.
SCAN_SHAPES = ('128x16x3136', '128x32x784', '128x87x196', '128x112x49', '128x87x4096')


def compiled_kernels() -> int:
    """Triton kernel binaries of the project's ops (selective scan, depthwise convolution)
    compiled so far in this process."""
    return triton_scan.compiled_kernel_count() + triton_depthwise_conv.compiled_kernel_count()


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
                device: str = 'cuda', all_directions: bool = False) -> Dict[str, object]:
    """Keyword arguments of ``scan_forward`` for one channel group scanning left to right, with
    D, delta_bias and softplus as in the model (decays in (0.2, 1.2), as after training).

    ``all_directions``: four groups instead, one per direction, as the model calls the scan, over
    the most nearly square ``H x W`` map of ``L`` tokens (``dim`` a multiple of 4).
    """
    groups = 4 if all_directions else 1
    if dim % groups:
        raise ValueError(f'four directions need dim divisible by 4, got {dim}')
    H = max(h for h in range(1, int(L ** 0.5) + 1) if L % h == 0) if all_directions else 1
    dev = dict(device=device)
    return dict(u=torch.randn(batch, dim, L, **dev).to(dtype),
                delta=(0.5 * torch.randn(batch, dim, L, **dev)).to(dtype),
                A=-(0.2 + torch.rand(dim, N, **dev)),
                B=torch.randn(batch, groups, N, L, **dev).to(dtype),
                C=torch.randn(batch, groups, N, L, **dev).to(dtype),
                D=torch.randn(dim, **dev), delta_bias=torch.randn(dim, **dev),
                delta_softplus=True, directions=tuple(range(groups)), spatial_shape=(H, L // H))


def scan_io_bytes(inputs: Dict[str, object]) -> int:
    """Bytes a forward must move: u, delta, B and C read, y (as large as u) written."""
    return sum(inputs[k].numel() * inputs[k].element_size() for k in ('u', 'delta', 'B', 'C', 'u'))


def candidate_tiles(dim_per_group: int, block_t: int, block_ds: Sequence[int],
                    warps: Sequence[int], max_tile: int = 4096) -> List[LaunchConfig]:
    """Tiles of ``block_t`` steps worth timing: channel blocks within the group (rounded up to a
    power of two), at most ``max_tile`` elements, at least one element per thread."""
    most = 1 << max(0, dim_per_group - 1).bit_length()
    return [LaunchConfig(block_d, block_t, w) for block_d in block_ds for w in warps
            if block_d <= most and 32 * w <= block_d * block_t <= max_tile]


def chunk_lengths(L: int, shortest: int = 128, longest: int = 2048) -> List[int]:
    """Chunk lengths worth timing for ``L`` steps: powers of two from ``shortest`` up to the
    first that covers the sequence (at most ``longest``; at least 16)."""
    covering = max(16, 1 << max(0, L - 1).bit_length())
    lengths = [min(shortest, covering)]
    while lengths[-1] * 2 <= min(longest, covering):
        lengths.append(lengths[-1] * 2)
    return lengths


def sweep_scan_tiles(batch: int, dim: int, L: int, dtype: torch.dtype = torch.float32, *,
                     block_ds: Sequence[int] = (1, 2, 4, 8, 16, 32),
                     block_ts: Optional[Sequence[int]] = None,
                     warps: Sequence[int] = (1, 2, 4, 8), max_tile: int = 4096, rep: int = 60,
                     passes: Sequence[str] = ('forward', 'backward')
                     ) -> Iterator[Tuple[str, LaunchConfig, Dict[LaunchConfig, float]]]:
    """Kernel milliseconds (CUDA-graph replay) of the N = 1 scan per launch geometry, for one
    group of ``dim`` channels scanning ``L`` steps left to right: yields, per pass,
    ``('forward' | 'backward', the geometry plan() picks, {geometry: ms})``. Chunk lengths are
    ``block_ts`` (default :func:`chunk_lengths`); backward skips those that do not start at a
    saved state."""
    inputs = scan_inputs(batch, dim, L, 1, dtype)
    args = tuple(inputs.values())
    dy = torch.randn_like(inputs['u'])
    planned = dict(zip(('forward', 'backward'), triton_scan_n1.plan(batch, dim, 1, L)))
    _, states = triton_scan_n1.forward(*args, out_dtype=dtype, cfg=planned['forward'])
    runs = {
        'forward': lambda cfg: triton_scan_n1.forward(*args, out_dtype=dtype, cfg=cfg),
        'backward': lambda cfg: triton_scan_n1.backward(*args, dy=dy, states=states, cfg=cfg),
    }
    lengths = {'forward': list(block_ts or chunk_lengths(L))}
    lengths['backward'] = [t for t in lengths['forward']
                           if t % triton_scan_n1.STATE_STEPS == 0 or t >= L]
    for name in passes:
        tiles = [cfg for block_t in lengths[name]
                 for cfg in candidate_tiles(dim, block_t, block_ds, warps, max_tile)]
        # dict.fromkeys: the planned geometry first, each geometry once.
        yield name, planned[name], {cfg: graph_ms(lambda: runs[name](cfg), rep)
                                    for cfg in dict.fromkeys([planned[name], *tiles])}


def maps_benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that time a variant's maps (depthwise maps, token maps):
    the variant (``--arch``), ``--batch-size`` and ``--image-size`` (see :func:`depthwise_maps`
    and :func:`token_maps`)."""
    from mmgroupmamba.models.groupmamba import ARCH_SETTINGS
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', choices=sorted(ARCH_SETTINGS))
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--image-size', type=int, default=224)
    return parser


def print_sweep(title: str, times: Dict, planned, nbytes: int, top: int, describe) -> None:
    """A tile sweep's result: ``title``, the planned tile's time and bandwidth, then the ``top``
    fastest tiles (``times``: tile -> ms; ``describe(tile)`` names a tile; ``nbytes`` the bytes
    one run reads and writes)."""
    print(f'\n{title}: planned {describe(planned)}: {times[planned] * 1e3:.0f} us '
          f'({nbytes / times[planned] / 1e6:.0f} GB/s)')
    for tile, ms in sorted(times.items(), key=lambda item: item[1])[:top]:
        print(f'  {describe(tile)}: {ms * 1e3:.0f} us ({nbytes / ms / 1e6:.0f} GB/s, '
              f'{times[planned] / ms:.2f}x the planned)')


def token_maps(arch: str, batch: int, size: int) -> Iterator[Tuple[str, Tuple[int, int, int, int]]]:
    """``(name, (B, H, W, C))`` of a GroupMamba variant's channels-last token maps per stage at
    ``size`` x ``size`` images (what its norms, residual sums and layer tails run on)."""
    from mmgroupmamba.models.groupmamba import ARCH_SETTINGS  # the model's registries load late
    for stage, dims in enumerate(ARCH_SETTINGS[arch]['embed_dims']):
        side = size // 4 >> stage
        yield f'stage {stage + 1}', (batch, side, side, dims)


def depthwise_maps(arch: str, batch: int, size: int
                   ) -> Iterator[Tuple[str, Tuple[int, int, int, int], bool, str]]:
    """``(name, (B, C, H, W), channels_last, activation)`` of a GroupMamba variant's depthwise
    convolution maps per stage at ``size`` x ``size`` images: the FFN's (channels-last, hidden
    width, GELU) and the SS2D mixer's (NCHW, the stage's width, SiLU)."""
    from mmgroupmamba.models.groupmamba import ARCH_SETTINGS  # the model's registries load late
    settings = ARCH_SETTINGS[arch]
    for stage, (dims, ratio) in enumerate(zip(settings['embed_dims'], settings['mlp_ratios'])):
        side = size // 4 >> stage
        yield f'stage {stage + 1} FFN', (batch, int(dims * ratio), side, side), True, 'gelu'
        yield f'stage {stage + 1} SS2D', (batch, dims, side, side), False, 'silu'


def candidate_stencil_tiles(shape: Sequence[int], channels_last: bool,
                            rows: Sequence[int] = (1, 2, 4, 8, 16),
                            warps: Sequence[int] = (2, 4, 8), min_tile: int = 256,
                            max_tile: int = 8192) -> List[StencilConfig]:
    """Stencil tiles worth timing for a ``(B, C, H, W)`` map: along the contiguous axis (channels
    when channels-last, else the width) 16 to 128 elements, at most that axis rounded up to a
    power of two; along the other axis the rest of tiles of ``min_tile`` to ``max_tile``
    elements; at least one element per thread."""
    _, C, H, W = shape
    contiguous, other = (C, W) if channels_last else (W, C)
    cap = lambda n: 1 << max(0, n - 1).bit_length()  # noqa: E731
    tiles = []
    for inner in (16, 32, 64, 128):
        if inner > max(16, cap(contiguous)):
            continue
        for outer in (1, 2, 4, 8, 16, 32, 64, 128):
            if outer > max(1, cap(other)) or not min_tile <= inner * outer <= max_tile:
                continue
            block_w, block_c = (outer, inner) if channels_last else (inner, outer)
            tiles += [StencilConfig(block_w, block_c, r, w) for r in rows for w in warps
                      if r <= max(1, cap(H)) and 32 * w <= inner * outer]
    return tiles
