"""Triton kernels of the LayerNorm over the channels of channels-last tokens
(:func:`mmgroupmamba.ops.fused.layer_norm` and :func:`~mmgroupmamba.ops.fused.mixer_norm`).

Tokens are ``B`` images of ``L`` rows of ``C`` channels, ``(B * L, C)`` with contiguous channels;
GroupMamba's widths (64 to 512) make short rows, for which PyTorch's kernel is slow. One program
normalises ``BLOCK_L`` rows of one image with all ``C`` channels in float32 and writes the output
in the dtype the caller asks for, the per-row mean and reciprocal deviation, and optionally (for
the GroupMamba layer's input) a channel-major copy ``(B, C, L)`` of the output and its channel
means (per-program partial means, reduced afterwards). Backward sums the gradients of the outputs
it was given and writes the input gradient and per-program partial sums of the weight and bias
gradients over a fixed number of programs (deterministic, no atomics), reduced afterwards.
Inside a block, the residual sum before the FFN's norm is made by the same pass (its input is
``x + branch``, which it also writes), and backward adds the residual stream's gradient and writes
the sum for both addends.
"""
import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries, cdiv, next_power_of_2

# Elements of a program's tile, and the number of backward programs (each loops over row blocks,
# so that the partial sums stay small).
_TILE = 4096
_BWD_TILE = 2048
_BWD_PROGRAMS = 1024
_MIN_ROWS = 16


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            out_dtype: torch.dtype, images: int = 1, token_dtype: Optional[torch.dtype] = None,
            channel_means: bool = False, residual: Optional[torch.Tensor] = None,
            residual_scale: Optional[torch.Tensor] = None, *,
            cfg: Optional[Tuple[int, int, int]] = None):
    """x ``(images * L, C)`` with contiguous channels, weight and bias ``(C,)`` -> ``(out
    (images * L, C) contiguous in out_dtype, mean, rstd, tokens, means, total)``: the statistics
    float32 ``(images * L,)``; with ``token_dtype``, ``tokens`` the output again as ``(images, C,
    L)`` in that dtype (else None); with ``channel_means``, ``means`` the output's means over
    each image's rows, float32 ``(images, C)`` (else None). With ``residual`` (like x, contiguous
    channels), the norm's input is ``total = x + residual`` (in x's dtype, contiguous; else
    None), the residual times ``residual_scale[image]`` where given (``(images,)``). ``cfg``
    ``(BLOCK_C, BLOCK_L, warps)`` overrides the planned tile (for tuning)."""
    M, C = x.shape
    L = M // images
    out = torch.empty((M, C), dtype=out_dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_c, block_l, warps = plan(C, L) if cfg is None else cfg
    l_blocks = cdiv(L, block_l)
    tokens = (None if token_dtype is None else
              torch.empty((images, C, L), dtype=token_dtype, device=x.device))
    partial = (torch.empty((images, l_blocks, C), dtype=torch.float32, device=x.device)
               if channel_means else None)
    total = None if residual is None else torch.empty((M, C), dtype=x.dtype, device=x.device)
    _layer_norm_fwd_kernel[(images, l_blocks)](
        x, _or(residual, x), _or(residual_scale, mean), _or(total, x), weight.contiguous(),
        bias.contiguous(), out, mean, rstd, _or(tokens, out), _or(partial, mean), L, C,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0), eps,
        RESIDUAL=residual is not None, SCALED=residual_scale is not None,
        TOKENS=tokens is not None, MEANS=channel_means,
        BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)
    means = partial.sum(dim=1) if channel_means else None
    return out, mean, rstd, tokens, means, total


