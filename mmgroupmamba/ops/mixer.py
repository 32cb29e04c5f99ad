"""The GroupMamba mixer (four selective-scan groups side by side, ``models.GroupedSS2D``) as one
op on channel-major tokens.

Per group ``g`` of ``d`` channels (``R`` the rank of the step projection, one state)::

    u, z = in_proj[g] @ x                      # d rows each
    u = SiLU(depthwise 3x3 conv(u))
    dt, B, C = x_proj[g] @ u                   # R, 1, 1 rows
    y = selective_scan(u, dt_proj[g] @ dt, -exp(A_log), B, C, D, dt_bias, softplus, direction g)
    out = out_proj[g] @ (LayerNorm_g(y) * SiLU(z))

Eager calls on the Triton kernels go to them directly, past the public ops' checks and
dispatch: training through one autograd ``Function`` whose backward calls the kernels' backward
passes and the matmuls' transposes itself (autograd would record and replay some twenty nodes
per call, whose host time, not the GPU's, sets the pace of eager training), inference through its
forward alone. The Function keeps what autograd would keep, and adds the two pairs of input
gradients that meet (the tokens', the scan input's) inside a matmul (``baddbmm``) instead of in
separate passes. Tracers and exporters, float64 and devices without the kernels compose the
public ops (:func:`grouped_ss2d_ref`), which the Function is tested against.
"""
from typing import Sequence, Tuple

import torch

from ._backends import triton_module, triton_unavailable
from ._tracing import traced
from .depthwise_conv import _like, depthwise_conv2d
from .fused import group_norm_gate, per_image
from .selective_scan import SCAN_DIRECTIONS, selective_scan

__all__ = ['grouped_ss2d', 'grouped_ss2d_ref']


def grouped_ss2d(tokens: torch.Tensor, spatial_shape: Tuple[int, int],
                 in_proj_weight: torch.Tensor, conv_weight: torch.Tensor,
                 conv_bias: torch.Tensor, x_proj_weight: torch.Tensor,
                 dt_proj_weight: torch.Tensor, dt_bias: torch.Tensor, A_log: torch.Tensor,
                 D: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                 out_proj_weight: torch.Tensor, eps: float,
                 directions: Sequence[str] = SCAN_DIRECTIONS) -> torch.Tensor:
    """Args:
        tokens: ``(B, C, L)`` contiguous, channel-major, in the dtype the matmuls compute in.
        spatial_shape: ``(H, W)``, ``H * W == L``.
        in_proj_weight: ``(G, 2d, d)``, the rows of ``u`` then of ``z``.
        conv_weight, conv_bias: ``(C, 1, 3, 3)``, ``(C,)``.
        x_proj_weight: ``(G, R + 2, d)``; dt_proj_weight: ``(G, d, R)``.
        dt_bias, D: ``(C,)``; A_log: ``(C, 1)``.
        norm_weight, norm_bias: ``(G, d)``, the per-group output LayerNorm's; eps its epsilon.
        out_proj_weight: ``(G, d, d)``.
        directions: the groups' scan directions (``G`` names).

    Returns:
        ``(B, G, d, L)`` contiguous, in tokens' dtype.
    """
    args = (tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
            dt_bias, A_log, D, norm_weight, norm_bias, out_proj_weight)
    if traced() or tokens.dtype == torch.float64 or not _kernels_run_on(tokens.device):
        return grouped_ss2d_ref(*args, spatial_shape, eps, directions)
    config = (tuple(spatial_shape), float(eps),
              tuple(SCAN_DIRECTIONS.index(name) for name in directions))
    if torch.is_grad_enabled():
        return _GroupedSS2D.apply(*args, config)
    return _forward(*args, config)[0]


