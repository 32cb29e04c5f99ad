"""The GroupMamba mixer (four selective-scan groups side by side, ``models.GroupedSS2D``) as one
op on channel-major tokens.

Per group ``g`` of ``d`` channels (``R`` the rank of the step projection, one state)::

    u, z = in_proj[g] @ x                      # d rows each
    u = SiLU(depthwise 3x3 conv(u))
    dt, B, C = x_proj[g] @ u                   # R, 1, 1 rows
    y = selective_scan(u, dt_proj[g] @ dt, -exp(A_log), B, C, D, dt_bias, softplus, direction g)
    out = out_proj[g] @ (LayerNorm_g(y) * SiLU(z))

On the Triton kernels the maps are channel-major over the whole batch, ``(C, B, L)`` memory:
each projection is then one matmul per group over all images' tokens, its weight used as it is
and its gradient one product (no per-image weight copies or per-image gradients summed after).
Eager calls on the kernels go to them directly, past the public ops' checks and dispatch:
training through one autograd ``Function`` whose backward calls the kernels' backward passes
and the matmuls' transposes itself (autograd would record and replay some twenty nodes
per call, whose host time, not the GPU's, sets the pace of eager training), inference through its
forward alone. The Function keeps what autograd would keep, and adds the two pairs of input
gradients that meet (the tokens', the scan input's) inside a matmul (``baddbmm``) instead of in
separate passes. Tracers and exporters, float64 and devices without the kernels compose the
public ops (:func:`grouped_ss2d_ref`), which the Function is tested against.
"""
from typing import Optional, Sequence, Tuple

import torch

from ._backends import triton_module, triton_unavailable
from ._products import product_in
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
        tokens: ``(B, C, L)``, channels before tokens, in the dtype the matmuls compute in;
            read without a copy when contiguous for the reference, and when channel-major over
            the batch (``tokens.transpose(0, 1)`` contiguous, as ``fused.mixer_norm`` writes
            them) for the kernels.
        spatial_shape: ``(H, W)``, ``H * W == L``.
        in_proj_weight: ``(G, 2d, d)``, the rows of ``u`` then of ``z``.
        conv_weight, conv_bias: ``(C, 1, 3, 3)``, ``(C,)``.
        x_proj_weight: ``(G, R + 2, d)``; dt_proj_weight: ``(G, d, R)``.
        dt_bias, D: ``(C,)``; A_log: ``(C, 1)``.
        norm_weight, norm_bias: ``(G, d)``, the per-group output LayerNorm's; eps its epsilon.
        out_proj_weight: ``(G, d, d)``.
        directions: the groups' scan directions (``G`` names).

    Returns:
        ``(B, G, d, L)`` in tokens' dtype: contiguous from the reference, a view of
        channel-major ``(G, d, B, L)`` memory from the kernels.
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


# The kernels' path computes on channel-major maps, (C, B, L) memory: a group's channels of all
# images are one (d, B * L) matrix, so that every grouped projection is one matmul per group,
# its weight used as it is (not repeated per image) and its gradient one product over all
# tokens (not per image, then summed). The scan, the convolution and the norm-gate read these
# maps as (B, C, L), (B, C, H, W) and (B, G, d, L) views; nothing is copied between them.

def _per_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, L) or (B, C, H, W) -> (G, d, B * L), a view of channel-major memory (else a
    copy)."""
    return x.flatten(2).unflatten(1, (groups, -1)).permute(1, 2, 0, 3).flatten(2)


def _per_image(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(G, k, B * L) -> the (B, G, k, L) view."""
    return x.unflatten(2, (batch, -1)).permute(2, 0, 1, 3)


