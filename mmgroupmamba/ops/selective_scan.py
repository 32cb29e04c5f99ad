"""Selective scan (Mamba S6), the one public entry point of ``mmgroupmamba.ops``.

Recurrence per channel ``d`` and state ``n``::

    h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t = sum_n C_t[n] * h_t[n] + D[d] * u_t

with ``delta = softplus(delta + delta_bias)`` when ``delta_softplus``. Channel group ``g`` (channels
``[g * dim / groups, (g + 1) * dim / groups)``) uses ``B[:, g]``/``C[:, g]`` and is scanned in
direction ``directions[g]`` over the ``H x W`` tokens (see :mod:`._directions`).

Backend contract
----------------
By default (``backend=None``) the op dispatches on ``u.device``: CUDA tensors go to
:mod:`mmgroupmamba.ops.triton.scan` when Triton imports and there are at most
``MAX_KERNEL_GROUPS`` (31) groups; otherwise, and on every other device, to
:mod:`mmgroupmamba.ops.torch_scan`. ``backend='torch'`` or ``'triton'`` asks for one. It is registered as two custom operators
(``torch.ops.mmgroupmamba.selective_scan_fwd``/``_bwd``) with autograd and shape functions, so
``torch.compile`` traces through it; eager calls reach the same backend code through a plain
autograd Function, without the operator layer's host time (see :func:`._tracing.traced`).
Exporters record :mod:`mmgroupmamba.ops.graph_scan` instead, in standard operators whose
number does not depend on ``L`` (see :func:`._tracing.exporting`). Each
backend module exposes::

    scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                 out_dtype) -> (y, saved)
    scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape,
                  dy, saved) -> (du, ddelta, dA, dB, dC, dD, ddelta_bias)
    saved_shapes(batch, dim, groups, N, L) -> shapes of the ``saved`` tensors

- ``u, delta, dy``: ``(batch, dim, L)``; ``A``: ``(dim, N)``; ``D, delta_bias``: ``(dim,)`` or None
  (then ``dD``/``ddelta_bias`` are None); ``B, C``: always 4-D ``(batch, groups, N, L)``, possibly
  a broadcast (stride-0) view along ``groups``; inputs keep the caller's dtypes.
- ``directions``: tuple of ``groups`` ints indexing :data:`SCAN_DIRECTIONS`; ``spatial_shape``:
  ``(H, W)`` with ``H * W == L`` (``(1, L)`` when none was given).
- ``y``: ``(batch, dim, L)`` in ``out_dtype``; ``saved``: tuple of contiguous float32 tensors
  forward wants back in backward (may be empty), shaped as ``saved_shapes`` says (whose
  arguments may be symbolic sizes under ``torch.compile``). Gradients are shaped like their
  inputs, in any floating dtype (the op casts them to the inputs' dtypes).
- The PyTorch backend is called with autocast disabled; low-precision inputs must accumulate in
  float32.
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch

from . import graph_scan, torch_scan
from ._directions import MAX_KERNEL_GROUPS, SCAN_DIRECTIONS
from ._backends import check_backend, triton_module, triton_unavailable
from ._tracing import exporting, traced


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
                   out_dtype: Optional[torch.dtype] = None,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Selective scan over ``L`` tokens, optionally in a different direction per channel group.

    Args:
        u: ``(batch, dim, L)`` input.
        delta: ``(batch, dim, L)`` step sizes (before ``delta_bias``/softplus).
        A: ``(dim, N)`` state matrix (diagonal per channel; negative for a decaying state).
        B, C: ``(batch, N, L)`` shared by all channels, or ``(batch, groups, N, L)``.
        D: optional ``(dim,)`` skip weight.
        delta_bias: optional ``(dim,)`` added to ``delta``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        spatial_shape: ``(H, W)`` with ``H * W == L``, tokens stored row-major; default ``(1, L)``.
        directions: ``groups`` names from :data:`SCAN_DIRECTIONS`; default: all ``'left_right'``.
            With 3-D B/C, ``groups = len(directions)``.
        out_dtype: dtype of ``y``; default ``u.dtype``.
        backend: None picks by device (see the module's docstring); ``'torch'`` runs the
            PyTorch path on any device; ``'triton'`` the Triton kernels, and raises
            ``ValueError`` naming the reason where they cannot run.

    Returns:
        ``(batch, dim, L)`` output in row-major token order, dtype ``out_dtype``.
    """
    groups = _check_inputs(u, delta, A, B, C, D, delta_bias, directions)
    L = u.shape[-1]
    if directions is None:
        direction_ids = (0,) * groups
    else:
        direction_ids = tuple(_direction_id(name) for name in directions)
    spatial_shape = _check_spatial_shape(spatial_shape, L)
    backend = _backend_name(backend)
    if backend == 'triton':
        reason = _triton_unavailable(u.device, groups)
        if reason is not None:
            raise ValueError(f"selective_scan(backend='triton') cannot run here: {reason}")
    if B.dim() == 3:
        # A view, not a copy: autograd sums the group gradients back into the shared B/C.
        B = B.unsqueeze(1).expand(-1, groups, -1, -1)
        C = C.unsqueeze(1).expand(-1, groups, -1, -1)
    out_dtype = u.dtype if out_dtype is None else out_dtype
    if traced():
        if exporting():  # standard operators only, whose number does not depend on L
            return graph_scan.scan_forward(u, delta, A, B, C, D, delta_bias,
                                           bool(delta_softplus), direction_ids, spatial_shape,
                                           out_dtype)
        return _scan_fwd(u, delta, A, B, C, D, delta_bias, bool(delta_softplus),
                         list(direction_ids), list(spatial_shape), out_dtype, backend)[0]
    config = (bool(delta_softplus), direction_ids, spatial_shape, backend)
    if not torch.is_grad_enabled():  # no graph to record: the autograd Function's host time saved
        return _forward_impl(u, delta, A, B, C, D, delta_bias, config, out_dtype)[0]
    return _EagerScan.apply(u, delta, A, B, C, D, delta_bias, config, out_dtype)


