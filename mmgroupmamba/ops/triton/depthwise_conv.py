"""Triton kernels of the depthwise 3 x 3 convolution (stride 1, zero 'same' padding).

Tensors are ``(B, C, H, W)`` with any strides: the kernels take them as they lie, so NCHW maps and
channels-last maps (NHWC memory) are read without copies, and the outputs are allocated with the
input's layout. Each program computes ``BLOCK_W x BLOCK_C`` tiles of several image rows,
vectorised along whichever of W and C is contiguous, accumulating in float32, loading each input
row once. An activation (SiLU or GELU) may follow in the same kernel; backward then computes the
gradient at the pre-activation with the same stencil (recomputing the convolution, so that
nothing but the input is kept). The input gradient is the same kernel with the taps turned by 180
degrees; the weight and bias gradients reduce rows of the output gradient against shifted input
rows into per-program partial sums (no atomics: deterministic), summed afterwards.

The image height and width (and the row-block count) are not specialised on (Triton compiles a
kernel per divisibility of its integer arguments): detection's changing sizes would compile new
binaries. The strides stay specialised, as their divisibility lets loads along a contiguous
channel axis vectorise; for channel counts that are multiples of 16 it does not change with the
size.
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries, cdiv, next_power_of_2

# Elements per stencil program tile, by layout and pass, and of the weight gradient's tiles (it
# keeps ten float32 tiles of partial sums), with its rows per program. Swept on an H200 over
# GroupMamba-T's stage-1 maps at batch 128 (benchmarks/sweep_depthwise_tiles.py, 2026-12-07):
# registers, hence warps per SM, bound the stencil, and tiles of 256 (NCHW) or 512 elements
# (channels-last, forward and activation gradient) ran 1.3-1.75x faster than the 2048-element
# tiles before them; the channels-last input gradient ran as fast at 2048 (1.00-1.02x).
_TILE_NCHW = 256
_TILE_NHWC = 512
_TILE_NHWC_DGRAD = 2048
_WGRAD_TILE = 512
_WGRAD_ROWS = 8
# Output rows per stencil program: the first of these that leaves _MIN_PROGRAMS programs, else
# the last. Measured on an H100 over GroupMamba's maps from batch 128 at 224 px down to batch 2 at
# 800 x 1216: 8 rows beat 1 row by up to 2.7x on the large maps, and 4 rows beat 8 by a few
# microseconds when 8 leave only a few hundred programs.
_STENCIL_ROWS = (8, 4)
_MIN_PROGRAMS = 256
# The activations the kernels apply after the convolution, by name, as kernel codes.
ACTIVATIONS = {None: 0, 'silu': 1, 'gelu': 2}

__all__ = ['ACTIVATIONS', 'StencilConfig', 'plan', 'forward', 'activation_grad', 'backward',
           'compiled_kernel_count']


class StencilConfig(NamedTuple):
    """Tile of one stencil program: ``rows`` output rows of ``block_w`` columns x ``block_c``
    channels (powers of two), run by ``warps`` warps."""
    block_w: int
    block_c: int
    rows: int
    warps: int


def plan(x: torch.Tensor, mirrored: bool = False) -> StencilConfig:
    """The stencil's launch geometry for maps shaped and laid out like ``x`` (``(B, C, H, W)``),
    ``mirrored`` for the input-gradient pass: a tile of :data:`_TILE_NCHW` elements, or in a
    channels-last map of :data:`_TILE_NHWC` (:data:`_TILE_NHWC_DGRAD` mirrored), the contiguous
    axis getting up to 64 elements (128 of channels-last channels), and the rows per program of
    ``_STENCIL_ROWS`` (the first that leaves ``_MIN_PROGRAMS`` programs)."""
    return _plan(x.shape, x.stride(1) == 1, mirrored)


@functools.lru_cache(maxsize=1024)
def _plan(shape: torch.Size, channels_last: bool, mirrored: bool) -> StencilConfig:
    # Cached: the host time of a call is what eager training waits for (sizes repeat).
    B, C, H, W = shape
    if not channels_last or C == 1:
        block_w, block_c = _blocks(shape, False, _TILE_NCHW)
    elif mirrored:
        block_w, block_c = _blocks(shape, True, _TILE_NHWC_DGRAD)
    else:
        block_w, block_c = _blocks(shape, True, _TILE_NHWC, channels=128)
    tiles = cdiv(W, block_w) * cdiv(C, block_c)
    return StencilConfig(block_w, block_c, _stencil_rows(B * tiles, H), 4)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            activation: Optional[str] = None, *, cfg: Optional[StencilConfig] = None
            ) -> torch.Tensor:
    """x ``(B, C, H, W)``, weight ``(C, 1, 3, 3)``, bias ``(C,)`` or None -> y like x:
    ``activation(conv(x))``, ``activation`` one of :data:`ACTIVATIONS` (GELU the exact one).
    ``cfg`` overrides :func:`plan` (for tuning)."""
    y = torch.empty_like(x)
    _stencil(x, weight, bias, y, mirrored=False, activation=ACTIVATIONS[activation], cfg=cfg)
    return y


def activation_grad(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor], activation: str, with_output: bool = False, *,
                    cfg: Optional[StencilConfig] = None):
    """The gradient at the pre-activation ``a = conv(x)`` of ``y = activation(a)``,
    ``grad_y * activation'(a)``, like x, with ``a`` recomputed on the fly; :func:`backward` takes
    it from there. ``with_output``: returns ``(grad_a, y)``, the recomputed output written by the
    same pass (for a caller that needs it again, as a following matmul's weight gradient does).
    ``cfg`` overrides :func:`plan`."""
    grad_a = torch.empty_like(x)
    y = torch.empty_like(x) if with_output else None
    _stencil(x, weight, bias, grad_a, mirrored=False, activation=ACTIVATIONS[activation],
             grad_y=grad_y, out=y, cfg=cfg)
    return (grad_a, y) if with_output else grad_a


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool, *,
             input_grad_sums: bool = False, cfg: Optional[StencilConfig] = None):
    """(grad_x like x, grad_weight float32 ``(C, 1, 3, 3)``, grad_bias float32 ``(C,)`` or None),
    and with ``input_grad_sums`` a fourth: grad_x summed over images and positions, float32
    ``(C,)``, from the pass that writes grad_x (the bias gradient of a layer before the
    convolution). ``cfg`` overrides :func:`plan` for the input gradient's stencil."""
    assert weight.shape[-1] == 3, 'the weight-gradient kernel is written for 3 x 3 taps'
    grad_x = torch.empty_like(x)
    sums_x = _stencil(grad_y, weight, None, grad_x, mirrored=True, column_sums=input_grad_sums,
                      cfg=cfg)
    B, C, H, W = x.shape
    block_w, block_c = _blocks(x.shape, x.stride(1) == 1, _WGRAD_TILE)
    row_blocks = cdiv(H, _WGRAD_ROWS)
    # Per program, the (C, 3, 3) taps' partial sums, then the bias's (C,): their sum over the
    # programs is the weight gradient as it lies, with no transposing copy.
    partial = torch.empty((B * row_blocks, 10 * C), dtype=torch.float32, device=x.device)
    _dwconv_wgrad_kernel[(B * row_blocks, cdiv(C, block_c))](
        x, grad_y, partial, H, W, C, *x.stride(), *grad_y.stride(), row_blocks,
        ROWS=_WGRAD_ROWS, BLOCK_W=block_w, BLOCK_C=block_c)
    sums = partial.sum(0)
    grad_weight = sums[:9 * C].view(C, 1, 3, 3)
    grad_bias = sums[9 * C:] if with_bias else None
    if input_grad_sums:
        return grad_x, grad_weight, grad_bias, sums_x
    return grad_x, grad_weight, grad_bias


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_dwconv_stencil_kernel, _dwconv_wgrad_kernel)


