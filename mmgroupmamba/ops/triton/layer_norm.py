"""Triton kernels of the LayerNorm over the channels of channels-last tokens
(:func:`mmgroupmamba.ops.fused.layer_norm`).

Rows are tokens, ``(M, C)`` with contiguous channels; GroupMamba's widths (64 to 512) make
short rows, for which PyTorch's kernel is slow. One program normalises ``BLOCK_M`` rows with
all ``C`` channels in float32 and writes the output in the dtype the caller asks for (the
compute dtype where a matmul follows), the per-row mean and reciprocal deviation. Backward
writes the input gradient and per-program partial sums of the weight and bias gradients over a
fixed number of programs (deterministic, no atomics), reduced afterwards.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries

# Elements of a program's tile, and the number of backward programs (each loops over row blocks,
# so that the partial sums stay small).
_TILE = 4096
_BWD_TILE = 2048
_BWD_PROGRAMS = 1024


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``(M, C)`` with contiguous channels, weight and bias ``(C,)`` -> ``(out (M, C)
    contiguous in out_dtype, mean (M,), rstd (M,))``, the statistics float32."""
    M, C = x.shape
    out = torch.empty((M, C), dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_c, block_m = _blocks(C, M, _TILE)
    _layer_norm_fwd_kernel[(triton.cdiv(M, block_m), )](
        x, weight.contiguous(), bias.contiguous(), out, mean, rstd, M, C, x.stride(0), eps,
        BLOCK_M=block_m, BLOCK_C=block_c)
    return out, mean, rstd


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_out, x ``(M, C)`` with contiguous channels -> ``(grad_x (M, C) contiguous in x's
    dtype, grad_weight (C,), grad_bias (C,))``, the last two float32."""
    M, C = x.shape
    grad_x = torch.empty((M, C), dtype=x.dtype, device=x.device)
    block_c, block_m = _blocks(C, M, _BWD_TILE)
    programs = min(_BWD_PROGRAMS, triton.cdiv(M, block_m))
    partial = torch.empty((2, programs, C), dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(programs, )](
        grad_out, x, weight.contiguous(), mean, rstd, grad_x, partial, M, C, grad_out.stride(0),
        x.stride(0), BLOCK_M=block_m, BLOCK_C=block_c)
    sums = partial.sum(dim=1)
    return grad_x, sums[0], sums[1]


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_layer_norm_fwd_kernel, _layer_norm_bwd_kernel)


def _blocks(C: int, M: int, tile: int) -> Tuple[int, int]:
    block_c = triton.next_power_of_2(C)
    return block_c, max(1, min(triton.next_power_of_2(M), tile // block_c))


@triton.jit(do_not_specialize=['M'])
def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr, M, C, xs_m, eps,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_mask = rows < M
    c_mask = cols < C
    mask = row_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * xs_m + cols[None, :], mask=mask, other=0.)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=['M'])
def _layer_norm_bwd_kernel(go_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, gx_ptr, partial_ptr, M, C,
                           gos_m, xs_m, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program p takes row blocks p, p + P, p + 2P, ... (P programs) and accumulates the weight
    # and bias gradients of its rows, stored to partial[0, p] and partial[1, p].
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    grad_w = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    for block in range(program, tl.cdiv(M, BLOCK_M), programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < M
        mask = row_mask[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * xs_m + cols[None, :], mask=mask, other=0.)
        go = tl.load(go_ptr + rows[:, None] * gos_m + cols[None, :], mask=mask, other=0.)
        go = go.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.)
        x_hat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.)
        grad_hat = go * w[None, :]
        grad_x = rstd[:, None] * (grad_hat - (tl.sum(grad_hat, axis=1) / C)[:, None]
                                  - x_hat * (tl.sum(grad_hat * x_hat, axis=1) / C)[:, None])
        tl.store(gx_ptr + rows[:, None] * C + cols[None, :],
                 grad_x.to(gx_ptr.dtype.element_ty), mask=mask)
        grad_w += tl.sum(go * x_hat, axis=0)
        grad_b += tl.sum(go, axis=0)
    tl.store(partial_ptr + program * C + cols, grad_w, mask=c_mask)
    tl.store(partial_ptr + (programs + program) * C + cols, grad_b, mask=c_mask)
