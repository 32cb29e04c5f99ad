"""Triton kernels of the depthwise 3 x 3 convolution (stride 1, zero 'same' padding).

Tensors are ``(B, C, H, W)`` with any strides: the kernels take them as they lie, so NCHW maps and
channels-last maps (NHWC memory) are read without copies, and the outputs are allocated with the
input's layout. Each program computes a ``BLOCK_W x BLOCK_C`` tile of one image row, vectorised
along whichever of W and C is contiguous, accumulating in float32. The input gradient is the same
kernel with the taps mirrored; the weight and bias gradients reduce rows of the output gradient
against shifted input rows into per-program partial sums (no atomics: deterministic), summed
afterwards.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Elements per program tile (the weight gradient keeps ten float32 tiles of partial sums), and
# rows per weight-gradient program.
_TILE = 2048
_WGRAD_TILE = 512
_WGRAD_ROWS = 8


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x ``(B, C, H, W)``, weight ``(C, 1, k, k)``, bias ``(C,)`` or None -> y like x."""
    y = torch.empty_like(x)
    _stencil(x, weight, bias, y, mirrored=False)
    return y


def backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, with_bias: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(grad_x like x, grad_weight float32 ``(C, 1, 3, 3)``, grad_bias float32 ``(C,)`` or None)."""
    assert weight.shape[-1] == 3, 'the weight-gradient kernel is written for 3 x 3 taps'
    grad_x = torch.empty_like(x)
    _stencil(grad_y, weight, None, grad_x, mirrored=True)
    B, C, H, W = x.shape
    block_w, block_c = _blocks(x, _WGRAD_TILE)
    row_blocks = triton.cdiv(H, _WGRAD_ROWS)
    partial = torch.empty((B * row_blocks, 10, C), dtype=torch.float32, device=x.device)
    _dwconv_wgrad_kernel[(B * row_blocks, triton.cdiv(C, block_c))](
        x, grad_y, partial, H, W, C, *x.stride(), *grad_y.stride(), row_blocks,
        ROWS=_WGRAD_ROWS, BLOCK_W=block_w, BLOCK_C=block_c)
    sums = partial.sum(0)
    grad_weight = sums[:9].t().contiguous().view(C, 1, 3, 3)
    grad_bias = sums[9].clone() if with_bias else None
    return grad_x, grad_weight, grad_bias


def _blocks(x: torch.Tensor, tile: int = _TILE) -> Tuple[int, int]:
    """(BLOCK_W, BLOCK_C) of ``tile`` elements: the contiguous axis gets up to 64, the other the
    rest."""
    _, C, _, W = x.shape
    if x.stride(1) == 1 and C > 1:
        block_c = min(64, triton.next_power_of_2(C))
        return min(triton.next_power_of_2(W), tile // block_c), block_c
    block_w = min(64, triton.next_power_of_2(W))
    return block_w, min(triton.next_power_of_2(C), tile // block_w)


def _stencil(src, weight, bias, dst, mirrored: bool):
    B, C, H, W = src.shape
    block_w, block_c = _blocks(dst)
    # The kernel indexes the taps and bias densely (parameters are; a view might not be).
    has_bias = bias is not None
    weight = weight.contiguous()
    bias = bias.contiguous() if has_bias else src
    _dwconv_stencil_kernel[(B * H, triton.cdiv(W, block_w), triton.cdiv(C, block_c))](
        src, weight, bias, dst, H, W, C, *src.stride(), *dst.stride(),
        K=weight.shape[-1], MIRRORED=mirrored, HAS_BIAS=has_bias, BLOCK_W=block_w,
        BLOCK_C=block_c)


@triton.jit
def _dwconv_stencil_kernel(src_ptr, w_ptr, bias_ptr, dst_ptr, H, W, C, ss_b, ss_c, ss_h, ss_w,
                           ds_b, ds_c, ds_h, ds_w, K: tl.constexpr, MIRRORED: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # Forward: dst[h, w] = sum_ij src[h + i - P, w + j - P] * w[i, j]. The input gradient
    # (MIRRORED) reads the output gradient at [h - i + P, w - j + P] with the same tap w[i, j].
    P: tl.constexpr = K // 2
    row = tl.program_id(0)
    b = (row // H).to(tl.int64)
    h = row % H
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    src = src_ptr + b * ss_b + offs_c[None, :] * ss_c
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):
        if MIRRORED:
            hh = h - i + P
        else:
            hh = h + i - P
        row_ok = (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            if MIRRORED:
                ww = offs_w - j + P
            else:
                ww = offs_w + j - P
            mask = row_ok & ((ww >= 0) & (ww < W))[:, None] & c_mask[None, :]
            v = tl.load(src + hh * ss_h + ww[:, None] * ss_w, mask=mask, other=0.)
            tap = tl.load(w_ptr + offs_c * (K * K) + (i * K + j), mask=c_mask, other=0.)
            acc += v.to(tl.float32) * tap.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_mask, other=0.).to(tl.float32)[None, :]
    dst = dst_ptr + b * ds_b + h * ds_h + offs_w[:, None] * ds_w + offs_c[None, :] * ds_c
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=(offs_w < W)[:, None] & c_mask[None, :])


@triton.jit
def _shifted(base, h, offs_w, DH: tl.constexpr, DW: tl.constexpr, H, W, s_h, s_w, mask):
    """Tile of ``base`` at rows ``h + DH`` and columns ``offs_w + DW`` (zero outside), float32."""
    hh = h + DH
    ww = offs_w + DW
    mask = mask & (hh >= 0) & (hh < H) & ((ww >= 0) & (ww < W))[:, None]
    return tl.load(base + hh * s_h + ww[:, None] * s_w, mask=mask, other=0.).to(tl.float32)


@triton.jit
def _dwconv_wgrad_kernel(x_ptr, g_ptr, partial_ptr, H, W, C, xs_b, xs_c, xs_h, xs_w, gs_b,
                         gs_c, gs_h, gs_w, row_blocks, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # partial[program, 3 * i + j, c] = sum over the program's rows of g[h, w] * x[h + i - 1,
    # w + j - 1]; partial[program, 9, c] = sum of g (the bias gradient). Elementwise partial
    # sums per tap, reduced across the tile once at the end.
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
    out = partial_ptr + program.to(tl.int64) * 10 * C + offs_c
    tl.store(out, tl.sum(s00, axis=0), mask=c_mask)
    tl.store(out + C, tl.sum(s01, axis=0), mask=c_mask)
    tl.store(out + 2 * C, tl.sum(s02, axis=0), mask=c_mask)
    tl.store(out + 3 * C, tl.sum(s10, axis=0), mask=c_mask)
    tl.store(out + 4 * C, tl.sum(s11, axis=0), mask=c_mask)
    tl.store(out + 5 * C, tl.sum(s12, axis=0), mask=c_mask)
    tl.store(out + 6 * C, tl.sum(s20, axis=0), mask=c_mask)
    tl.store(out + 7 * C, tl.sum(s21, axis=0), mask=c_mask)
    tl.store(out + 8 * C, tl.sum(s22, axis=0), mask=c_mask)
    tl.store(out + 9 * C, tl.sum(s_bias, axis=0), mask=c_mask)
