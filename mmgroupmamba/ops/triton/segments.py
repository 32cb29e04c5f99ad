"""Triton kernels over a few small tensors at once: one launch instead of one per tensor.

A GroupMamba block casts ten parameters to the compute dtype in its forward and sums four
per-image weight gradients over the images in its backward, each a kernel of a few kilobytes to
a few megabytes whose launch costs more host time than the GPU spends on it. These kernels take
up to :data:`MAX_SEGMENTS` tensors ("segments") per launch; a 1-D grid of blocks runs through
the segments one after the other, each program finding its segment from the segments' first
blocks (no device-side table to upload).

- :func:`cast`: each tensor cast to one dtype and repeated over ``batch`` images, into one buffer;
- :func:`sum_images`: each ``(B, ...)`` tensor summed over its first axis in float32.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .common import cdiv, compiled_binaries

MAX_SEGMENTS = 4
# Elements per program of the cast; image rows and columns per step of the sum.
_CAST_BLOCK = 2048
_SUM_ROWS = 16
_SUM_COLUMNS = 128
# Each segment of the cast's buffer starts on a multiple of this many elements (128 bytes and
# more): cuBLAS reads aligned operands faster.
_ALIGN = 64

__all__ = ['MAX_SEGMENTS', 'cast', 'sum_images', 'compiled_kernel_count']


def cast(tensors: Sequence[torch.Tensor], dtype: torch.dtype, batch: Optional[int] = None
         ) -> List[torch.Tensor]:
    """Each of up to :data:`MAX_SEGMENTS` tensors (on one device, contiguous) in ``dtype``, or
    with ``batch`` repeated over that many images (``(batch, *shape)``): contiguous views of one
    new buffer, written by one kernel."""
    _check_count(tensors)
    repeats = 1 if batch is None else batch
    sizes = [t.numel() * repeats for t in tensors]
    starts = [0]
    for size in sizes[:-1]:
        starts.append(starts[-1] + cdiv(size, _ALIGN) * _ALIGN)
    buffer = torch.empty(starts[-1] + sizes[-1], dtype=dtype, device=tensors[0].device)
    programs, first_blocks = _blocks(sizes, _CAST_BLOCK)
    _cast_kernel[(programs, )](buffer, *_pad(list(tensors)), *_pad([t.numel() for t in tensors]),
                               *_pad(starts), *first_blocks, repeats, BLOCK=_CAST_BLOCK)
    shape = (lambda t: t.shape) if batch is None else (lambda t: (batch, *t.shape))
    return [buffer[start:start + size].view(shape(t))
            for t, start, size in zip(tensors, starts, sizes)]


def sum_images(tensors: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype]
               ) -> List[torch.Tensor]:
    """Each of up to :data:`MAX_SEGMENTS` contiguous ``(B, ...)`` tensors (one ``B``) summed over
    its first axis in float32 and written in its ``dtypes`` entry: ``(...)`` tensors, new (not
    views of one buffer: they become parameter gradients), from one kernel."""
    _check_count(tensors)
    outs = [torch.empty(t.shape[1:], dtype=dtype, device=t.device)
            for t, dtype in zip(tensors, dtypes)]
    columns = [t[0].numel() for t in tensors]
    programs, first_blocks = _blocks(columns, _SUM_COLUMNS)
    _sum_images_kernel[(programs, )](*_pad(list(tensors)), *_pad(outs), *_pad(columns),
                                     *first_blocks, tensors[0].shape[0], ROWS=_SUM_ROWS,
                                     COLUMNS=_SUM_COLUMNS)
    return outs


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process."""
    return compiled_binaries(_cast_kernel, _sum_images_kernel)


def _check_count(tensors: Sequence[torch.Tensor]) -> None:
    if not 1 <= len(tensors) <= MAX_SEGMENTS:
        raise ValueError(f'takes 1 to {MAX_SEGMENTS} tensors, got {len(tensors)}')


def _pad(items: list) -> list:
    """``items`` filled up to MAX_SEGMENTS with copies of its first: the arguments of segments
    that have no programs (see :func:`_blocks`), never read."""
    return items + [items[0]] * (MAX_SEGMENTS - len(items))


