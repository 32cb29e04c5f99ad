"""Pieces shared by the Triton kernels (selective scan for general N and N = 1, depthwise
convolution)."""
from typing import Optional

import torch
import triton
import triton.language as tl


def compiled_binaries(*kernels) -> int:
    """Kernel binaries compiled so far in this process for the ``@triton.jit`` functions
    ``kernels`` (one per distinct set of compile-time parameters and argument specialisations)."""
    return sum(len(cache[0]) for kernel in kernels
               for cache in getattr(kernel, 'device_caches', {}).values())


def or_dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Absent D / delta_bias: the kernel never reads the pointer (HAS_D / HAS_BIAS are False).
    return like if t is None else t.contiguous()


@triton.jit
def affine_combine(a_left, b_left, a_right, b_right):
    # Composition of h -> a h + b maps, left applied first; a reverse scan feeds the later
    # steps' composite as the left operand, so the same rule serves both directions.
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def token_index(t, L, H, W, direction, ROW_MAJOR: tl.constexpr):
    """Row-major storage index of the token visited at scan step ``t`` (see _directions.py)."""
    if ROW_MAJOR:
        return t
    step = tl.where(direction >= 2, L - 1 - t, t)
    return tl.where(direction % 2 == 1, (step % H) * W + step // H, step)


@triton.jit
def effective_delta(raw, bias, SOFTPLUS: tl.constexpr):
    x = raw + bias
    if SOFTPLUS:
        # softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p's small-argument series so that
        # very negative x keeps its tiny value instead of rounding to zero.
        z = tl.exp(-tl.abs(x))
        log1p = tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))
        x = tl.maximum(x, 0.0) + log1p
    return x
