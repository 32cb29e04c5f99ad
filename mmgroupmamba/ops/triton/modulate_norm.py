"""Triton kernels of the GroupMamba layer's tail (:func:`mmgroupmamba.ops.fused.modulate_norm`):
``LayerNorm(x * skip_scale * m * affinity)`` over the channels of every token.

``x`` is channels-last (``(B, L, C)`` with contiguous channels), ``m`` (the mixer's output)
usually channel-major (``(B, C, L)`` memory viewed as ``(B, L, C)``); both are read as they lie.
One program takes ``BLOCK_T`` tokens of one image with all ``C`` channels. Forward writes the
normalised output and the per-token mean and reciprocal deviation; backward recomputes the
product, writes the gradients of ``x`` and ``m`` in their own layouts and per-program partial
sums for the LayerNorm's weight and bias, the affinity (per image) and ``skip_scale``, reduced
afterwards (deterministic, no atomics).
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries, cdiv, next_power_of_2

# Elements of a program's tile.
_TILE = 4096
_BWD_TILE = 2048


def forward(x: torch.Tensor, m: torch.Tensor, skip_scale: torch.Tensor,
            affinity: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
            eps: float, out_dtype: torch.dtype
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, m ``(B, L, C)``, skip_scale ``(1,)``, affinity ``(B, C)`` or None, weight and bias
    ``(C,)`` -> ``(out (B, L, C) contiguous in out_dtype, mean, rstd)``, the statistics float32
    ``(B, L)``."""
    B, L, C = x.shape
    out = torch.empty((B, L, C), dtype=out_dtype, device=x.device)
    mean = torch.empty((B, L), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_c, block_t = _blocks(C, L, _TILE)
    has_affinity = affinity is not None
    affinity = affinity.contiguous() if has_affinity else x
    _modulate_norm_fwd_kernel[(B, cdiv(L, block_t))](
        x, m, skip_scale, affinity, weight.contiguous(), bias.contiguous(), out, mean, rstd,
        L, C, eps, *x.stride(), *m.stride(), HAS_AFFINITY=has_affinity, BLOCK_T=block_t,
        BLOCK_C=block_c)
    return out, mean, rstd


def backward(grad_out: torch.Tensor, x: torch.Tensor, m: torch.Tensor, skip_scale: torch.Tensor,
             affinity: Optional[torch.Tensor], weight: torch.Tensor, mean: torch.Tensor,
             rstd: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """-> ``(grad_x like x, grad_m like m, grad_skip_scale (1,), grad_affinity (B, C) or None,
    grad_weight (C,), grad_bias (C,))``, the last four float32."""
    B, L, C = x.shape
    grad_x = torch.empty_like(x)
    grad_m = torch.empty_like(m)
    block_c, block_t = _blocks(C, L, _BWD_TILE)
    t_blocks = cdiv(L, block_t)
    partial = torch.empty((4, B, t_blocks, C), dtype=torch.float32, device=x.device)
    has_affinity = affinity is not None
    affinity = affinity.contiguous() if has_affinity else x
    _modulate_norm_bwd_kernel[(B, t_blocks)](
        grad_out, x, m, skip_scale, affinity, weight.contiguous(), mean, rstd, grad_x, grad_m,
        partial, L, C, t_blocks, *grad_out.stride(), *x.stride(), *m.stride(),
        *grad_x.stride(), *grad_m.stride(), HAS_AFFINITY=has_affinity, BLOCK_T=block_t,
        BLOCK_C=block_c)
    per_image = partial.sum(dim=2)  # (4, B, C)
    totals = per_image.sum(dim=1)  # (4, C)
    grad_weight, grad_bias = totals[0], totals[1]
    grad_affinity = per_image[2] if has_affinity else None
    grad_skip_scale = totals[3].sum().reshape(1)
    return grad_x, grad_m, grad_skip_scale, grad_affinity, grad_weight, grad_bias


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_modulate_norm_fwd_kernel, _modulate_norm_bwd_kernel)


@functools.lru_cache(maxsize=1024)  # asked on every call; sizes repeat
def _blocks(C: int, L: int, tile: int) -> Tuple[int, int]:
    block_c = next_power_of_2(C)
    return block_c, max(1, min(next_power_of_2(L), tile // block_c))


@triton.jit
def _product(x_ptr, m_ptr, s_ptr, a_ptr, b, offs_t, offs_c, mask, C, xs_b, xs_t, xs_c, ms_b,
             ms_t, ms_c, HAS_AFFINITY: tl.constexpr):
    """x, m (float32 tiles), skip_scale (a scalar), the affinity (a (1, BLOCK_C) row, ones
    without) and the product of all four."""
    t = offs_t[:, None]
    c = offs_c[None, :]
    x = tl.load(x_ptr + b * xs_b + t * xs_t + c * xs_c, mask=mask, other=0.).to(tl.float32)
    m = tl.load(m_ptr + b * ms_b + t * ms_t + c * ms_c, mask=mask, other=0.).to(tl.float32)
    skip = tl.load(s_ptr).to(tl.float32)
    affinity = tl.full((1, offs_c.shape[0]), 1., tl.float32)
    if HAS_AFFINITY:
        affinity = tl.load(a_ptr + b * C + c, mask=c < C, other=0.).to(tl.float32)
    return x, m, skip, affinity, x * m * (skip * affinity)


@triton.jit(do_not_specialize=['L'])
def _modulate_norm_fwd_kernel(x_ptr, m_ptr, s_ptr, a_ptr, w_ptr, bias_ptr, out_ptr, mean_ptr,
                              rstd_ptr, L, C, eps, xs_b, xs_t, xs_c, ms_b, ms_t, ms_c,
                              HAS_AFFINITY: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    t_mask = offs_t < L
    mask = t_mask[:, None] & (offs_c < C)[None, :]
    _, _, _, _, p = _product(x_ptr, m_ptr, s_ptr, a_ptr, b, offs_t, offs_c, mask, C, xs_b, xs_t,
                          xs_c, ms_b, ms_t, ms_c, HAS_AFFINITY)
    mean = tl.sum(p, axis=1) / C
    centred = tl.where(mask, p - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.).to(tl.float32)
    bias = tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :] + bias[None, :]
    rows = b * L + offs_t
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(mean_ptr + rows, mean, mask=t_mask)
    tl.store(rstd_ptr + rows, rstd, mask=t_mask)


@triton.jit(do_not_specialize=['L', 't_blocks'])
def _modulate_norm_bwd_kernel(go_ptr, x_ptr, m_ptr, s_ptr, a_ptr, w_ptr, mean_ptr, rstd_ptr,
                              gx_ptr, gm_ptr, partial_ptr, L, C, t_blocks, gos_b, gos_t, gos_c,
                              xs_b, xs_t, xs_c, ms_b, ms_t, ms_c, gxs_b, gxs_t, gxs_c, gms_b,
                              gms_t, gms_c, HAS_AFFINITY: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    t_mask = offs_t < L
    c_mask = offs_c < C
    mask = t_mask[:, None] & c_mask[None, :]
    t = offs_t[:, None]
    c = offs_c[None, :]
    x, m, skip, affinity, p = _product(x_ptr, m_ptr, s_ptr, a_ptr, b, offs_t, offs_c, mask, C, xs_b,
                              xs_t, xs_c, ms_b, ms_t, ms_c, HAS_AFFINITY)
    go = tl.load(go_ptr + b * gos_b + t * gos_t + c * gos_c, mask=mask, other=0.).to(tl.float32)
    rows = b * L + offs_t
    mean = tl.load(mean_ptr + rows, mask=t_mask, other=0.)
    rstd = tl.load(rstd_ptr + rows, mask=t_mask, other=0.)
    w = tl.load(w_ptr + offs_c, mask=c_mask, other=0.).to(tl.float32)
    p_hat = tl.where(mask, (p - mean[:, None]) * rstd[:, None], 0.)
    grad_hat = go * w[None, :]
    grad_p = rstd[:, None] * (grad_hat - (tl.sum(grad_hat, axis=1) / C)[:, None]
                              - p_hat * (tl.sum(grad_hat * p_hat, axis=1) / C)[:, None])
    scale = skip * affinity
    tl.store(gx_ptr + b * gxs_b + t * gxs_t + c * gxs_c,
             (grad_p * m * scale).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(gm_ptr + b * gms_b + t * gms_t + c * gms_c,
             (grad_p * x * scale).to(gm_ptr.dtype.element_ty), mask=mask)
    # partial[k, b, t_block, :]: 0 the weight's, 1 the bias's, 2 the affinity's gradient sums
    # over this tile's tokens, 3 skip_scale's (spread over the channels).
    grad_xm = tl.sum(grad_p * x * m, axis=0)
    plane = tl.num_programs(0).to(tl.int64) * t_blocks * C
    slot = (b * t_blocks + tl.program_id(1)) * C + offs_c
    tl.store(partial_ptr + slot, tl.sum(go * p_hat, axis=0), mask=c_mask)
    tl.store(partial_ptr + plane + slot, tl.sum(go, axis=0), mask=c_mask)
    tl.store(partial_ptr + 2 * plane + slot, grad_xm * skip, mask=c_mask)
    tl.store(partial_ptr + 3 * plane + slot, grad_xm * tl.sum(affinity, axis=0), mask=c_mask)