def grouped_ss2d_ref(tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight,
                     dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, out_proj_weight,
                     spatial_shape, eps, directions=SCAN_DIRECTIONS):
    """:func:`grouped_ss2d` composed of the public ops (the groups' projections as matmuls
    batched over images and groups)."""
    B, C, L = tokens.shape
    G, d, R = dt_proj_weight.shape
    H, W = spatial_shape
    tokens = tokens.view(B, G, d, L)
    dtype = tokens.dtype
    w_u, w_z = per_image(in_proj_weight, B, dtype).split(d, dim=2)
    u, z = torch.matmul(w_u, tokens), torch.matmul(w_z, tokens)
    u = depthwise_conv2d(u.view(B, C, H, W), conv_weight, conv_bias,
                         activation='silu').view(B, G, d, L)
    # dt, B and C are views of one projection, (B, G, R or 1, L), which the matmul and the scan
    # take without a copy; split, so that their gradients meet in one concatenation.
    dt, Bs, Cs = torch.matmul(per_image(x_proj_weight, B, dtype), u).split((R, 1, 1), dim=2)
    dt = torch.matmul(per_image(dt_proj_weight, B, dtype), dt)
    y = selective_scan(u.view(B, C, L), dt.view(B, C, L), -torch.exp(A_log.float()), Bs, Cs,
                       D.float(), dt_bias.float(), delta_softplus=True, spatial_shape=(H, W),
                       directions=directions)
    y = group_norm_gate(y.view(B, G, d, L), z, norm_weight, norm_bias, eps)
    return torch.matmul(per_image(out_proj_weight, B, y.dtype), y)


def _kernels_run_on(device: torch.device) -> bool:
    return all(triton_unavailable(device, module) is None
               for module in ('depthwise_conv', 'scan', 'norm_gate'))


def _mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _forward(tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
             dt_bias, A_log, D, norm_weight, norm_bias, out_proj_weight, config):
    """The kernels' forward: ``(out, what backward needs)``."""
    (H, W), eps, directions = config
    conv, scan, norm_gate = (triton_module(m) for m in ('depthwise_conv', 'scan', 'norm_gate'))
    B, C, L = tokens.shape
    G, d, R = dt_proj_weight.shape
    dtype = tokens.dtype
    x = tokens.view(B, G, d, L)
    # Grad is off here (in the Function's forward, or no-grad inference): plain repeats.
    w_in = per_image(in_proj_weight, B, dtype)
    w_x = per_image(x_proj_weight, B, dtype)
    w_dt = per_image(dt_proj_weight, B, dtype)
    w_out = per_image(out_proj_weight, B, dtype)
    w_u, w_z = w_in.split(d, dim=2)
    pre, z = torch.matmul(w_u, x), torch.matmul(w_z, x)
    u = conv.forward(pre.view(B, C, H, W), conv_weight, conv_bias, 'silu').view(B, G, d, L)
    x_dbl = torch.matmul(w_x, u)
    dt, Bs, Cs = x_dbl.split((R, 1, 1), dim=2)
    delta = torch.matmul(w_dt, dt)
    # The kernel takes A = -exp(A_log) itself (and returns A_log's gradient).
    D32, bias32 = D.float(), dt_bias.float()
    y, states = scan.scan_forward(u.view(B, C, L), delta.view(B, C, L), A_log, Bs, Cs, D32,
                                  bias32, True, directions, (H, W), dtype, a_log=True)
    y = y.view(B, G, d, L)
    gated, mean, rstd = norm_gate.forward(y, z, norm_weight, norm_bias, eps)
    out = torch.matmul(w_out, gated)
    return out, (x, w_in, pre, z, u, w_x, x_dbl, w_dt, delta, A_log, D32, bias32, y, gated,
                 mean, rstd, w_out, conv_weight, conv_bias, norm_weight, norm_bias, *states)


