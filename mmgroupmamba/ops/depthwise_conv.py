"""Depthwise k x k convolution, stride 1, zero 'same' padding: the convolutions of GroupMamba's
mixers and FFNs.

``depthwise_conv2d(x, weight, bias)`` equals ``F.conv2d(x, weight, bias, padding=k // 2,
groups=C)`` computed in float32 and returned in x's dtype, on NCHW or channels-last maps alike
(the output keeps x's memory layout; float64 stays float64); ``activation='silu'`` or ``'gelu'``
applies ``F.silu`` or ``F.gelu`` to the float32 result before it is rounded, and backward
recomputes the convolution instead of keeping it. CUDA tensors with 3 x 3 kernels go to the
Triton kernels of :mod:`.triton.depthwise_conv` when Triton imports (cuDNN's depthwise kernels are
slow on channels-last low-precision maps, backward especially; the activation runs in the same
kernel), everything else to PyTorch's convolution; ``backend='torch'`` or ``'triton'`` asks for
one. Like the scan, it is a pair of custom operators with autograd and shape functions, so
``torch.compile`` keeps it in its graphs, and eager calls skip the operator layer. Exporters
record a grouped ``F.conv2d`` (an ONNX ``Conv`` with ``group = C``).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F

from ._backends import check_backend, triton_module, triton_unavailable
from ._tracing import exporting, traced


# Activations that may follow the convolution: name -> (function, its backward).
_ACTIVATIONS = {
    'silu': (F.silu, torch.ops.aten.silu_backward),
    'gelu': (F.gelu, torch.ops.aten.gelu_backward),
}


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     *, activation: Optional[str] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Args:
        x: ``(B, C, H, W)`` input, any memory layout.
        weight: ``(C, 1, k, k)`` with odd k (an ``nn.Conv2d(C, C, k, groups=C)``'s weight).
        bias: optional ``(C,)``.
        activation: None, ``'silu'`` or ``'gelu'`` (exact), applied to the convolution.
        backend: None picks by device and case (see the module's docstring); ``'torch'``
            runs PyTorch's convolution on any device; ``'triton'`` the Triton kernels, and
            raises ``ValueError`` naming the reason where they cannot run.

    Returns:
        ``(B, C, H, W)`` in x's dtype and memory layout.
    """
    _check_inputs(x, weight, bias)
    if activation is not None and activation not in _ACTIVATIONS:
        raise ValueError(f'activation must be None or one of {sorted(_ACTIVATIONS)}, got '
                         f'{activation!r}')
    check_backend(backend)
    if backend == 'triton':
        reason = _triton_unavailable(x, weight)
        if reason is not None:
            raise ValueError(f"depthwise_conv2d(backend='triton') cannot run here: {reason}")
    # The custom operators take the choices as strings: '' is none / automatic.
    if traced():
        if exporting():  # PyTorch's grouped convolution: standard operators only
            return _forward_impl(x, weight, bias, activation or '', 'torch')
        return _conv_fwd(x, weight, bias, activation or '', backend or '')
    if not torch.is_grad_enabled():  # no graph to record: the autograd Function's host time saved
        return _forward_impl(x, weight, bias, activation or '', backend or '')
    return _EagerDepthwiseConv.apply(x, weight, bias, activation or '', backend or '')


class _EagerDepthwiseConv(torch.autograd.Function):
    """The convolution outside tracers: the implementations called directly (see
    :func:`._tracing.traced`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend):
        ctx.save_for_backward(x, weight, bias)
        ctx.activation, ctx.backend = activation, backend
        return _forward_impl(x, weight, bias, activation, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _backward_impl(grad_y, x, weight, bias, ctx.activation,
                                                        ctx.backend)
        return grad_x, grad_weight, grad_bias, None, None


@torch.library.custom_op('mmgroupmamba::depthwise_conv_fwd', mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              activation: str, backend: str) -> torch.Tensor:
    return _forward_impl(x, weight, bias, activation, backend)


def _forward_impl(x, weight, bias, activation, backend):
    triton_impl = _triton_for(x, weight, backend)
    if triton_impl is not None:  # beyond autocast's reach
        return triton_impl.forward(x, weight, bias, activation or None)
    with torch.autocast(x.device.type, enabled=False):
        y = _torch_conv(x, weight, bias)
        if activation:
            y = _ACTIVATIONS[activation][0](y)
        return _like(x, y)


def _torch_conv(x, weight, bias):
    """PyTorch's convolution in the compute dtype."""
    dtype = _compute_dtype(x)
    return F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                    padding=weight.shape[-1] // 2, groups=x.shape[1])


@_conv_fwd.register_fake
def _(x, weight, bias, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op('mmgroupmamba::depthwise_conv_bwd', mutates_args=())
def _conv_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor], activation: str, backend: str) -> List[torch.Tensor]:
    """Returns ``[grad_x, grad_weight, grad_bias]`` in the inputs' dtypes (an empty grad_bias
    without bias)."""
    grad_x, grad_weight, grad_bias = _backward_impl(grad_y, x, weight, bias, activation, backend)
    # The kernels' weight and bias gradients are views of one buffer; operator outputs must not
    # alias each other.
    return [grad_x, grad_weight, x.new_empty(0) if grad_bias is None else grad_bias.clone()]


