"""PyTorch backend of the selective scan (any device; the path CPU tensors take).

The recurrence ``h_t = a_t * h_{t-1} + b_t`` is solved with a log-depth doubling (Hillis-Steele)
scan over the pairs ``(a_t, b_t) = (exp(delta_t A), delta_t B_t u_t)``: ``ceil(log2 L)`` rounds of
whole-tensor arithmetic instead of ``L`` Python steps. It only multiplies decay factors together
(never divides by them, never exponentiates a cumulative sum), so long sequences stay finite.
Memory is a few ``(batch, dim, N, L)`` tensors. Backward recomputes the states and runs the same
scan in reverse for the adjoint; nothing but the inputs is kept between the two.

Shapes follow the backend contract in :mod:`mmgroupmamba.ops.selective_scan`: inside, tensors are
viewed as ``(batch, groups, dim // groups, N, L)`` so that group ``g``'s B/C broadcast over its
channels.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._directions import scan_permutation


def scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                 out_dtype):
    """Returns ``(y, saved)``; ``y`` is ``(batch, dim, L)`` in ``out_dtype``, ``saved`` is empty."""
    dtype = _compute_dtype(u, delta, A, B, C)
    order, inverse = _permutations(directions, spatial_shape, u.device)
    delta = _effective_delta(delta.to(dtype), delta_bias, delta_softplus)
    u = u.to(dtype)
    a, bu, C5 = _scan_inputs(u, delta, A, B, C, order, dtype)
    h = _linear_scan(a, bu)
    y = (h * C5).sum(3).flatten(1, 2)
    y = _from_scan_order(y, inverse)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    return y.to(out_dtype), ()


def scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                  dy, saved):
    """Returns ``(du, ddelta, dA, dB, dC, dD, ddelta_bias)`` in the compute dtype."""
    dtype = _compute_dtype(u, delta, A, B, C)
    order, inverse = _permutations(directions, spatial_shape, u.device)
    batch, dim, L = u.shape
    groups, N = B.shape[1], B.shape[2]
    raw_delta = delta.to(dtype)
    delta = _effective_delta(raw_delta, delta_bias, delta_softplus)
    u = u.to(dtype)
    dy = dy.to(dtype)

    a, bu, C5 = _scan_inputs(u, delta, A, B, C, order, dtype)
    h = _linear_scan(a, bu)
    del bu
    dy5 = _to_scan_order(dy, order).reshape(batch, groups, dim // groups, 1, L)
    dC = (dy5 * h).sum(2)
    # Adjoint g_t = dL/d(b_t) obeys g_t = a_{t+1} g_{t+1} + C_t dy_t: the same scan, backwards.
    a_next = torch.zeros_like(a)
    a_next[..., :-1] = a[..., 1:]
    g = _linear_scan(a_next, dy5 * C5, reverse=True)
    del a_next, C5
    # d(delta_t A) = g_t * h_{t-1} * a_t.
    h_prev = torch.zeros_like(h)
    h_prev[..., 1:] = h[..., :-1]
    del h
    dlog_a = g * h_prev * a
    del h_prev, a

    delta5 = _to_scan_order(delta, order).reshape(batch, groups, dim // groups, 1, L)
    u5 = _to_scan_order(u, order).reshape(batch, groups, dim // groups, 1, L)
    B5 = _to_scan_order(B.to(dtype), order).unsqueeze(2)
    gB = (g * B5).sum(3, keepdim=True)
    dB = (g * (delta5 * u5)).sum(2)
    del g
    dA = (dlog_a * delta5).sum((0, 4)).reshape(dim, N)
    A5 = A.to(dtype).reshape(1, groups, dim // groups, N, 1)
    ddelta = (dlog_a * A5).sum(3, keepdim=True) + gB * u5
    du = gB * delta5

    du = _from_scan_order(du.flatten(1, 3), inverse)
    ddelta = _from_scan_order(ddelta.flatten(1, 3), inverse)
    dB = _from_scan_order(dB, inverse)
    dC = _from_scan_order(dC, inverse)

    dD = None
    if D is not None:
        du = du + D.to(dtype)[:, None] * dy
        dD = (dy * u).sum((0, 2))
    if delta_softplus:
        biased = raw_delta if delta_bias is None else raw_delta + delta_bias.to(dtype)[:, None]
        ddelta = ddelta * torch.sigmoid(biased)
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2))
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


def _compute_dtype(*tensors) -> torch.dtype:
    # float64 stays float64 (gradient checks); everything else accumulates in float32.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _permutations(directions, spatial_shape, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    if all(d == 0 for d in directions):
        return None, None  # plain row-major scan: no gather needed
    return scan_permutation(tuple(directions), *spatial_shape, device)


def _to_scan_order(x: torch.Tensor, order: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` is ``(batch, dim, L)`` (group-major channels) or ``(batch, groups, N, L)``."""
    return x if order is None else _gather_groups(x, order)


def _from_scan_order(x: torch.Tensor, inverse: Optional[torch.Tensor]) -> torch.Tensor:
    return x if inverse is None else _gather_groups(x, inverse)


def _gather_groups(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gathers along L with one index row per channel group; ``index`` is ``(groups, L)``."""
    groups, L = index.shape
    grouped = x.reshape(x.shape[0], groups, -1, L)
    out = grouped.gather(-1, index[None, :, None, :].expand(grouped.shape))
    return out.view(x.shape)


def _effective_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _scan_inputs(u, delta, A, B, C, order, dtype):
    """Decays ``a``, inputs ``b`` (both ``(batch, groups, dim/groups, N, L)``) and C in scan order."""
    batch, dim, L = u.shape
    groups, N = B.shape[1], B.shape[2]
    delta5 = _to_scan_order(delta, order).reshape(batch, groups, dim // groups, 1, L)
    u5 = _to_scan_order(u, order).reshape(batch, groups, dim // groups, 1, L)
    B5 = _to_scan_order(B.to(dtype), order).unsqueeze(2)
    C5 = _to_scan_order(C.to(dtype), order).unsqueeze(2)
    A5 = A.to(dtype).reshape(1, groups, dim // groups, N, 1)
    a = torch.exp(delta5 * A5)
    bu = (delta5 * u5) * B5
    return a, bu, C5


def _linear_scan(a: torch.Tensor, b: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Solves ``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) along the last dim by doubling.

    With ``reverse``, solves ``h_t = a_t h_{t+1} + b_t`` (``h_L = 0``) instead. After round ``k``
    (span ``s = 2**k``), ``h_t`` holds the contribution of ``b_{t-2s+1..t}`` and ``a_t`` the
    product of ``a_{t-2s+1..t}``; the right-hand sides are built before the in-place updates.
    """
    a = a.clone()
    h = b.clone()
    L = h.shape[-1]
    span = 1
    while span < L:
        if reverse:
            h[..., :-span] += a[..., :-span] * h[..., span:]
        else:
            h[..., span:] += a[..., span:] * h[..., :-span]
        if 2 * span < L:
            if reverse:
                a[..., :-span] = a[..., :-span] * a[..., span:]
            else:
                a[..., span:] = a[..., span:] * a[..., :-span]
        span *= 2
    return h