def _blocks(sizes: Sequence[int], block: int):
    """(programs, each segment's first program): segments of ``sizes`` elements in blocks of
    ``block``, one after the other; the missing segments start at the end (no programs)."""
    first_blocks = []
    total = 0
    for size in sizes:
        first_blocks.append(total)
        total += cdiv(size, block)
    assert total < 2 ** 31
    return max(total, 1), first_blocks + [total] * (MAX_SEGMENTS - len(sizes))


@triton.jit
def _segment(first1, first2, first3):
    """The segment of this program (0-3) and its block within the segment."""
    pid = tl.program_id(0)
    segment = (pid >= first1).to(tl.int32) + (pid >= first2) + (pid >= first3)
    return pid, segment


@triton.jit
def _cast_block(src, dst, numel, batch, block, BLOCK: tl.constexpr):
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel * batch
    values = tl.load(src + offs % numel, mask=mask)
    if values.dtype == tl.float32 and dst.dtype.element_ty == tl.bfloat16:
        tl.store(dst + offs, _bfloat16_rounded(values), mask=mask)
    else:
        tl.store(dst + offs, values.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _bfloat16_rounded(x):
    """float32 ``x`` to bfloat16, rounded to nearest even as ``Tensor.to`` rounds, in integer
    arithmetic: the same bits on a GPU and in Triton's interpreter (whose own conversion
    truncates). NaNs stay NaNs (quiet, sign kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=['n0', 'n1', 'n2', 'n3', 'o0', 'o1', 'o2', 'o3', 'f0', 'f1',
                               'f2', 'f3', 'batch'])
def _cast_kernel(buffer, s0, s1, s2, s3, n0, n1, n2, n3, o0, o1, o2, o3, f0, f1, f2, f3, batch,
                 BLOCK: tl.constexpr):
    # Segment k: buffer[o_k + j] = s_k[j % n_k] for j < n_k * batch.
    pid, segment = _segment(f1, f2, f3)
    if segment == 0:
        _cast_block(s0, buffer + o0, n0, batch, pid - f0, BLOCK)
    elif segment == 1:
        _cast_block(s1, buffer + o1, n1, batch, pid - f1, BLOCK)
    elif segment == 2:
        _cast_block(s2, buffer + o2, n2, batch, pid - f2, BLOCK)
    else:
        _cast_block(s3, buffer + o3, n3, batch, pid - f3, BLOCK)


@triton.jit
def _sum_block(src, dst, columns, images, block, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    offs_n = block * COLUMNS + tl.arange(0, COLUMNS)
    n_mask = offs_n < columns
    acc = tl.zeros((ROWS, COLUMNS), dtype=tl.float32)
    for b0 in range(0, images, ROWS):
        rows = b0 + tl.arange(0, ROWS)
        mask = (rows < images)[:, None] & n_mask[None, :]
        acc += tl.load(src + rows.to(tl.int64)[:, None] * columns + offs_n[None, :], mask=mask,
                       other=0.).to(tl.float32)
    tl.store(dst + offs_n, tl.sum(acc, axis=0).to(dst.dtype.element_ty), mask=n_mask)


@triton.jit(do_not_specialize=['n0', 'n1', 'n2', 'n3', 'f0', 'f1', 'f2', 'f3', 'images'])
def _sum_images_kernel(s0, s1, s2, s3, d0, d1, d2, d3, n0, n1, n2, n3, f0, f1, f2, f3, images,
                       ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    # Segment k: d_k[j] = sum over b of s_k[b * n_k + j].
    pid, segment = _segment(f1, f2, f3)
    if segment == 0:
        _sum_block(s0, d0, n0, images, pid - f0, ROWS, COLUMNS)
    elif segment == 1:
        _sum_block(s1, d1, n1, images, pid - f1, ROWS, COLUMNS)
    elif segment == 2:
        _sum_block(s2, d2, n2, images, pid - f2, ROWS, COLUMNS)
    else:
        _sum_block(s3, d3, n3, images, pid - f3, ROWS, COLUMNS)
