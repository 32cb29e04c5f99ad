"""A dense 2-D convolution that ``torch.compile`` keeps as one opaque call.

Inductor lowers ``aten.convolution`` itself, and its lowering of the convolution's backward
guards on the input's size: a training graph holding the backbone's stem and downsampling
convolutions is then specialised on the image size, and detection, whose batches change size
nearly every iteration, recompiles at each new size. Wrapped in a custom operator (forward and
backward, with shape functions), the convolution reaches Inductor as an external call and the
rest of the graph compiles once for dynamic sizes.

``opaque_conv2d`` computes ``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, dilation 1)
and returns it channels-last; gradients come from ``aten.convolution_backward``. Eager callers
do not need it (see ``GroupMamba``: it is used only while compiling).
"""
from typing import List, Optional

import torch
import torch.nn.functional as F


def opaque_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  stride: int, padding: int) -> torch.Tensor:
    """``F.conv2d`` of a ``(B, C_in, H, W)`` map, channels-last ``(B, C_out, H', W')`` out.

    Under autocast the inputs are cast as ``F.conv2d`` would cast them (custom operators see no
    autocast of their own).
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _conv_fwd(x, weight, bias, stride, padding)


def _out_size(size, kernel: int, stride: int, padding: int):
    return (size + 2 * padding - kernel) // stride + 1


def _empty_channels_last(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op('mmgroupmamba::opaque_conv2d_fwd', mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
              padding: int) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):
        y = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    # The shape function promises channels-last strides; a real output must have exactly them.
    out = _empty_channels_last(y.shape, y)
    return y if y.stride() == out.stride() else out.copy_(y)


@_conv_fwd.register_fake
def _(x, weight, bias, stride, padding):
    B, _, H, W = x.shape
    k_h, k_w = weight.shape[-2:]
    shape = (B, weight.shape[0], _out_size(H, k_h, stride, padding),
             _out_size(W, k_w, stride, padding))
    return _empty_channels_last(shape, x)


@torch.library.custom_op('mmgroupmamba::opaque_conv2d_bwd', mutates_args=())
def _conv_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
              padding: int, output_mask: List[bool]) -> List[torch.Tensor]:
    """``[grad_x, grad_weight, grad_bias]``; an unwanted gradient (``output_mask``) is empty."""
    with torch.autocast(x.device.type, enabled=False):
        grads = torch.ops.aten.convolution_backward(
            grad_y, x, weight, [weight.shape[0]] if output_mask[2] else None, [stride, stride],
            [padding, padding], [1, 1], False, [0, 0], 1, output_mask)
    out = []
    for like, grad in zip(_bwd_like(x, weight, output_mask), grads):
        # Exactly the strides of the shape function (an unwanted gradient stays empty).
        if grad is None or grad.stride() == like.stride():
            out.append(like if grad is None else grad)
        else:
            out.append(like.copy_(grad))
    return out


def _bwd_like(x, weight, output_mask):
    """Empty gradients with the strides the operator promises (unwanted ones of size 0)."""
    wanted = (torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0]))
    return [g if want else x.new_empty(0) for g, want in zip(wanted, output_mask)]


@_conv_bwd.register_fake
def _(grad_y, x, weight, stride, padding, output_mask):
    return _bwd_like(x, weight, output_mask)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding = stride, padding
    ctx.with_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            ctx.with_bias and ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = _conv_bwd(grad_y, x, weight, ctx.stride, ctx.padding, mask)
    return (grad_x if mask[0] else None, grad_weight if mask[1] else None,
            grad_bias if mask[2] else None, None, None)


_conv_fwd.register_autograd(_backward, setup_context=_setup_context)