def backward(grad_out: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
             mean: torch.Tensor, rstd: torch.Tensor, images: int = 1,
             grad_tokens: Optional[torch.Tensor] = None,
             grad_means: Optional[torch.Tensor] = None,
             grad_input: Optional[torch.Tensor] = None,
             residual_dtype: Optional[torch.dtype] = None,
             residual_scale: Optional[torch.Tensor] = None, *,
             cfg: Optional[Tuple[int, int, int]] = None):
    """The gradient at the output is the sum of those given: ``grad_out`` ``(images * L, C)``
    with contiguous channels, ``grad_tokens`` (the channel-major copy's, ``(images, C, L)``
    contiguous) and ``grad_means`` (the channel means', ``(images, C)``); ``x`` is the norm's
    input. -> ``(grad_x (images * L, C) contiguous in x's dtype, grad_weight (C,), grad_bias
    (C,), grad_residual)``, the weight and bias gradients float32. ``grad_input`` (like x,
    contiguous channels) is a gradient that reaches the norm's input from elsewhere (the
    residual stream's), added to grad_x; with ``residual_dtype``, ``grad_residual`` is grad_x
    again in that dtype (else None), times ``residual_scale[image]`` where given. ``cfg``
    overrides the planned tile, as for :func:`forward`."""
    M, C = x.shape
    L = M // images
    grad_x = torch.empty((M, C), dtype=x.dtype, device=x.device)
    grad_residual = (None if residual_dtype is None else
                     torch.empty((M, C), dtype=residual_dtype, device=x.device))
    block_c, block_l, warps = plan(C, L, backward=True) if cfg is None else cfg
    l_blocks = cdiv(L, block_l)
    programs = min(_BWD_PROGRAMS, images * l_blocks)
    partial = torch.empty((2, programs, C), dtype=torch.float32, device=x.device)
    _layer_norm_bwd_kernel[(programs, )](
        _or(grad_out, x), _or(grad_tokens, x), _or(grad_means, x), _or(grad_input, x), x,
        weight.contiguous(), mean, rstd, grad_x, _or(grad_residual, grad_x),
        _or(residual_scale, mean), partial, L, C,
        images * l_blocks, l_blocks, x.stride(0) if grad_out is None else grad_out.stride(0),
        x.stride(0) if grad_input is None else grad_input.stride(0), x.stride(0),
        HAS_GRAD_OUT=grad_out is not None, HAS_GRAD_TOKENS=grad_tokens is not None,
        HAS_GRAD_MEANS=grad_means is not None, HAS_GRAD_INPUT=grad_input is not None,
        RESIDUAL_GRAD=grad_residual is not None, SCALED=residual_scale is not None,
        BLOCK_L=block_l, BLOCK_C=block_c,
        num_warps=warps)
    sums = partial.sum(dim=1)
    return grad_x, sums[0], sums[1], grad_residual


def plan(C: int, L: int, backward: bool = False) -> Tuple[int, int, int]:
    """The planned ``(BLOCK_C, BLOCK_L, warps)`` of the forward (or backward) kernel for rows
    of ``C`` channels, ``L`` rows per image."""
    return _blocks(C, L, _BWD_TILE if backward else _TILE)


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_layer_norm_fwd_kernel, _layer_norm_bwd_kernel)


@functools.lru_cache(maxsize=1024)  # asked on every call; sizes repeat
def _blocks(C: int, L: int, tile: int) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_L, warps): all channels by the rows of about ``tile`` elements, at least
    16 rows (the channel-major copy stores runs of BLOCK_L tokens), 8 warps past 4096
    elements."""
    block_c = next_power_of_2(C)
    block_l = max(_MIN_ROWS, min(next_power_of_2(L), tile // block_c))
    return block_c, block_l, 8 if block_c * block_l > 4096 else 4


def _or(tensor: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a tensor to pass for a pointer the kernel will not touch."""
    return stand_in if tensor is None else tensor


