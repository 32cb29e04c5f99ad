"""Triton kernels of the SS2D output's group LayerNorm times ``SiLU(z)``
(:func:`mmgroupmamba.ops.fused.group_norm_gate`).

``y`` and ``z`` are ``(B, G, d, L)`` maps, normalised over ``d`` (stride ``L``) at every token.
One program takes a ``[BLOCK_D, BLOCK_L]`` tile of one image and group, all ``d`` channels of
``BLOCK_L`` tokens: loads and stores are coalesced along ``L`` and the statistics are a reduction
over the tile's first axis, in float32. Forward reads ``y`` and ``z`` once and writes the output
and the per-token mean and reciprocal deviation; backward reads ``y``, ``z`` and the output
gradient once, recomputes the rest, writes both input gradients and per-program partial sums of
the affine parameters' gradients (reduced afterwards: deterministic, no atomics).
"""
import functools
from typing import Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries, cdiv, next_power_of_2

# Elements of a program's tile: backward holds about eight float32 tiles live.
_TILE = 4096
_BWD_TILE = 2048


def forward(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, z ``(B, G, d, L)`` (any strides along ``L``-contiguous rows), weight and bias ``(G, d)``
    -> ``(out like z, mean, rstd)``, the statistics float32 ``(B, G, 1, L)``."""
    B, G, d, L = y.shape
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    mean = torch.empty((B, G, 1, L), dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    block_d, block_l = _blocks(d, L, _TILE)
    grid = (B * G, cdiv(L, block_l))
    _norm_gate_fwd_kernel[grid](
        y, z, weight.contiguous(), bias.contiguous(), out, mean, rstd, G, d, L, eps,
        *_strides(y), *_strides(z), *_strides(out), BLOCK_D=block_d, BLOCK_L=block_l)
    return out, mean, rstd


def backward(grad_out: torch.Tensor, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``(grad_y like y, grad_z like z, grad_weight, grad_bias)``, the last two float32
    ``(G, d)``."""
    B, G, d, L = y.shape
    grad_y = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    block_d, block_l = _blocks(d, L, _BWD_TILE)
    l_blocks = cdiv(L, block_l)
    partial = torch.empty((2, B, l_blocks, G, d), dtype=torch.float32, device=y.device)
    _norm_gate_bwd_kernel[(B * G, l_blocks)](
        grad_out, y, z, weight.contiguous(), bias.contiguous(), mean, rstd, grad_y, grad_z,
        partial, G, d, L, l_blocks, partial[0].numel(), *_strides(grad_out), *_strides(y), *_strides(z),
        *_strides(grad_y), *_strides(grad_z), BLOCK_D=block_d, BLOCK_L=block_l)
    sums = partial.sum(dim=(1, 2))
    return grad_y, grad_z, sums[0], sums[1]


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_norm_gate_fwd_kernel, _norm_gate_bwd_kernel)