def _forward_impl(u, delta, A, B, C, D, delta_bias, config, out_dtype):
    """``(y, saved)`` from the backend for ``u``'s device; ``config`` is ``(delta_softplus,
    direction ids, spatial shape, backend name)``."""
    delta_softplus, directions, spatial_shape, backend = config
    impl = _backend_for(u.device, backend, B.shape[1])
    with _no_autocast(impl, u.device):
        return impl.scan_forward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions,
                                 spatial_shape, out_dtype)


def _backward_impl(u, delta, A, B, C, D, delta_bias, config, dy, saved):
    """``(du, ddelta, dA, dB, dC, dD, ddelta_bias)`` in the inputs' dtypes (None for an absent
    D or delta_bias)."""
    delta_softplus, directions, spatial_shape, backend = config
    impl = _backend_for(u.device, backend, B.shape[1])
    with _no_autocast(impl, u.device):
        grads = impl.scan_backward(u, delta, A, B, C, D, delta_bias, delta_softplus, directions,
                                   spatial_shape, dy, tuple(saved))
    return tuple(None if x is None else grad.to(x.dtype)
                 for grad, x in zip(grads, (u, delta, A, B, C, D, delta_bias)))


class _EagerScan(torch.autograd.Function):
    """The scan outside tracers: the backends called directly (see :func:`._tracing.traced`)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, config, out_dtype):
        y, saved = _forward_impl(u, delta, A, B, C, D, delta_bias, config, out_dtype)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, *saved)
        ctx.config = config
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        u, delta, A, B, C, D, delta_bias, *saved = ctx.saved_tensors
        grads = _backward_impl(u, delta, A, B, C, D, delta_bias, ctx.config, dy, saved)
        return (*grads, None, None)


# The scan is a pair of custom operators (forward and backward) with registered autograd and
# shape functions: ``torch.compile`` keeps it inside its graphs (no graph break); they run the
# implementations that ``_EagerScan`` runs. ``backend`` is '' (by device) or 'torch'.
@torch.library.custom_op('mmgroupmamba::selective_scan_fwd', mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, directions: List[int], spatial_shape: List[int],
              out_dtype: torch.dtype, backend: str) -> List[torch.Tensor]:
    """Returns ``[y, *saved]``."""
    config = (delta_softplus, tuple(directions), tuple(spatial_shape), backend)
    y, saved = _forward_impl(u, delta, A, B, C, D, delta_bias, config, out_dtype)
    return [y, *saved]


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape, out_dtype,
      backend):
    impl = _backend_for(u.device, backend, B.shape[1])
    batch, dim, L = u.shape
    y = u.new_empty(u.shape, dtype=out_dtype)
    saved = [u.new_empty(shape, dtype=torch.float32)
             for shape in impl.saved_shapes(batch, dim, B.shape[1], A.shape[1], L)]
    return [y, *saved]


@torch.library.custom_op('mmgroupmamba::selective_scan_bwd', mutates_args=())
def _scan_bwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, directions: List[int], spatial_shape: List[int],
              backend: str, dy: torch.Tensor, saved: List[torch.Tensor]) -> List[torch.Tensor]:
    """Returns ``[du, ddelta, dA, dB, dC, dD, ddelta_bias]`` in the inputs' dtypes; an absent
    D or delta_bias gets an empty gradient."""
    config = (delta_softplus, tuple(directions), tuple(spatial_shape), backend)
    grads = _backward_impl(u, delta, A, B, C, D, delta_bias, config, dy, saved)
    out, storages = [], set()
    for grad in grads:
        if grad is None:
            out.append(u.new_empty(0))
            continue
        grad = grad.contiguous()
        # Backends may return several gradients as views of one buffer; operator outputs must
        # not share storage.
        if grad.numel() and grad.untyped_storage().data_ptr() in storages:
            grad = grad.clone()
        storages.add(grad.untyped_storage().data_ptr())
        out.append(grad)
    return out


@_scan_bwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape, backend, dy,
      saved):
    return [u.new_empty(0) if x is None else x.new_empty(x.shape)
            for x in (u, delta, A, B, C, D, delta_bias)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, delta_softplus, directions, spatial_shape, _, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, *output[1:])
    ctx.config = (delta_softplus, directions, spatial_shape, backend)
    ctx.has_optional = (D is not None, delta_bias is not None)
    ctx.mark_non_differentiable(*output[1:])


def _scan_backward(ctx, grads):
    u, delta, A, B, C, D, delta_bias, *saved = ctx.saved_tensors
    delta_softplus, directions, spatial_shape, backend = ctx.config
    du, ddelta, dA, dB, dC, dD, dbias = _scan_bwd(u, delta, A, B, C, D, delta_bias,
                                                   delta_softplus, directions, spatial_shape,
                                                   backend, grads[0], saved)
    has_d, has_bias = ctx.has_optional
    return (du, ddelta, dA, dB, dC, dD if has_d else None, dbias if has_bias else None,
            None, None, None, None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_setup_context)


def _backend_name(backend: Optional[str]) -> str:
    # The custom operators take the choice as a string: '' is automatic.
    check_backend(backend)
    return backend or ''


def _triton_unavailable(device: torch.device, groups: int) -> Optional[str]:
    """Why the Triton kernels cannot run this scan, or None if they can."""
    reason = triton_unavailable(device, 'scan')
    if reason is None and groups > MAX_KERNEL_GROUPS:
        reason = f'{groups} direction groups; the kernels take at most {MAX_KERNEL_GROUPS}'
    return reason


def _backend_for(device: torch.device, backend_name: str, groups: int):
    if backend_name != 'torch' and _triton_unavailable(device, groups) is None:
        return triton_module('scan')
    return torch_scan


def _no_autocast(impl, device: torch.device):
    """Autocast off around the PyTorch backend, whose operators it would lower (the backends
    accumulate in float32); the Triton kernels are beyond its reach, and entering and leaving it
    costs more host time than their launch."""
    if impl is torch_scan:
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _direction_id(name: str) -> int:
    if name not in SCAN_DIRECTIONS:
        raise ValueError(f'unknown scan direction {name!r}; expected one of {SCAN_DIRECTIONS}')
    return SCAN_DIRECTIONS.index(name)


def _check_inputs(u, delta, A, B, C, D, delta_bias, directions) -> int:
    """Validates shapes, dtypes and devices; returns the number of channel groups."""
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, delta_bias=delta_bias)
    for name, x in named.items():
        if x is None and name in ('D', 'delta_bias'):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}')
        if not x.is_floating_point():
            raise TypeError(f'{name} must be a floating-point tensor, got {x.dtype}')
        if x.device != u.device:
            raise ValueError(f'{name} is on {x.device} but u is on {u.device}')
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f'u must be (batch, dim, L) with L >= 1, got shape {tuple(u.shape)}')
    batch, dim, L = u.shape
    _expect_shape('delta', delta, (batch, dim, L))
    if A.dim() != 2 or A.shape[0] != dim or A.shape[1] < 1:
        raise ValueError(f'A must be (dim={dim}, N) with N >= 1, got shape {tuple(A.shape)}')
    N = A.shape[1]
    if directions is not None and (isinstance(directions, str) or len(directions) < 1):
        raise ValueError('directions must be a non-empty sequence of names from '
                         f'{SCAN_DIRECTIONS}, got {directions!r}')
    if B.dim() == 4:
        groups = B.shape[1]
        _expect_shape('B', B, (batch, groups, N, L))
    else:
        groups = 1 if directions is None else len(directions)
        _expect_shape('B', B, (batch, N, L))
    _expect_shape('C', C, tuple(B.shape))
    if groups < 1 or dim % groups:
        raise ValueError(f'groups ({groups}) must divide dim ({dim})')
    if directions is not None and len(directions) != groups:
        raise ValueError(f'len(directions) must equal groups ({groups}), got {len(directions)}')
    for name in ('D', 'delta_bias'):
        if named[name] is not None:
            _expect_shape(name, named[name], (dim,))
    return groups


def _expect_shape(name: str, x: torch.Tensor, shape: tuple):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(x.shape)}')


def _check_spatial_shape(spatial_shape, L: int) -> Tuple[int, int]:
    if spatial_shape is None:
        return (1, L)
    # Sizes an exporter keeps symbolic stay symbolic (int() would fix them to the example's).
    if len(spatial_shape) != 2 or any(
            not isinstance(s, torch.SymInt) and int(s) != s or s < 1 for s in spatial_shape):
        raise ValueError(f'spatial_shape must be (H, W) of positive ints, got {spatial_shape!r}')
    H, W = (s if isinstance(s, torch.SymInt) else int(s) for s in spatial_shape)
    if H * W != L:
        raise ValueError(f'spatial_shape {(H, W)} has {H * W} tokens but L = {L}')
    return (H, W)