@triton.jit(do_not_specialize=['L'])
def _layer_norm_fwd_kernel(x_ptr, r_ptr, s_ptr, total_ptr, w_ptr, b_ptr, out_ptr, mean_ptr,
                           rstd_ptr, tokens_ptr, means_ptr, L, C, xs_m, rs_m, eps,
                           RESIDUAL: tl.constexpr, SCALED: tl.constexpr, TOKENS: tl.constexpr,
                           MEANS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    rows = b * L + offs_l
    cols = tl.arange(0, BLOCK_C)
    l_mask = offs_l < L
    c_mask = cols < C
    mask = l_mask[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * xs_m + cols[None, :], mask=mask, other=0.)
    if RESIDUAL:
        # The residual stream's sum rounded to its dtype (as PyTorch adds it), then normalised.
        r = tl.load(r_ptr + rows[:, None] * rs_m + cols[None, :], mask=mask,
                    other=0.).to(tl.float32)
        if SCALED:  # the image's factor (stochastic depth)
            r = r * tl.load(s_ptr + b).to(tl.float32)
        x = (x.to(tl.float32) + r).to(total_ptr.dtype.element_ty)
        tl.store(total_ptr + rows[:, None] * C + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    centred = tl.where(mask, x - mean[:, None], 0.)
    rstd = 1. / tl.sqrt(tl.sum(centred * centred, axis=1) / C + eps)
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    bias = tl.load(b_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :] + bias[None, :]
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask)
    tl.store(mean_ptr + rows, mean, mask=l_mask)
    tl.store(rstd_ptr + rows, rstd, mask=l_mask)
    if TOKENS:
        # Transposed in registers, so that the store runs along the tokens (contiguous there).
        tokens = tokens_ptr + b * C * L + cols[:, None] * L + offs_l[None, :]
        tl.store(tokens, tl.trans(out).to(tokens_ptr.dtype.element_ty),
                 mask=c_mask[:, None] & l_mask[None, :])
    if MEANS:
        slot = (b * tl.num_programs(1) + tl.program_id(1)) * C + cols
        tl.store(means_ptr + slot, tl.sum(tl.where(mask, out, 0.), axis=0) / L, mask=c_mask)


@triton.jit(do_not_specialize=['L', 'blocks', 'l_blocks'])
def _layer_norm_bwd_kernel(go_ptr, gt_ptr, gm_ptr, gi_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr,
                           gx_ptr, gr_ptr, s_ptr, partial_ptr, L, C, blocks, l_blocks, gos_m, gis_m,
                           xs_m, HAS_GRAD_OUT: tl.constexpr, HAS_GRAD_TOKENS: tl.constexpr,
                           HAS_GRAD_MEANS: tl.constexpr, HAS_GRAD_INPUT: tl.constexpr,
                           RESIDUAL_GRAD: tl.constexpr, SCALED: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program p takes blocks p, p + P, p + 2P, ... (P programs; block = image * l_blocks + row
    # block) and accumulates the weight and bias gradients of its rows, stored to partial[0, p]
    # and partial[1, p].
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    c_mask = cols < C
    w = tl.load(w_ptr + cols, mask=c_mask, other=0.).to(tl.float32)
    grad_w = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    grad_b = tl.zeros((BLOCK_C, ), dtype=tl.float32)
    for block in range(program, blocks, programs):
        offs_l = (block % l_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
        rows = ((block // l_blocks) * L + offs_l).to(tl.int64)
        first = rows - offs_l  # the image's first row, b * L
        l_mask = offs_l < L
        mask = l_mask[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * xs_m + cols[None, :], mask=mask, other=0.)
        go = tl.zeros((BLOCK_L, BLOCK_C), dtype=tl.float32)
        if HAS_GRAD_OUT:
            go += tl.load(go_ptr + rows[:, None] * gos_m + cols[None, :], mask=mask,
                          other=0.).to(tl.float32)
        if HAS_GRAD_TOKENS:
            tokens = gt_ptr + first[None, :] * C + cols[:, None] * L + offs_l[None, :]
            go += tl.trans(tl.load(tokens, mask=c_mask[:, None] & l_mask[None, :],
                                   other=0.).to(tl.float32))
        if HAS_GRAD_MEANS:
            go += tl.load(gm_ptr + (first // L)[:, None] * C + cols[None, :], mask=mask,
                          other=0.).to(tl.float32) / L
        go = tl.where(mask, go, 0.)
        mean = tl.load(mean_ptr + rows, mask=l_mask, other=0.)
        rstd = tl.load(rstd_ptr + rows, mask=l_mask, other=0.)
        x_hat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.)
        grad_hat = go * w[None, :]
        grad_x = rstd[:, None] * (grad_hat - (tl.sum(grad_hat, axis=1) / C)[:, None]
                                  - x_hat * (tl.sum(grad_hat * x_hat, axis=1) / C)[:, None])
        if HAS_GRAD_INPUT:
            grad_x += tl.load(gi_ptr + rows[:, None] * gis_m + cols[None, :], mask=mask,
                              other=0.).to(tl.float32)
        tl.store(gx_ptr + rows[:, None] * C + cols[None, :],
                 grad_x.to(gx_ptr.dtype.element_ty), mask=mask)
        if RESIDUAL_GRAD:
            grad_r = grad_x
            if SCALED:
                grad_r = grad_r * tl.load(s_ptr + block // l_blocks).to(tl.float32)
            tl.store(gr_ptr + rows[:, None] * C + cols[None, :],
                     grad_r.to(gr_ptr.dtype.element_ty), mask=mask)
        grad_w += tl.sum(go * x_hat, axis=0)
        grad_b += tl.sum(go, axis=0)
    tl.store(partial_ptr + program * C + cols, grad_w, mask=c_mask)
    tl.store(partial_ptr + (programs + program) * C + cols, grad_b, mask=c_mask)