def conv_activation_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor], activation: str, *,
                             input_grad_sums: bool = False, backend: Optional[str] = None):
    """Backward of ``depthwise_conv2d(x, weight, bias, activation=activation)`` that also gives
    back its output, recomputed by the pass that recomputes the convolution for the activation's
    slope (on CUDA one stencil pass writes both).

    For callers that keep only ``x`` and need the output again in backward: the FFN, whose fc2
    weight gradient takes it. Outside autograd (it is a backward).

    Returns:
        ``(y, grad_x, grad_weight, grad_bias)``, y and grad_x like x, grad_bias None without bias;
        with ``input_grad_sums`` a fifth, grad_x summed per channel (float32 ``(C,)``: the bias
        gradient of a layer that feeds the convolution), which on CUDA the pass writing grad_x
        also makes.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f'activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}')
    check_backend(backend)
    return _backward_impl(grad_y, x, weight, bias, activation, backend or '', with_output=True,
                          input_grad_sums=input_grad_sums)


def _backward_impl(grad_y, x, weight, bias, activation, backend, with_output=False,
                   input_grad_sums=False):
    """``(grad_x, grad_weight, grad_bias)`` in the inputs' dtypes; grad_bias None without bias.
    With an activation, the gradient at the pre-activation comes first, from the convolution
    recomputed; ``with_output`` (an activation given) puts the recomputed output in front;
    ``input_grad_sums`` appends grad_x's per-channel sums (float32 ``(C,)``)."""
    triton_impl = _triton_for(x, weight, backend)
    with_bias = bias is not None
    y = None
    if triton_impl is not None:  # beyond autocast's reach
        if activation:
            grad_y = triton_impl.activation_grad(grad_y, x, weight, bias, activation,
                                                 with_output=with_output)
            if with_output:
                grad_y, y = grad_y
        grad_x, grad_weight, grad_bias, *sums = triton_impl.backward(
            grad_y, x, weight, with_bias, input_grad_sums=input_grad_sums)
    else:
        with torch.autocast(x.device.type, enabled=False):
            k, dtype = weight.shape[-1], _compute_dtype(x)
            if activation:
                pre_activation = _torch_conv(x, weight, bias)
                if with_output:
                    y = _like(x, _ACTIVATIONS[activation][0](pre_activation))
                grad_y = _ACTIVATIONS[activation][1](grad_y.to(dtype), pre_activation)
                del pre_activation
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_y.to(dtype), x.to(dtype), weight.to(dtype),
                [weight.shape[0]] if with_bias else None,
                [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], x.shape[1],
                [True, True, with_bias])
            grad_x = _like(x, grad_x)
            sums = ([grad_x.sum(dim=(0, 2, 3), dtype=torch.float32)] if input_grad_sums
                    else [])
    grad_bias = grad_bias.to(weight.dtype) if with_bias else None
    # In the weight's dtype and strides (copied only where they differ): the gradient of a
    # channels-last convolution may stride the size-1 input-channel axis differently, which
    # DistributedDataParallel's gradient buckets take for a layout mismatch (a warning and a copy
    # per step).
    grads = (grad_x, _like(weight, grad_weight), grad_bias, *sums)
    return (y, ) + grads if with_output else grads


@_conv_bwd.register_fake
def _(grad_y, x, weight, bias, activation, backend):
    grad_bias = weight.new_empty(weight.shape[0]) if bias is not None else x.new_empty(0)
    return [torch.empty_like(x), weight.new_empty(weight.shape), grad_bias]


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.activation, ctx.backend = activation, backend


def _backward(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _conv_bwd(grad_y, x, weight, bias, ctx.activation,
                                               ctx.backend)
    return grad_x, grad_weight, grad_bias if bias is not None else None, None, None


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def _like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` in x's dtype and memory layout (what the shape functions promise)."""
    if y.dtype == x.dtype and y.stride() == x.stride():
        return y
    return torch.empty_like(x).copy_(y)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _triton_unavailable(x: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run this convolution, or None if they can: they take
    3 x 3 kernels on CUDA maps of 16- and 32-bit floats."""
    reason = triton_unavailable(x.device, 'depthwise_conv')
    if reason is None and x.dtype == torch.float64:
        reason = 'float64 maps; the kernels take 16- and 32-bit floats'
    if reason is None and weight.shape[-1] != 3:
        reason = f'{weight.shape[-1]} x {weight.shape[-1]} kernels; the Triton kernels are 3 x 3'
    return reason


def _triton_for(x: torch.Tensor, weight: torch.Tensor, backend: str):
    """The Triton module where it applies and ``backend`` allows, else None (PyTorch's
    convolution)."""
    if backend == 'torch' or _triton_unavailable(x, weight) is not None:
        return None
    return triton_module('depthwise_conv')


def _check_inputs(x, weight, bias):
    for name, t in (('x', x), ('weight', weight), ('bias', bias)):
        if t is None and name == 'bias':
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f'{name} must be a floating-point torch.Tensor, got '
                            f'{getattr(t, "dtype", type(t).__name__)}')
        if t.device != x.device:
            raise ValueError(f'{name} is on {t.device} but x is on {x.device}')
    if x.dim() != 4:
        raise ValueError(f'x must be (B, C, H, W), got shape {tuple(x.shape)}')
    C = x.shape[1]
    k = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.shape != (C, 1, k, k) or k % 2 == 0:
        raise ValueError(f'weight must be (C={C}, 1, k, k) with odd k, got shape '
                         f'{tuple(weight.shape)}')
    if bias is not None and bias.shape != (C, ):
        raise ValueError(f'bias must have shape ({C},), got {tuple(bias.shape)}')
