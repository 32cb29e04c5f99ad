"""Pieces shared by the Triton kernels (selective scan for general N and N = 1, depthwise
convolution)."""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._directions import MAX_KERNEL_GROUPS


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host integers (symbolic sizes pass). Triton's ``cdiv`` and
    ``next_power_of_2`` are constexpr functions that cost microseconds per host call, which launch
    planning makes dozens of times per block."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), of a host integer."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def compiled_binaries(*kernels) -> int:
    """Kernel binaries compiled so far in this process for the ``@triton.jit`` functions
    ``kernels`` (one per distinct set of compile-time parameters and argument specialisations)."""
    return sum(len(cache[0]) for kernel in kernels
               for cache in getattr(kernel, 'device_caches', {}).values())


def direction_code(directions: Tuple[int, ...]) -> int:
    """The groups' direction indices, two bits each, as one kernel argument: no device tensor to
    copy per call or to cache (CUDA-graph capture rejects device tensors cached across calls)."""
    assert len(directions) <= MAX_KERNEL_GROUPS, len(directions)
    return sum(d << (2 * g) for g, d in enumerate(directions))


@triton.jit
def group_direction(dir_code, g, ROW_MAJOR: tl.constexpr):
    """Group ``g``'s direction index from :func:`direction_code`'s integer (0 when every group
    scans row-major, without decoding)."""
    direction = 0
    if not ROW_MAJOR:
        direction = ((dir_code.to(tl.int64) >> (2 * g)) & 3).to(tl.int32)
    return direction


@triton.jit
def program_channels(groups, dim_per_group, n_dblocks, BLOCK_D: tl.constexpr):
    """The scans' launch grid is one program per block of ``BLOCK_D`` channels of one group of
    one image: this program's image ``b``, group ``g``, channel block, channels and their mask."""
    pid = tl.program_id(0)
    d_block = pid % n_dblocks
    g = (pid // n_dblocks) % groups
    b = pid // (n_dblocks * groups)
    offs_d = d_block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim_per_group
    return b, g, d_block, g * dim_per_group + offs_d, d_mask


@triton.jit
def skip_and_bias(chan, d_mask, D_ptr, bias_ptr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The channels' D and delta_bias in float32 (zeros where absent)."""
    D = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=d_mask, other=0.0).to(tl.float32)
    return D, bias


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
