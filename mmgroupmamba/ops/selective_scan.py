"""Selective scan (Mamba S6), the one public entry point of ``mmgroupmamba.ops``.

Recurrence per channel ``d`` and state ``n``::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t

with ``delta = softplus(delta + delta_bias)`` when ``delta_softplus``.
"""
from typing import Optional, Sequence, Tuple

import torch

# A scan direction names the order in which the H x W tokens of a channel group are visited.
# Tokens are always stored row-major (L = H * W); the direction only changes the visiting order.
SCAN_DIRECTIONS = ('left_right', 'top_bottom', 'right_left', 'bottom_top')


def selective_scan(u: torch.Tensor,
                   delta: torch.Tensor,
                   A: torch.Tensor,
                   B: torch.Tensor,
                   C: torch.Tensor,
                   D: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None,
                   delta_softplus: bool = False,
                   *,
                   spatial_shape: Optional[Tuple[int, int]] = None,
                   directions: Optional[Sequence[str]] = None,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Placeholder signature; the implementation lands with the reference path."""
    raise NotImplementedError