@functools.lru_cache(maxsize=1024)  # asked on every call; sizes repeat
def _blocks(d: int, L: int, tile: int) -> Tuple[int, int]:
    block_d = next_power_of_2(d)
    return block_d, max(1, min(next_power_of_2(L), tile // block_d))


def _strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """(image, group, channel) strides of a ``(B, G, d, L)`` map whose tokens are contiguous."""
    assert x.stride(3) == 1, 'the kernels take maps whose tokens (last axis) are contiguous'
    return x.stride(0), x.stride(1), x.stride(2)


@triton.jit
def _tile(program, G, d, L, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's image, group, channels, tokens and tile mask."""
    b = (program // G).to(tl.int64)
    g = program % G
    offs_d = tl.arange(0, BLOCK_D)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (offs_d < d)[:, None] & (offs_l < L)[None, :]
    return b, g, offs_d, offs_l, mask


@triton.jit
def _norm_gate_fwd_kernel(y_ptr, z_ptr, w_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, G, d, L,
                          eps, ys_b, ys_g, ys_d, zs_b, zs_g, zs_d, os_b, os_g, os_d,
                          BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    program = tl.program_id(0)
    b, g, offs_d, offs_l, mask = _tile(program, G, d, L, BLOCK_D, BLOCK_L)
    y = tl.load(y_ptr + b * ys_b + g * ys_g + offs_d[:, None] * ys_d + offs_l[None, :],
                mask=mask, other=0.).to(tl.float32)
    z = tl.load(z_ptr + b * zs_b + g * zs_g + offs_d[:, None] * zs_d + offs_l[None, :],
                mask=mask, other=0.).to(tl.float32)
    mean = tl.sum(y, axis=0) / d
    centred = tl.where(mask, y - mean[None, :], 0.)
    rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=0) / d + eps)
    w = tl.load(w_ptr + g * d + offs_d, mask=offs_d < d, other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + g * d + offs_d, mask=offs_d < d, other=0.).to(tl.float32)
    normed = centred * rstd[None, :] * w[:, None] + bias[:, None]
    out = normed * z * tl.sigmoid(z)
    tl.store(out_ptr + b * os_b + g * os_g + offs_d[:, None] * os_d + offs_l[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    stats = program.to(tl.int64) * L + offs_l
    tl.store(mean_ptr + stats, mean, mask=offs_l < L)
    tl.store(rstd_ptr + stats, rstd, mask=offs_l < L)


@triton.jit
def _norm_gate_bwd_kernel(go_ptr, y_ptr, z_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, gy_ptr,
                          gz_ptr, partial_ptr, G, d, L, l_blocks, plane, gos_b, gos_g, gos_d,
                          ys_b, ys_g, ys_d, zs_b, zs_g, zs_d, gys_b, gys_g, gys_d, gzs_b, gzs_g,
                          gzs_d, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    program = tl.program_id(0)
    b, g, offs_d, offs_l, mask = _tile(program, G, d, L, BLOCK_D, BLOCK_L)
    rows = offs_d[:, None]
    cols = offs_l[None, :]
    go = tl.load(go_ptr + b * gos_b + g * gos_g + rows * gos_d + cols, mask=mask,
                 other=0.).to(tl.float32)
    y = tl.load(y_ptr + b * ys_b + g * ys_g + rows * ys_d + cols, mask=mask,
                other=0.).to(tl.float32)
    z = tl.load(z_ptr + b * zs_b + g * zs_g + rows * zs_d + cols, mask=mask,
                other=0.).to(tl.float32)
    stats = program.to(tl.int64) * L + offs_l
    mean = tl.load(mean_ptr + stats, mask=offs_l < L, other=0.)
    rstd = tl.load(rstd_ptr + stats, mask=offs_l < L, other=0.)
    w = tl.load(w_ptr + g * d + offs_d, mask=offs_d < d, other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + g * d + offs_d, mask=offs_d < d, other=0.).to(tl.float32)
    y_hat = tl.where(mask, (y - mean[None, :]) * rstd[None, :], 0.)
    normed = y_hat * w[:, None] + bias[:, None]
    sig = tl.sigmoid(z)
    grad_z = go * normed * sig * (1. + z * (1. - sig))
    grad_normed = go * z * sig
    grad_hat = grad_normed * w[:, None]
    mean_grad = tl.sum(grad_hat, axis=0) / d
    mean_grad_y_hat = tl.sum(grad_hat * y_hat, axis=0) / d
    grad_y = rstd[None, :] * (grad_hat - mean_grad[None, :] - y_hat * mean_grad_y_hat[None, :])
    tl.store(gy_ptr + b * gys_b + g * gys_g + rows * gys_d + cols,
             grad_y.to(gy_ptr.dtype.element_ty), mask=mask)
    tl.store(gz_ptr + b * gzs_b + g * gzs_g + rows * gzs_d + cols,
             grad_z.to(gz_ptr.dtype.element_ty), mask=mask)
    # partial[0 | 1, b, l_block, g, :]: this tile's sums for the weight and bias gradients.
    slot = ((b * l_blocks + tl.program_id(1)) * G + g) * d + offs_d
    tl.store(partial_ptr + slot, tl.sum(grad_normed * y_hat, axis=1), mask=offs_d < d)
    tl.store(partial_ptr + plane + slot, tl.sum(grad_normed, axis=1), mask=offs_d < d)
