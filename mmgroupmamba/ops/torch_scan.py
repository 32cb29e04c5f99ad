"""PyTorch backend of the selective scan (any device; the path CPU tensors take).

The recurrence ``h_t = a_t * h_{t-1} + b_t`` over the pairs ``(a_t, b_t) = (exp(delta_t A),
delta_t B_t u_t)`` is solved as a two-level chunked scan (:func:`_linear_scan`): ``O(sqrt(L))``
whole-slab tensor operations instead of ``L`` Python steps of autograd. It only
multiplies decay factors together (never divides by them, never exponentiates a cumulative sum),
so long sequences stay finite. Memory is a few ``(L, batch, dim, N)`` tensors. Backward recomputes
the states and runs the same scan in reverse for the adjoint; nothing but the inputs is kept.

Shapes follow the backend contract in :mod:`mmgroupmamba.ops.selective_scan`. Inside, tensors
are laid out scan-step-major, ``(L, batch, groups, dim // groups, N)``, so that every step of the
scan is one contiguous slab and group ``g``'s B/C broadcast over its channels.
"""
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._directions import scan_permutation


def scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                 out_dtype):
    """Returns ``(y, saved)``; ``y`` is ``(batch, dim, L)`` in ``out_dtype``, ``saved`` is empty."""
    dtype = _compute_dtype(u, delta, A, B, C)
    to_scan, to_storage = _permutations(directions, spatial_shape, u.shape[0], u.device)
    u = u.to(dtype)
    delta = _effective_delta(delta.to(dtype), delta_bias, delta_softplus)
    a, bu, _, _, _, _, C5 = _scan_inputs(u, delta, A, B, C, to_scan, dtype)
    h = _linear_scan(a, bu, overwrite=True)
    y = _row_major(_sum_states(h.mul_(C5)).squeeze(-1), to_storage).flatten(1, 2)
    if D is not None:
        y.addcmul_(D.to(dtype)[:, None], u)
    return y.to(out_dtype), ()


def saved_shapes(batch, dim, groups, N, L):
    """Nothing is saved: backward recomputes the states."""
    return ()


def scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                  dy, saved):
    """Returns ``(du, ddelta, dA, dB, dC, dD, ddelta_bias)`` in the compute dtype.

    In-place updates below only touch tensors computed here, never (views of) the inputs.
    """
    dtype = _compute_dtype(u, delta, A, B, C)
    to_scan, to_storage = _permutations(directions, spatial_shape, u.shape[0], u.device)
    u = u.to(dtype)
    dy = dy.to(dtype)
    raw_delta = delta.to(dtype)
    delta = _effective_delta(raw_delta, delta_bias, delta_softplus)
    a, bu, u5, delta5, delta_u5, B5, C5 = _scan_inputs(u, delta, A, B, C, to_scan, dtype)
    h = _linear_scan(a.clone(), bu, overwrite=True)  # a is needed again below
    dy5 = _scan_major(dy, to_scan, B.shape[1]).unsqueeze(-1)
    dC = (dy5 * h).sum(3)
    # The adjoint g_t = dL/db_t obeys g_t = a_{t+1} g_{t+1} + C_t dy_t: the same scan, backwards.
    g = _linear_scan(a, dy5 * C5, adjoint=True, overwrite=True)
    # dL/d(delta_t A) = g_t * a_t * h_{t-1}, with h_{-1} = 0.
    dlog_a = a.mul_(g)
    dlog_a[1:] *= h[:-1]
    dlog_a[0] = 0
    del h

    dA = (dlog_a * delta5).sum((0, 1)).reshape(A.shape)
    ddelta = _sum_states(dlog_a.mul_(A.to(dtype).reshape(B.shape[1], -1, A.shape[1])))
    dB = (g * delta_u5).sum(3)
    gB = _sum_states(g.mul_(B5))
    ddelta.addcmul_(gB, u5)
    du = gB.mul_(delta5)

    du = _row_major(du.squeeze(-1), to_storage).flatten(1, 2)
    ddelta = _row_major(ddelta.squeeze(-1), to_storage).flatten(1, 2)
    dB = _row_major(dB, to_storage)
    dC = _row_major(dC, to_storage)
    dD = None
    if D is not None:
        du.addcmul_(D.to(dtype)[:, None], dy)
        dD = (dy * u).sum((0, 2))
    if delta_softplus:
        biased = raw_delta if delta_bias is None else raw_delta + delta_bias.to(dtype)[:, None]
        ddelta.mul_(torch.sigmoid(biased))
    ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2))
    return du, ddelta, dA, dB, dC, dD, ddelta_bias


def _compute_dtype(*tensors) -> torch.dtype:
    # float64 stays float64 (gradient checks); everything else accumulates in float32.
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _permutations(directions, spatial_shape, batch, device) -> Tuple[Optional[torch.Tensor], ...]:
    """Row indices of the scan-major ``(L * batch * groups)`` rows into scan order and back."""
    if all(d == 0 for d in directions):
        return None, None  # plain row-major scan: no reordering needed
    return _scan_rows(tuple(directions), *spatial_shape, batch, device)


@functools.lru_cache(maxsize=16)
def _scan_rows(directions, H, W, batch, device):
    # Row (t, b, g) of the scan-major layout is token order[g, t] of image b, group g.
    groups = len(directions)
    samples = torch.arange(batch, device=device)[None, :, None]
    group_ids = torch.arange(groups, device=device)
    return tuple(((index.t()[:, None, :] * batch + samples) * groups + group_ids).flatten()
                 for index in scan_permutation(directions, H, W, device))