class _GroupedSS2D(torch.autograd.Function):

    @staticmethod
    def forward(ctx, tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight,
                dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias, out_proj_weight,
                config):
        out, saved = _forward(tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight,
                              dt_proj_weight, dt_bias, A_log, D, norm_weight, norm_bias,
                              out_proj_weight, config)
        ctx.save_for_backward(*saved)
        ctx.config = config
        ctx.dtypes = tuple(t.dtype for t in (in_proj_weight, x_proj_weight, dt_proj_weight,
                                              dt_bias, A_log, D, out_proj_weight))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x, w_in, pre, z, u, w_x, x_dbl, w_dt, delta, A_log, D32, bias32, y, gated, mean, rstd,
         w_out, conv_weight, conv_bias, norm_weight, norm_bias, *states) = ctx.saved_tensors
        (H, W), _, directions = ctx.config
        (in_dtype, x_dtype, dt_dtype, bias_dtype, A_dtype, D_dtype,
         out_dtype) = ctx.dtypes
        conv, scan, norm_gate = (triton_module(m) for m in ('depthwise_conv', 'scan',
                                                             'norm_gate'))
        B, G, d, L = x.shape
        C, R = G * d, w_dt.shape[-1]
        grad_out = grad_out.to(x.dtype).reshape(B, G, d, L)

        def weight_grad(grad, inputs, dtype):
            # Summed over the images in float32, as per_image's backward does.
            return torch.matmul(grad, _mT(inputs)).sum(0, dtype=dtype)

        grad_out_proj = weight_grad(grad_out, gated, out_dtype)
        grad_gated = torch.matmul(_mT(w_out), grad_out)
        grad_y, grad_z, grad_norm_weight, grad_norm_bias = norm_gate.backward(
            grad_gated, y, z, norm_weight, norm_bias, mean, rstd)
        del grad_gated
        dt, Bs, Cs = x_dbl.split((R, 1, 1), dim=2)
        grad_u, grad_delta, grad_A_log, grad_B, grad_C, grad_D, grad_bias = scan.scan_backward(
            u.view(B, C, L), delta.view(B, C, L), A_log, Bs, Cs, D32, bias32, True, directions,
            (H, W), grad_y.view(B, C, L), tuple(states), a_log=True)
        del grad_y
        grad_delta = grad_delta.to(x.dtype).view(B, G, d, L)
        grad_dt_proj = weight_grad(grad_delta, dt, dt_dtype)
        grad_x_dbl = torch.cat((torch.matmul(_mT(w_dt), grad_delta), grad_B.to(x.dtype),
                                grad_C.to(x.dtype)), dim=2)
        del grad_delta
        grad_x_proj = weight_grad(grad_x_dbl, u, x_dtype)
        # The scan's and the projection's gradients at u meet inside one matmul.
        grad_u = grad_u.to(x.dtype).view(B * G, d, L)
        grad_u.baddbmm_(_mT(w_x).reshape(B * G, d, R + 2), grad_x_dbl.view(B * G, R + 2, L))
        del grad_x_dbl
        pre_maps = pre.view(B, C, H, W)
        grad_pre = conv.activation_grad(grad_u.view(B, C, H, W), pre_maps, conv_weight,
                                        conv_bias, 'silu')
        del grad_u
        grad_pre, grad_conv_weight, grad_conv_bias = conv.backward(grad_pre, pre_maps,
                                                                   conv_weight, True)
        grad_pre = grad_pre.view(B, G, d, L)
        w_u, w_z = w_in.split(d, dim=2)
        grad_in_proj = torch.cat((torch.matmul(grad_pre, _mT(x)), torch.matmul(grad_z, _mT(x))),
                                 dim=2).sum(0, dtype=in_dtype)
        grad_x = torch.matmul(_mT(w_u), grad_pre).view(B * G, d, L)
        grad_x.baddbmm_(_mT(w_z).reshape(B * G, d, d), grad_z.view(B * G, d, L))
        return (grad_x.view(B, C, L), grad_in_proj, _like(conv_weight, grad_conv_weight),
                grad_conv_bias.to(conv_bias.dtype), grad_x_proj, grad_dt_proj,
                grad_bias.to(bias_dtype), grad_A_log.to(A_dtype), grad_D.to(D_dtype),
                grad_norm_weight.to(norm_weight.dtype), grad_norm_bias.to(norm_bias.dtype),
                grad_out_proj, None)