def _blocks(shape: torch.Size, channels_last: bool, tile: int,
            channels: int = 64) -> Tuple[int, int]:
    """(BLOCK_W, BLOCK_C) of ``tile`` elements for (B, C, H, W) maps: the contiguous axis gets up
    to 64 elements (``channels`` where ``channels_last``: the channels), the other the rest."""
    _, C, _, W = shape
    if channels_last and C > 1:
        block_c = min(channels, next_power_of_2(C))
        return min(next_power_of_2(W), tile // block_c), block_c
    block_w = min(64, next_power_of_2(W))
    return block_w, min(next_power_of_2(C), tile // block_w)


def _stencil(src, weight, bias, dst, mirrored: bool, activation: int = 0, grad_y=None,
             out=None, column_sums: bool = False, cfg: Optional[StencilConfig] = None):
    """Launches the stencil kernel; with ``column_sums`` returns dst's sums per channel (float32
    ``(C,)``, of the values before rounding to dst's dtype), else None."""
    B, C, H, W = src.shape
    block_w, block_c, rows, warps = plan(dst, mirrored) if cfg is None else cfg
    # The kernel indexes the taps and bias densely (parameters are; a view might not be).
    has_bias = bias is not None
    weight = weight.contiguous()
    bias = bias.contiguous() if has_bias else src
    with_grad = grad_y is not None
    grad_y = grad_y if with_grad else dst
    # ``out`` (with grad_y only) also receives the activation's output; it has dst's strides.
    store_output = out is not None
    assert not store_output or (with_grad and out.stride() == dst.stride())
    strides = src.stride(), dst.stride(), grad_y.stride()
    same_strides = strides[0][1:] == strides[1][1:] == strides[2][1:]
    _check_extent(src.shape, *strides)
    row_blocks = cdiv(H, rows)
    grid = (B * row_blocks, cdiv(W, block_w), cdiv(C, block_c))
    partial = (torch.empty((grid[0] * grid[1], C), dtype=torch.float32, device=src.device)
               if column_sums else dst)
    _dwconv_stencil_kernel[grid](
        src, weight, bias, dst, grad_y, out if store_output else dst, partial, H, W, C,
        *src.stride(),
        *dst.stride(), *grad_y.stride(), row_blocks, MIRRORED=mirrored, HAS_BIAS=has_bias,
        ACTIVATION=activation, ACTIVATION_GRAD=with_grad, STORE_OUTPUT=store_output,
        SAME_STRIDES=same_strides, COLUMN_SUMS=column_sums, ROWS=rows, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=warps)
    return partial.sum(dim=0) if column_sums else None


@functools.lru_cache(maxsize=1024)
def _check_extent(shape: torch.Size, *strides: Tuple[int, ...]) -> None:
    """Raises unless every image of (B, C, H, W) maps of ``shape`` with these strides lies
    within 32-bit offsets (cached: checked on every call)."""
    extent = max(1 + sum((size - 1) * step for size, step in zip(shape[1:], stride[1:]))
                 for stride in strides)
    if extent >= 2 ** 31:
        raise ValueError(f'depthwise_conv2d: one image of {tuple(shape[1:])} spans 2^31 '
                         'elements or more; the Triton stencil indexes an image with 32-bit '
                         "offsets (use backend='torch')")


def _stencil_rows(tiles: int, height: int) -> int:
    """Output rows per stencil program for ``tiles`` (image, column block, channel block) tiles
    per image row: more rows load each input row fewer times, fewer give the GPU more programs."""
    for rows in _STENCIL_ROWS:
        if tiles * cdiv(height, rows) >= _MIN_PROGRAMS:
            return rows
    return _STENCIL_ROWS[-1]


@triton.jit
def _tap(w_ptr, offs_c, c_mask, I: tl.constexpr, J: tl.constexpr, MIRRORED: tl.constexpr):
    """Tap (I, J) of the 3 x 3 kernel as a (1, BLOCK_C) float32 row; the input gradient uses the
    kernel turned by 180 degrees."""
    if MIRRORED:
        offset = (2 - I) * 3 + (2 - J)
    else:
        offset = I * 3 + J
    return tl.load(w_ptr + offs_c * 9 + offset, mask=c_mask, other=0.).to(tl.float32)[None, :]


@triton.jit
def _activation(a, ACTIVATION: tl.constexpr):
    """``a`` (float32) through activation code ``ACTIVATION`` (0 none, 1 SiLU, 2 exact GELU)."""
    if ACTIVATION == 1:
        return a * tl.sigmoid(a)
    elif ACTIVATION == 2:
        return 0.5 * a * (1. + tl.math.erf(a * 0.7071067811865476))
    else:
        return a


@triton.jit
def _activation_slope(a, ACTIVATION: tl.constexpr):
    """The derivative of :func:`_activation` at ``a``."""
    if ACTIVATION == 1:
        s = tl.sigmoid(a)
        return s * (1. + a * (1. - s))
    elif ACTIVATION == 2:
        return (0.5 * (1. + tl.math.erf(a * 0.7071067811865476))
                + a * 0.3989422804014327 * tl.exp(-0.5 * a * a))
    else:
        return tl.full(a.shape, 1., tl.float32)


@triton.jit(do_not_specialize=['H', 'W', 'row_blocks'])
def _dwconv_stencil_kernel(src_ptr, w_ptr, bias_ptr, dst_ptr, g_ptr, out_ptr, sums_ptr, H, W, C,
                           ss_b,
                           ss_c, ss_h, ss_w, ds_b, ds_c, ds_h, ds_w, gs_b, gs_c, gs_h, gs_w,
                           row_blocks, MIRRORED: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACTIVATION: tl.constexpr, ACTIVATION_GRAD: tl.constexpr,
                           STORE_OUTPUT: tl.constexpr, SAME_STRIDES: tl.constexpr,
                           COLUMN_SUMS: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # a[h, w] = sum_ij src[h + i - 1, w + j - 1] * tap[i, j] for ROWS output rows; dst is
    # activation(a), or with ACTIVATION_GRAD g * activation'(a) for the output gradient g (and
    # with STORE_OUTPUT activation(a) to out, which has dst's strides). Each
    # input row is loaded once (three column shifts) and feeds the three output rows it touches;
    # a rolling pair of accumulators holds the rows still open, and a row is stored when its
    # last input row has been added.
    # Addresses are one image's base pointer plus a 32-bit offset tile within the image, shared
    # by all tensors when their strides agree (SAME_STRIDES): tiles of 64-bit pointers, one per
    # tensor, took most of the registers.
    program = tl.program_id(0)
    b = (program // row_blocks).to(tl.int64)
    h0 = (program % row_blocks) * ROWS
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c[None, :] < C
    w_ok = offs_w < W
    mask_left = ((offs_w >= 1) & w_ok)[:, None] & c_mask
    mask_mid = w_ok[:, None] & c_mask
    mask_right = (offs_w + 1 < W)[:, None] & c_mask
    src = src_ptr + b * ss_b
    dst = dst_ptr + b * ds_b
    out = out_ptr + b * ds_b
    grad = g_ptr + b * gs_b
    s_offs = offs_w[:, None] * ss_w + offs_c[None, :] * ss_c
    if SAME_STRIDES:
        d_offs = s_offs
        g_offs = s_offs
    else:
        d_offs = offs_w[:, None] * ds_w + offs_c[None, :] * ds_c
        g_offs = offs_w[:, None] * gs_w + offs_c[None, :] * gs_c
    cm = offs_c < C
    t00 = _tap(w_ptr, offs_c, cm, 0, 0, MIRRORED)
    t01 = _tap(w_ptr, offs_c, cm, 0, 1, MIRRORED)
    t02 = _tap(w_ptr, offs_c, cm, 0, 2, MIRRORED)
    t10 = _tap(w_ptr, offs_c, cm, 1, 0, MIRRORED)
    t11 = _tap(w_ptr, offs_c, cm, 1, 1, MIRRORED)
    t12 = _tap(w_ptr, offs_c, cm, 1, 2, MIRRORED)
    t20 = _tap(w_ptr, offs_c, cm, 2, 0, MIRRORED)
    t21 = _tap(w_ptr, offs_c, cm, 2, 1, MIRRORED)
    t22 = _tap(w_ptr, offs_c, cm, 2, 2, MIRRORED)
    bias = tl.zeros((1, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=cm, other=0.).to(tl.float32)[None, :]
    col_sums = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    acc_prev = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r - 1
    acc_cur = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)  # output row r
    for k in range(ROWS + 2):
        r = h0 - 1 + k
        row = src + r * ss_h + s_offs
        row_ok = (r >= 0) & (r < H)
        v0 = tl.load(row - ss_w, mask=row_ok & mask_left, other=0.).to(tl.float32)
        v1 = tl.load(row, mask=row_ok & mask_mid, other=0.).to(tl.float32)
        v2 = tl.load(row + ss_w, mask=row_ok & mask_right, other=0.).to(tl.float32)
        # Input row r reaches output row r - 1 through tap row 2, r through 1, r + 1 through 0.
        done = acc_prev + v0 * t20 + v1 * t21 + v2 * t22 + bias
        out_row = r - 1
        store_ok = (out_row >= h0) & (out_row < H) & (out_row < h0 + ROWS)
        if ACTIVATION_GRAD:
            g = tl.load(grad + out_row * gs_h + g_offs, mask=store_ok & mask_mid, other=0.)
            if STORE_OUTPUT:
                tl.store(out + out_row * ds_h + d_offs, _activation(done, ACTIVATION).to(
                    out_ptr.dtype.element_ty), mask=store_ok & mask_mid)
            done = g.to(tl.float32) * _activation_slope(done, ACTIVATION)
        else:
            done = _activation(done, ACTIVATION)
        tl.store(dst + out_row * ds_h + d_offs, done.to(dst_ptr.dtype.element_ty),
                 mask=store_ok & mask_mid)
        if COLUMN_SUMS:
            col_sums += tl.sum(tl.where(store_ok & mask_mid, done, 0.), axis=0)
        acc_prev = acc_cur + v0 * t10 + v1 * t11 + v2 * t12
        acc_cur = v0 * t00 + v1 * t01 + v2 * t02
    if COLUMN_SUMS:
        # One row of per-channel sums per (image and row block, column block) program.
        slot = (program * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * C
        tl.store(sums_ptr + slot + offs_c, col_sums, mask=cm)


@triton.jit
def _shifted(base, h, offs_w, DH: tl.constexpr, DW: tl.constexpr, H, W, s_h, s_w, mask):
    """Tile of ``base`` at rows ``h + DH`` and columns ``offs_w + DW`` (zero outside), float32."""
    hh = h + DH
    ww = offs_w + DW
    mask = mask & (hh >= 0) & (hh < H) & ((ww >= 0) & (ww < W))[:, None]
    return tl.load(base + hh * s_h + ww[:, None] * s_w, mask=mask, other=0.).to(tl.float32)


@triton.jit(do_not_specialize=['H', 'W', 'row_blocks'])
def _dwconv_wgrad_kernel(x_ptr, g_ptr, partial_ptr, H, W, C, xs_b, xs_c, xs_h, xs_w, gs_b,
                         gs_c, gs_h, gs_w, row_blocks, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # partial[program, 9 * c + 3 * i + j] = sum over the program's rows of g[h, w] * x[h + i - 1,
    # w + j - 1]; partial[program, 9 * C + c] = sum of g (the bias gradient). Elementwise
    # partial sums per tap, reduced across the tile once at the end.
    program = tl.program_id(0)
    b = (program // row_blocks).to(tl.int64)
    h0 = (program % row_blocks) * ROWS
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    x_base = x_ptr + b * xs_b + offs_c[None, :] * xs_c
    g_base = g_ptr + b * gs_b + offs_c[None, :] * gs_c
    s00 = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    s01, s02, s10, s11, s12, s20, s21, s22, s_bias = s00, s00, s00, s00, s00, s00, s00, s00, s00
    for r in range(ROWS):
        h = h0 + r
        for w0 in range(0, W, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            g_mask = (h < H) & (offs_w < W)[:, None] & c_mask[None, :]
            g = tl.load(g_base + h * gs_h + offs_w[:, None] * gs_w, mask=g_mask, other=0.)
            g = g.to(tl.float32)
            s_bias += g
            s00 += g * _shifted(x_base, h, offs_w, -1, -1, H, W, xs_h, xs_w, g_mask)
            s01 += g * _shifted(x_base, h, offs_w, -1, 0, H, W, xs_h, xs_w, g_mask)
            s02 += g * _shifted(x_base, h, offs_w, -1, 1, H, W, xs_h, xs_w, g_mask)
            s10 += g * _shifted(x_base, h, offs_w, 0, -1, H, W, xs_h, xs_w, g_mask)
            s11 += g * _shifted(x_base, h, offs_w, 0, 0, H, W, xs_h, xs_w, g_mask)
            s12 += g * _shifted(x_base, h, offs_w, 0, 1, H, W, xs_h, xs_w, g_mask)
            s20 += g * _shifted(x_base, h, offs_w, 1, -1, H, W, xs_h, xs_w, g_mask)
            s21 += g * _shifted(x_base, h, offs_w, 1, 0, H, W, xs_h, xs_w, g_mask)
            s22 += g * _shifted(x_base, h, offs_w, 1, 1, H, W, xs_h, xs_w, g_mask)
    base = partial_ptr + program.to(tl.int64) * 10 * C
    taps = base + offs_c * 9
    tl.store(taps, tl.sum(s00, axis=0), mask=c_mask)
    tl.store(taps + 1, tl.sum(s01, axis=0), mask=c_mask)
    tl.store(taps + 2, tl.sum(s02, axis=0), mask=c_mask)
    tl.store(taps + 3, tl.sum(s10, axis=0), mask=c_mask)
    tl.store(taps + 4, tl.sum(s11, axis=0), mask=c_mask)
    tl.store(taps + 5, tl.sum(s12, axis=0), mask=c_mask)
    tl.store(taps + 6, tl.sum(s20, axis=0), mask=c_mask)
    tl.store(taps + 7, tl.sum(s21, axis=0), mask=c_mask)
    tl.store(taps + 8, tl.sum(s22, axis=0), mask=c_mask)
    tl.store(base + 9 * C + offs_c, tl.sum(s_bias, axis=0), mask=c_mask)
