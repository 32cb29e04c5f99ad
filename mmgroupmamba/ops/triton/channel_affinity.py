"""Triton kernels of the channel affinity, ``sigmoid(W2 relu(W1 m + b1) + b2)`` of each image's
channel means ``m`` (:func:`mmgroupmamba.ops.fused.channel_affinity`).

The matrices are ``(B, C) x (C, R)`` and back (``R = C / 16``): as PyTorch operators, two GEMMs
and two activations forward and eight kernels backward for a few kilobytes, all launch cost. Here
one program per image computes the hidden units and then the outputs over blocks of channels, in
float32; backward recomputes both, writes the input gradient and the image's share of every
parameter gradient (outer products), which one reduction over images sums afterwards
(deterministic, no atomics).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import compiled_binaries, next_power_of_2

# Elements of a weight tile (R x BLOCK_C): at 4096 (R = 64, 64 channels) backward spills.
_TILE = 2048


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, block_c: Optional[int] = None) -> torch.Tensor:
    """x ``(B, C)`` contiguous, w1 ``(R, C)``, b1 ``(R,)``, w2 ``(C, R)``, b2 ``(C,)`` -> the
    affinity ``(B, C)`` in w1's dtype. ``block_c`` overrides the channels per loop step."""
    B, C = x.shape
    R = w1.shape[0]
    out = torch.empty((B, C), dtype=w1.dtype, device=x.device)
    block_r = next_power_of_2(R)
    _affinity_fwd_kernel[(B, )](x, w1, b1, w2, b2, out, C, R, BLOCK_R=block_r,
                                BLOCK_C=block_c or _block_c(block_r))
    return out


def backward(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
             w2: torch.Tensor, b2: torch.Tensor, block_c: Optional[int] = None
             ) -> Tuple[torch.Tensor, ...]:
    """grad_out ``(B, C)`` contiguous -> ``(grad_x like x, grad_w1, grad_b1, grad_w2,
    grad_b2)``, the parameters' float32 (views of one reduced buffer)."""
    B, C = x.shape
    R = w1.shape[0]
    grad_x = torch.empty_like(x)
    # Per image: grad_w1 (R * C), grad_b1 (R), grad_w2 (C * R), grad_b2 (C).
    size = 2 * R * C + R + C
    partial = torch.empty((B, size), dtype=torch.float32, device=x.device)
    block_r = next_power_of_2(R)
    _affinity_bwd_kernel[(B, )](grad_out, x, w1, b1, w2, b2, grad_x, partial, C, R, size,
                                BLOCK_R=block_r, BLOCK_C=block_c or _block_c(block_r))
    sums = partial.sum(dim=0)
    grad_w1, grad_b1, grad_w2, grad_b2 = sums.split([R * C, R, C * R, C])
    return grad_x, grad_w1.view(R, C), grad_b1, grad_w2.view(C, R), grad_b2


def _block_c(block_r: int) -> int:
    return max(16, min(128, _TILE // block_r))


def compiled_kernel_count() -> int:
    """Number of kernel binaries compiled so far in this process (forward and backward)."""
    return compiled_binaries(_affinity_fwd_kernel, _affinity_bwd_kernel)


@triton.jit
def _hidden(x_ptr, w1_ptr, b1_ptr, b, C, R, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Image ``b``'s hidden pre-activation ``W1 x + b1``, float32 ``[BLOCK_R]`` (0 past R)."""
    r = tl.arange(0, BLOCK_R)
    r_mask = r < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x = tl.load(x_ptr + b * C + c, mask=c_mask, other=0.).to(tl.float32)
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :],
                     mask=r_mask[:, None] & c_mask[None, :], other=0.).to(tl.float32)
        acc += tl.sum(w1 * x[None, :], axis=1)
    return acc + tl.load(b1_ptr + r, mask=r_mask, other=0.).to(tl.float32)


@triton.jit
def _output_block(w2_ptr, b2_ptr, h, c, C, R, BLOCK_R: tl.constexpr):
    """The sigmoid's input at channels ``c`` from the hidden units ``h``, and w2's tile."""
    r = tl.arange(0, BLOCK_R)
    c_mask = c < C
    w2 = tl.load(w2_ptr + c[:, None] * R + r[None, :],
                 mask=c_mask[:, None] & (r < R)[None, :], other=0.).to(tl.float32)
    pre = tl.sum(w2 * h[None, :], axis=1) + tl.load(b2_ptr + c, mask=c_mask,
                                                    other=0.).to(tl.float32)
    return pre, w2


@triton.jit(do_not_specialize=['C', 'R'])
def _affinity_fwd_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, C, R,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.maximum(_hidden(x_ptr, w1_ptr, b1_ptr, b, C, R, BLOCK_R, BLOCK_C), 0.)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        pre, _ = _output_block(w2_ptr, b2_ptr, h, c, C, R, BLOCK_R)
        tl.store(out_ptr + b * C + c, tl.sigmoid(pre).to(out_ptr.dtype.element_ty), mask=c < C)


@triton.jit(do_not_specialize=['C', 'R', 'size'])
def _affinity_bwd_kernel(go_ptr, x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, gx_ptr, partial_ptr, C,
                         R, size, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < R
    pre_hidden = _hidden(x_ptr, w1_ptr, b1_ptr, b, C, R, BLOCK_R, BLOCK_C)
    h = tl.maximum(pre_hidden, 0.)
    # This image's gradients: [grad_w1 (R, C) | grad_b1 (R) | grad_w2 (C, R) | grad_b2 (C)].
    base = partial_ptr + b * size
    grad_w2_ptr = base + R * C + R
    grad_b2_ptr = grad_w2_ptr + C * R
    grad_h = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        pre, w2 = _output_block(w2_ptr, b2_ptr, h, c, C, R, BLOCK_R)
        s = tl.sigmoid(pre)
        go = tl.load(go_ptr + b * C + c, mask=c_mask, other=0.).to(tl.float32)
        grad_pre = go * s * (1. - s)
        tl.store(grad_w2_ptr + c[:, None] * R + r[None, :], grad_pre[:, None] * h[None, :],
                 mask=c_mask[:, None] & r_mask[None, :])
        tl.store(grad_b2_ptr + c, grad_pre, mask=c_mask)
        grad_h += tl.sum(w2 * grad_pre[:, None], axis=0)
    grad_hidden = tl.where(pre_hidden > 0., grad_h, 0.)
    tl.store(base + R * C + r, grad_hidden, mask=r_mask)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        mask = r_mask[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + b * C + c, mask=c_mask, other=0.).to(tl.float32)
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.).to(tl.float32)
        tl.store(base + r[:, None] * C + c[None, :], grad_hidden[:, None] * x[None, :],
                 mask=mask)
        grad_x = tl.sum(w1 * grad_hidden[:, None], axis=0)
        tl.store(gx_ptr + b * C + c, grad_x.to(gx_ptr.dtype.element_ty), mask=c_mask)
