"""Scan-order index arithmetic, shared by every backend of the selective scan.

Tokens of an ``H x W`` map are stored row-major (token ``(i, j)`` at ``i * W + j``, ``L = H * W``).
A scan direction only changes the order in which they are visited: step ``t`` of the scan reads
token ``token_index(direction, t, H, W)``. Kernels mirror :func:`token_index` instead of
materialising the permutation; the torch path gathers with the cached :func:`scan_permutation`.
"""
import functools
from typing import Tuple

import torch

SCAN_DIRECTIONS = ('left_right', 'top_bottom', 'right_left', 'bottom_top')

# The Triton kernels take the groups' directions packed into one integer argument, two bits a
# group: at most this many groups.
MAX_KERNEL_GROUPS = 31


def token_index(direction: int, t, H: int, W: int):
    """Row-major storage index of the token visited at scan step ``t``.

    Args:
        direction: index into :data:`SCAN_DIRECTIONS`.
        t: scan step(s) in ``[0, H * W)``, a Python int or an integer tensor.
        H, W: spatial shape.

    Odd directions walk columns (column-major step ``t`` is token ``(t % H, t // H)``);
    directions 2 and 3 are 0 and 1 walked backwards.
    """
    if direction >= 2:
        t = H * W - 1 - t
    if direction % 2 == 1:
        # t - column * H is t % H, written out: torch 2.13's ONNX exporter cannot translate the
        # remainder by a symbolic size (an exported graph computes the indices from H and W).
        column = t // H
        return (t - column * H) * W + column
    return t


@functools.lru_cache(maxsize=64)
def scan_permutation(directions: Tuple[int, ...], H: int, W: int,
                     device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather indices into scan order and back, one row per channel group (cached: eager calls
    repeat few sizes).

    Returns:
        ``(order, inverse)``, both ``(groups, L)`` int64 on ``device``:
        ``x_scan = x.gather(-1, order)`` and ``x = x_scan.gather(-1, inverse)``.
    """
    return permutation(directions, H, W, device)


def permutation(directions: Tuple[int, ...], H, W,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`scan_permutation` uncached, in tensor operators only: ``H`` and ``W`` may be
    symbolic sizes of an exported graph, which computes the indices itself."""
    steps = torch.arange(H * W, device=device)
    order = torch.stack([token_index(d, steps, H, W) for d in directions])
    inverse = torch.zeros_like(order).scatter(-1, order, steps.expand_as(order))
    return order, inverse