def _sequences(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(G, d, B * L) -> the (B, C, L) view."""
    return _per_image(x, batch).flatten(1, 2)


def _maps(x: torch.Tensor, batch: int, spatial_shape: Tuple[int, int]) -> torch.Tensor:
    """(G, d, B * L) -> the (B, C, H, W) view."""
    return _sequences(x, batch).unflatten(2, spatial_shape)


def _weight_grad(grad: torch.Tensor, inputs: torch.Tensor, dtype: torch.dtype,
                 columns: Optional[int] = None) -> torch.Tensor:
    """Each group's ``grad @ inputs^T``, ``(G, m, k)`` from ``(G, m, T)`` and ``(G, k, T)`` (its
    first ``columns`` of k), in ``dtype`` (the parameter's), a view. One product of all groups'
    rows (``(G * m, T) @ (T, G * k)``, of which the diagonal blocks are kept) rather than a
    batched product per group, which cuBLAS ran up to 9x slower than the per-image products it
    replaced (H100, 2026-12-07: a batch of four reductions over 401,408 tokens). The blocks off
    the diagonal cost (G - 1) / G of the product's arithmetic, small next to reading the
    operands."""
    G, m, T = grad.shape
    k = inputs.shape[1]
    full = product_in(grad.reshape(G * m, T), inputs.reshape(G * k, T).t(), dtype)
    blocks = full.view(G, m, G, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return blocks if columns is None else blocks[..., :columns]


def _forward(tokens, in_proj_weight, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
             dt_bias, A_log, D, norm_weight, norm_bias, out_proj_weight, config):
    """The kernels' forward: ``(out, what backward needs)``."""
    (H, W), eps, directions = config
    conv, scan, norm_gate = (triton_module(m) for m in ('depthwise_conv', 'scan', 'norm_gate'))
    B = tokens.shape[0]
    G, d, R = dt_proj_weight.shape
    dtype = tokens.dtype
    x = _per_group(tokens, G)
    w_in, w_x, w_dt, w_out = (weight.to(dtype) for weight in (
        in_proj_weight, x_proj_weight, dt_proj_weight, out_proj_weight))
    w_u, w_z = w_in.split(d, dim=1)
    pre, z = torch.matmul(w_u, x), torch.matmul(w_z, x)
    u = _per_group(conv.forward(_maps(pre, B, (H, W)), conv_weight, conv_bias, 'silu'), G)
    x_dbl = torch.matmul(w_x, u)
    dt, Bs, Cs = x_dbl.split((R, 1, 1), dim=1)
    delta = torch.matmul(w_dt, dt)
    # The kernel takes A = -exp(A_log) itself (and returns A_log's gradient).
    D32, bias32 = D.float(), dt_bias.float()
    y, states = scan.scan_forward(_sequences(u, B), _sequences(delta, B), A_log,
                                  _per_image(Bs, B), _per_image(Cs, B), D32, bias32, True,
                                  directions, (H, W), dtype, a_log=True)
    gated, mean, rstd = norm_gate.forward(y.unflatten(1, (G, d)), _per_image(z, B),
                                          norm_weight, norm_bias, eps)
    gated = _per_group(gated.flatten(1, 2), G)
    out = _per_image(torch.matmul(w_out, gated), B)
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
        ctx.batch = tokens.shape[0]
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
        B = ctx.batch
        G, d, R = w_dt.shape
        dtype = x.dtype
        # (G, d, B * L): a view where the gradient comes channel-major (modulate_norm's does).
        grad_out = _per_group(grad_out.to(dtype).flatten(1, 2), G)

        grad_out_proj = _weight_grad(grad_out, gated, out_dtype)
        grad_gated = torch.matmul(_mT(w_out), grad_out)
        grad_y, grad_z, grad_norm_weight, grad_norm_bias = norm_gate.backward(
            _per_image(grad_gated, B), y.unflatten(1, (G, d)), _per_image(z, B), norm_weight,
            norm_bias, mean, rstd)
        del grad_gated
        _, Bs, Cs = x_dbl.split((R, 1, 1), dim=1)
        grad_u, grad_delta, grad_A_log, grad_B, grad_C, grad_D, grad_bias = scan.scan_backward(
            _sequences(u, B), _sequences(delta, B), A_log, _per_image(Bs, B), _per_image(Cs, B),
            D32, bias32, True, directions, (H, W), grad_y.flatten(1, 2), tuple(states),
            a_log=True)
        del grad_y
        grad_delta = _per_group(grad_delta.to(dtype), G)
        # Against all of x_dbl (whose first R rows are dt): dt's rows are not one strided matrix.
        grad_dt_proj = _weight_grad(grad_delta, x_dbl, dt_dtype, columns=R)
        grad_x_dbl = torch.cat((
            torch.matmul(_mT(w_dt), grad_delta).unflatten(2, (B, -1)),
            grad_B.to(dtype).permute(1, 2, 0, 3), grad_C.to(dtype).permute(1, 2, 0, 3)),
            dim=1).flatten(2)
        del grad_delta
        grad_x_proj = _weight_grad(grad_x_dbl, u, x_dtype)
        # The scan's and the projection's gradients at u meet inside one matmul.
        grad_u = _per_group(grad_u.to(dtype), G)
        grad_u.baddbmm_(_mT(w_x), grad_x_dbl)
        del grad_x_dbl
        pre_maps = _maps(pre, B, (H, W))
        grad_pre = conv.activation_grad(_maps(grad_u, B, (H, W)), pre_maps, conv_weight,
                                        conv_bias, 'silu')
        del grad_u
        grad_pre, grad_conv_weight, grad_conv_bias = conv.backward(grad_pre, pre_maps,
                                                                   conv_weight, True)
        grad_pre = _per_group(grad_pre, G)
        grad_z = _per_group(grad_z.flatten(1, 2), G)
        w_u, w_z = w_in.split(d, dim=1)
        grad_in_proj = torch.cat((_weight_grad(grad_pre, x, in_dtype),
                                  _weight_grad(grad_z, x, in_dtype)), dim=1)
        grad_x = torch.matmul(_mT(w_u), grad_pre)
        grad_x.baddbmm_(_mT(w_z), grad_z)
        return (_sequences(grad_x, B), grad_in_proj, _like(conv_weight, grad_conv_weight),
                grad_conv_bias.to(conv_bias.dtype), grad_x_proj, grad_dt_proj,
                grad_bias.to(bias_dtype), grad_A_log.to(A_dtype), grad_D.to(D_dtype),
                grad_norm_weight.to(norm_weight.dtype), grad_norm_bias.to(norm_bias.dtype),
                grad_out_proj, None)