def _effective_delta(delta, delta_bias, delta_softplus):
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _scan_inputs(u, delta, A, B, C, to_scan, dtype):
    """Scan-major decays ``a`` and inputs ``b`` (both ``(L, batch, groups, dim/groups, N)``).

    Also returns the broadcastable factors ``u5, delta5, delta_u5`` (``(L, batch, groups,
    dim/groups, 1)``) and ``B5, C5`` (``(L, batch, groups, 1, N)``) that backward reuses.
    """
    groups, N = B.shape[1], B.shape[2]
    u5 = _scan_major(u, to_scan, groups).unsqueeze(-1)
    delta5 = _scan_major(delta, to_scan, groups).unsqueeze(-1)
    B5 = _scan_major(B.to(dtype), to_scan, groups).unsqueeze(3)
    C5 = _scan_major(C.to(dtype), to_scan, groups).unsqueeze(3)
    a = torch.mul(delta5, A.to(dtype).reshape(groups, -1, N)).exp_()
    delta_u5 = delta5 * u5
    bu = delta_u5 * B5
    return a, bu, u5, delta5, delta_u5, B5, C5


def _sum_states(x: torch.Tensor) -> torch.Tensor:
    """Sum over the trailing state dim N, kept as size 1; free for GroupMamba's N = 1."""
    return x if x.shape[-1] == 1 else x.sum(-1, keepdim=True)


def _scan_major(x: torch.Tensor, rows: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """``(batch, dim, L)`` or ``(batch, groups, N, L)`` -> scan order ``(L, batch, groups, -1)``."""
    x = x.reshape(x.shape[0], groups, -1, x.shape[-1]).permute(3, 0, 1, 2).contiguous()
    if rows is None:
        return x
    # Whole contiguous rows of dim/groups (or N) values: cheaper than an element-wise gather.
    return x.view(-1, x.shape[-1]).index_select(0, rows).view(x.shape)


def _row_major(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`_scan_major`: ``(L, batch, groups, K)`` -> ``(batch, groups, K, L)``."""
    if rows is not None:
        x = x.reshape(-1, x.shape[-1]).index_select(0, rows).view(x.shape)
    return x.permute(1, 2, 3, 0).contiguous()


def _linear_scan(a: torch.Tensor, b: torch.Tensor, adjoint: bool = False,
                 overwrite: bool = False) -> torch.Tensor:
    """Solves ``h_t = a_t h_{t-1} + b_t`` (``h_{-1} = 0``) along dim 0 of ``(L, ...)`` tensors.

    With ``adjoint``, solves the transposed recurrence ``g_t = a_{t+1} g_{t+1} + b_t``
    (``g_{L-1} = b_{L-1}``) that backward needs, running from ``t = L - 1`` down to 0.
    With ``overwrite``, ``a`` and ``b`` are scratch the scan may reuse (saves copies); the adjoint
    scan never overwrites ``a``.

    Two levels, each a short Python loop over whole slabs: ``L`` is cut into ``n`` chunks of
    ``T ~ sqrt(L)`` steps (padded with the identity pair ``a = 1, b = 0`` when no divisor of ``L``
    is close). The first loop scans all chunks at once from a zero state while turning the decays
    into running products inside each chunk; the second carries each chunk's final state into
    the next; one fused update then adds ``running product * incoming carry`` everywhere.
    """
    L = a.shape[0]
    T = _chunk_length(L)
    n = -(-L // T)
    pad = n * T - L
    if adjoint:
        # Stored back to front: padding first, then decay[pad + t] = a_{t+1}. The decay at
        # t = L - 1 only ever meets the zero state past the end, so any finite value will do.
        decay = a.new_empty((n * T,) + a.shape[1:])
        decay[:pad] = 1
        decay[pad:-1] = a[1:]
        decay[-1] = 1
    else:
        decay = _pad(a, n * T, 1, overwrite)
    h = _pad(b, n * T, 0, overwrite, front=adjoint)
    decay = decay.view(n, T, -1)
    h = h.view(n, T, -1)

    # Views made once: indexing slabs inside the loops would dominate for short chunks.
    steps, step_decays = h.unbind(1), decay.unbind(1)
    for t in (range(T - 2, -1, -1) if adjoint else range(1, T)):
        prev = t + 1 if adjoint else t - 1
        steps[t].addcmul_(step_decays[t], steps[prev])
        step_decays[t].mul_(step_decays[prev])  # a slab loop beats cumprod along a middle dim
    last = 0 if adjoint else T - 1  # the step that ends a chunk
    ends, end_decays = h[:, last].unbind(0), decay[:, last].unbind(0)
    carry = h.new_empty(h[:, 0].shape)
    carries = carry.unbind(0)
    carries[n - 1 if adjoint else 0].zero_()
    for c in (range(n - 2, -1, -1) if adjoint else range(1, n)):
        prev = c + 1 if adjoint else c - 1
        torch.addcmul(ends[prev], end_decays[prev], carries[prev], out=carries[c])
    h.addcmul_(decay, carry[:, None])
    h = h.view((n * T,) + a.shape[1:])
    return h[pad:] if adjoint else h[:L]


def _chunk_length(L: int) -> int:
    """A divisor of ``L`` in ``[sqrt(L) / 2, sqrt(L)]`` (no padding) if there is one."""
    root = math.isqrt(L)
    for T in range(root, max(1, root // 2) - 1, -1):
        if L % T == 0:
            return T
    return root


def _pad(x: torch.Tensor, length: int, value: float, overwrite: bool,
         front: bool = False) -> torch.Tensor:
    """``x`` padded along dim 0 to ``length`` with ``value`` (at the front if ``front``)."""
    if length == x.shape[0]:
        return x if overwrite else x.clone()
    out = x.new_empty((length,) + x.shape[1:])
    pad = length - x.shape[0]
    if front:
        out[:pad] = value
        out[pad:] = x
    else:
        out[:x.shape[0]] = x
        out[x.shape[0]:] = value
    return out
