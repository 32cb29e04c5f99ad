"""Fused pieces of the GroupMamba block that keep less for backward than autograd would.

- :func:`layer_norm`: LayerNorm over the channels of channels-last tokens, its output in the
  dtype the next layer computes in; on CUDA one Triton kernel each way (:mod:`.triton.layer_norm`);
- :func:`add_layer_norm`: a residual sum and the LayerNorm of it, in one pass each way;
- :func:`mixer_norm`: the GroupMamba layer's input norm, also writing the channel-major copy the
  mixer computes on and the channel means; the same kernels;
- :func:`group_norm_gate`: the SS2D output's per-group LayerNorm times ``SiLU(z)``; on CUDA one
  Triton kernel each way (:mod:`.triton.norm_gate`);
- :func:`modulate_norm`: the GroupMamba layer's tail, ``LayerNorm(x * skip_scale * m *
  affinity)``; on CUDA one Triton kernel each way (:mod:`.triton.modulate_norm`);
- :func:`channel_affinity`: CAM's channel weights from the channel means; on CUDA one Triton
  kernel each way (:mod:`.triton.channel_affinity`) instead of ten small ones;
- :func:`per_image`: a weight cast and repeated per image for a batched matmul, in one kernel
  each way;
- :func:`linear`: a linear layer whose backward writes the parameters' gradients in their dtype;
- :func:`ffn`: the FFN (fc1, depthwise 3x3 convolution, GELU, fc2), keeping only its input.

Each picks its implementation by what records the graph: eager autograd gets an
``autograd.Function`` that saves only the inputs (and the norm's statistics) and recomputes the
rest in backward; ``torch.compile`` gets plain operators (Inductor chooses what to keep by
itself; the FFN's hidden map is still recomputed, through activation checkpointing); without
autograd, plain operators are what tracers (the FLOPs counter) understand. The ``*_ref``
functions are those plain operators, the references of the tests.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from ._backends import check_backend, triton_module, triton_unavailable
from ._products import product_in
from ._tracing import exporting, traced
from .depthwise_conv import conv_activation_backward, depthwise_conv2d

__all__ = ['compute_dtype', 'layer_norm', 'layer_norm_ref', 'add_layer_norm',
           'add_layer_norm_ref', 'mixer_norm', 'mixer_norm_ref',
           'group_norm_gate', 'group_norm_gate_ref', 'modulate_norm', 'modulate_norm_ref',
           'channel_affinity', 'channel_affinity_ref', 'per_image', 'linear', 'ffn', 'ffn_ref']


def _records_eager_backward() -> bool:
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` computes in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: Optional[torch.dtype] = None, *,
               backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last axis (channels) of ``x``, statistics in at least float32.

    Args:
        x: (..., C) tokens, any strides (a copy is made where the channels are not contiguous).
        weight, bias: (C,).
        eps: the LayerNorm's epsilon.
        out_dtype: the output's dtype; None: that of ``F.layer_norm(x)`` (under CUDA autocast
            float32, else x's). A norm whose output only feeds a matmul asks for the autocast
            dtype, which the matmul would cast it to.
        backend: as for :func:`group_norm_gate`.

    Returns:
        (..., C) in ``out_dtype``. Eager training on CUDA keeps x and the statistics for
        backward.
    """
    out_dtype = out_dtype or _autocast_layer_norm_dtype(x)
    kernels = _kernels('layer_norm', 'layer_norm', x, backend)
    if kernels is None:
        return layer_norm_ref(x, weight, bias, eps, out_dtype)
    return _token_norm(x, None, weight, bias, eps, out_dtype, 1, None, False, kernels)[0]


def add_layer_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, out_dtype: Optional[torch.dtype] = None, *,
                   branch_scale: Optional[torch.Tensor] = None,
                   backend: Optional[str] = None):
    """``total = x + branch`` (a residual connection) and :func:`layer_norm` of it, in one pass
    on CUDA, whose backward also adds ``total``'s own gradient (autograd would add the two in
    another pass over the map, and cast the branch's copy in a third).

    Args:
        x, branch: (B, ..., C) tokens of one shape, any strides; ``total`` takes their promoted
            dtype.
        weight, bias, eps, out_dtype, backend: as for :func:`layer_norm`.
        branch_scale: optional (B,) factors of the branch per image (stochastic depth's kept
            and dropped paths), applied in the same pass; not differentiated.

    Returns:
        ``(total, out)``, both (B, ..., C).
    """
    if branch_scale is not None and branch_scale.requires_grad:
        raise ValueError('add_layer_norm does not differentiate branch_scale; detach it')
    out_dtype = out_dtype or _autocast_layer_norm_dtype(x)
    kernels = _kernels('layer_norm', 'add_layer_norm', x, backend)
    if kernels is None or torch.promote_types(x.dtype, branch.dtype) != x.dtype:
        return add_layer_norm_ref(x, branch, weight, bias, eps, out_dtype, branch_scale)
    images = 1 if branch_scale is None else x.shape[0]
    out, total, _, _ = _token_norm(x, branch, weight, bias, eps, out_dtype, images, None, False,
                                   kernels, branch_scale)
    return total, out


def add_layer_norm_ref(x, branch, weight, bias, eps, out_dtype, branch_scale=None):
    """:func:`add_layer_norm` in plain operators."""
    if branch_scale is not None:
        branch = branch * branch_scale.view(-1, *[1] * (branch.dim() - 1))
    total = x + branch
    return total, layer_norm_ref(total, weight, bias, eps, out_dtype)


def mixer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               token_dtype: torch.dtype, channel_mean: bool = True, *,
               backend: Optional[str] = None):
    """The GroupMamba layer's input norm: :func:`layer_norm` of (B, H, W, C) tokens, with the
    output again channel-major (the layout of the mixer's matmuls, scan and convolution) in
    ``token_dtype``, and its channel means (for the channel affinity); on CUDA one Triton kernel
    each way, which also sums the three outputs' gradients (autograd would add them in three more
    passes over the map, one of them a transposed copy).

    Args:
        x: (B, H, W, C) tokens, any strides.
        weight, bias, eps: the LayerNorm's.
        token_dtype: the channel-major copy's dtype (the matmuls' compute dtype).
        channel_mean: also return the channel means; False: None in their place.
        backend: as for :func:`group_norm_gate`.

    Returns:
        ``(out, tokens, mean)``: ``out`` (B, H, W, C) as :func:`layer_norm` gives it, ``tokens``
        (B, C, H * W) contiguous in ``token_dtype``, ``mean`` (B, C), the mean of ``out`` over
        H and W (float32 on CUDA), or None.
    """
    kernels = _kernels('layer_norm', 'mixer_norm', x, backend)
    if kernels is None:
        return mixer_norm_ref(x, weight, bias, eps, token_dtype, channel_mean)
    out, _, tokens, mean = _token_norm(x, None, weight, bias, eps, _autocast_layer_norm_dtype(x),
                                       x.shape[0], token_dtype, channel_mean, kernels)
    return out, tokens, mean


def mixer_norm_ref(x, weight, bias, eps, token_dtype, channel_mean=True):
    """:func:`mixer_norm` in plain operators."""
    B, H, W, C = x.shape
    out = layer_norm_ref(x, weight, bias, eps, _autocast_layer_norm_dtype(x))
    tokens = out.reshape(B, H * W, C).transpose(1, 2).to(
        token_dtype, memory_format=torch.contiguous_format)
    return out, tokens, out.mean(dim=(1, 2)) if channel_mean else None


def layer_norm_ref(x, weight, bias, eps, out_dtype):
    """:func:`layer_norm` in plain operators."""
    return F.layer_norm(x, (x.shape[-1], ), weight, bias, eps).to(out_dtype)


def _autocast_layer_norm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm(x)`` returns: CUDA's autocast runs it in float32, CPU's in the
    input's dtype (so the kernels, under Triton's interpreter on the CPU, return what PyTorch's
    CPU path returns)."""
    if x.device.type == 'cuda' and torch.is_autocast_enabled('cuda'):
        return torch.promote_types(x.dtype, torch.float32)
    return x.dtype


def _token_norm(x, branch, weight, bias, eps, out_dtype, images, token_dtype, channel_mean,
                kernels, branch_scale=None):
    """The three token norms on the kernels of :mod:`.triton.layer_norm`: ``(out, total, tokens,
    mean)`` for the norm's input ``x`` (+ ``branch``, unless None, times ``branch_scale``'s
    factor per image, unless None), (..., C) rows of ``images`` images, each output None where
    not asked for (``total`` without a branch, ``tokens`` without ``token_dtype``, ``mean``
    without ``channel_mean``)."""
    args = (x, branch, weight, bias, eps, out_dtype, images, token_dtype, channel_mean, kernels,
            branch_scale)
    if torch.is_grad_enabled():
        return _TokenNorm.apply(*args)
    return _token_norm_forward(*args)[0]


def _token_norm_forward(x, branch, weight, bias, eps, out_dtype, images, token_dtype,
                        channel_mean, kernels, branch_scale=None):
    """-> (the outputs of :func:`_token_norm`, (norm input rows, mean, rstd) for backward)."""
    rows = _channel_rows(x)
    out, mean, rstd, tokens, channel_means, total = kernels.forward(
        rows, weight, bias, eps, out_dtype, images, token_dtype, channel_mean,
        None if branch is None else _channel_rows(branch), branch_scale)
    outs = (out.view(x.shape), None if total is None else total.view(x.shape), tokens,
            channel_means)
    return outs, (rows if total is None else total, mean, rstd)


def _channel_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., C) -> an (M, C) view with contiguous channels (a copy where the rows do not merge)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


class _TokenNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype, images, token_dtype, channel_mean,
                kernels, branch_scale):
        outs, (rows, mean, rstd) = _token_norm_forward(x, branch, weight, bias, eps, out_dtype,
                                                       images, token_dtype, channel_mean,
                                                       kernels, branch_scale)
        ctx.save_for_backward(rows, weight, mean, rstd, branch_scale)
        ctx.kernels, ctx.shape, ctx.images, ctx.bias_dtype = kernels, x.shape, images, bias.dtype
        ctx.branch_dtype = None if branch is None else branch.dtype
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_total, grad_tokens, grad_mean):
        rows, weight, mean, rstd, branch_scale = ctx.saved_tensors
        # The gradients of the outputs that were used (None for the others) enter one pass.
        grad_x, grad_weight, grad_bias, grad_branch = ctx.kernels.backward(
            None if grad_out is None else _channel_rows(grad_out), rows, weight, mean, rstd,
            ctx.images, None if grad_tokens is None else grad_tokens.contiguous(), grad_mean,
            grad_input=None if grad_total is None else _channel_rows(grad_total),
            residual_dtype=ctx.branch_dtype, residual_scale=branch_scale)
        if grad_branch is not None:
            grad_branch = grad_branch.view(ctx.shape)
        return (grad_x.view(ctx.shape), grad_branch, grad_weight.to(weight.dtype),
                grad_bias.to(ctx.bias_dtype), None, None, None, None, None, None, None)


def group_norm_gate(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm of ``y`` over each group's channels (dim 2), per-group affine, times SiLU(z).

    Args:
        y, z: (B, G, d, L).
        weight, bias: (G, d).
        eps: the LayerNorm's epsilon.
        backend: None picks by device (Triton on CUDA where it imports, else PyTorch's
            operators); ``'torch'`` or ``'triton'`` asks for one (``ValueError`` naming why
            Triton cannot run).

    Returns:
        (B, G, d, L) in z's dtype; the statistics are taken in at least float32 (as autocast
        runs ``layer_norm``). Eager training keeps y, z and the statistics for backward; plain
        autograd would keep three float32 copies of y as well.
    """
    kernels = _kernels('norm_gate', 'group_norm_gate', y, backend)
    if _records_eager_backward():
        return _GroupNormGate.apply(y, z, weight, bias, eps, kernels)
    if kernels is not None:
        return kernels.forward(_rows(y), _rows(z), weight, bias, eps)[0]
    return group_norm_gate_ref(y, z, weight, bias, eps)


def _kernels(module: str, function: str, x: torch.Tensor, backend: Optional[str]):
    """The Triton module ``ops.triton.<module>`` for ``function``'s input ``x``, where it applies
    and ``backend`` allows, else None. Tracers get None: they take the plain operators."""
    check_backend(backend)
    if traced():
        return None
    reason = triton_unavailable(x.device, module)
    if reason is None and x.dtype == torch.float64:
        reason = 'float64 maps; the kernels take 16- and 32-bit floats'
    if backend == 'triton' and reason is not None:
        raise ValueError(f"{function}(backend='triton') cannot run here: {reason}")
    if backend == 'torch' or reason is not None:
        return None
    return triton_module(module)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with contiguous tokens (last axis), as the kernels read it."""
    return x if x.stride(-1) == 1 else x.contiguous()


def group_norm_gate_ref(y, z, weight, bias, eps):
    """:func:`group_norm_gate` in plain operators."""
    y_hat, _, _ = _normalize(y, eps)
    return (y_hat * weight[..., None] + bias[..., None]).to(z.dtype) * F.silu(z)


def _normalize(y: torch.Tensor, eps: float):
    """(y - mean) * rstd over dim 2 in at least float32, with mean and rstd (B, G, 1, L)."""
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    var, mean = torch.var_mean(y, dim=2, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return (y - mean) * rstd, mean, rstd


class _GroupNormGate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y, z, weight, bias, eps, kernels):
        if kernels is not None:
            y, z = _rows(y), _rows(z)
            out, mean, rstd = kernels.forward(y, z, weight, bias, eps)
        else:
            with torch.no_grad():
                y_hat, mean, rstd = _normalize(y, eps)
                out = (y_hat * weight[..., None] + bias[..., None]).to(z.dtype) * F.silu(z)
        ctx.save_for_backward(y, z, weight, bias, mean, rstd)
        ctx.kernels = kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, z, weight, bias, mean, rstd = ctx.saved_tensors
        if ctx.kernels is not None:
            grad_y, grad_z, grad_weight, grad_bias = ctx.kernels.backward(
                _rows(grad_out), y, z, weight, bias, mean, rstd)
            return (grad_y, grad_z, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype),
                    None, None)
        y_hat = (y.to(mean.dtype) - mean) * rstd
        normed = y_hat * weight[..., None] + bias[..., None]
        gate = F.silu(z)
        grad_out = grad_out.to(mean.dtype)
        grad_z = torch.ops.aten.silu_backward(grad_out * normed.to(z.dtype), z.to(mean.dtype))
        grad_normed = grad_out * gate.to(mean.dtype)
        grad_weight = (grad_normed * y_hat).sum(dim=(0, 3))
        grad_bias = grad_normed.sum(dim=(0, 3))
        grad_hat = grad_normed * weight[..., None]
        grad_y = rstd * (grad_hat - grad_hat.mean(dim=2, keepdim=True)
                         - y_hat * (grad_hat * y_hat).mean(dim=2, keepdim=True))
        return (grad_y.to(y.dtype), grad_z.to(z.dtype), grad_weight.to(weight.dtype),
                grad_bias.to(bias.dtype), None, None)


def modulate_norm(x: torch.Tensor, m: torch.Tensor, skip_scale: torch.Tensor,
                  affinity: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
                  eps: float, *, backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the channels of ``x * skip_scale * m * affinity``.

    Args:
        x, m: (B, H, W, C) tokens, any strides (the mixer's output ``m`` is channel-major).
        skip_scale: (1,).
        affinity: (B, C) channel weights, or None (ones).
        weight, bias, eps: the LayerNorm's.
        backend: as for :func:`group_norm_gate`.

    Returns:
        (B, H, W, C) in the autocast dtype under autocast (what a following Linear takes), else
        in x's. Eager training on CUDA keeps x, m, the affinity and the statistics for backward;
        plain autograd keeps three more full maps (the partial products and the norm's input).
    """
    kernels = _kernels('modulate_norm', 'modulate_norm', x, backend)
    if kernels is None:
        return modulate_norm_ref(x, m, skip_scale, affinity, weight, bias, eps)
    if torch.is_grad_enabled():
        return _ModulateNorm.apply(x, m, skip_scale, affinity, weight, bias, eps, kernels)
    out, _, _ = kernels.forward(_token_rows(x), _token_rows(m), skip_scale, affinity, weight,
                                bias, eps, compute_dtype(x))
    return _token_map(out, x.shape)


def modulate_norm_ref(x, m, skip_scale, affinity, weight, bias, eps):
    """:func:`modulate_norm` in plain operators (float32 under autocast, as ``layer_norm``)."""
    y = x * skip_scale * m
    if affinity is not None:
        y = y * affinity[:, None, None, :]
    return F.layer_norm(y, (x.shape[-1], ), weight, bias, eps)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> a (B, L, C) view of the same memory (a copy where H and W do not merge)."""
    B, H, W, C = x.shape
    if x.stride(1) != W * x.stride(2):
        x = x.contiguous()
    return x.as_strided((B, H * W, C), (x.stride(0), x.stride(2), x.stride(3)))


def _token_map(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_token_rows`: (B, L, C) -> a (B, H, W, C) view."""
    B, H, W, C = shape
    s_b, s_t, s_c = rows.stride()
    return rows.as_strided((B, H, W, C), (s_b, W * s_t, s_t, s_c))


class _ModulateNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, m, skip_scale, affinity, weight, bias, eps, kernels):
        x_rows, m_rows = _token_rows(x), _token_rows(m)
        out, mean, rstd = kernels.forward(x_rows, m_rows, skip_scale, affinity, weight, bias,
                                          eps, compute_dtype(x))
        ctx.save_for_backward(x_rows, m_rows, skip_scale, affinity, weight, mean, rstd)
        ctx.kernels, ctx.shape, ctx.bias_dtype = kernels, x.shape, bias.dtype
        return _token_map(out, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, m, skip_scale, affinity, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_m, grad_skip, grad_affinity, grad_weight, grad_bias = ctx.kernels.backward(
            _token_rows(grad_out), x, m, skip_scale, affinity, weight, mean, rstd)
        return (_token_map(grad_x, ctx.shape), _token_map(grad_m, ctx.shape),
                grad_skip.to(skip_scale.dtype),
                None if grad_affinity is None else grad_affinity.to(affinity.dtype),
                grad_weight.to(weight.dtype), grad_bias.to(ctx.bias_dtype), None, None)


def per_image(weight: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` repeated over ``batch`` images, contiguous, in ``dtype``: the operand of one
    batched matmul over images (and the groups of a grouped projection). A matmul of the
    unbatched weight would copy it per image all the same, after a separate cast; here the copy
    is the cast, one kernel, and eager backward sums the images' gradients in float32 in one
    more (autograd would sum them and cast in two)."""
    if torch.is_grad_enabled() and weight.requires_grad and not traced():
        return _PerImage.apply(weight, batch, dtype)
    return _repeat(weight, batch, dtype)


def _repeat(weight, batch, dtype):
    # One kernel: the cast copies (bf16), or the contiguous copy does (same dtype).
    return weight.expand(batch, *weight.shape).to(dtype).contiguous()


class _PerImage(torch.autograd.Function):

    @staticmethod
    def forward(ctx, weight, batch, dtype):
        ctx.weight_dtype = weight.dtype
        return _repeat(weight, batch, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return grad.sum(0, dtype=ctx.weight_dtype), None, None


def channel_affinity(x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                     expand_weight: torch.Tensor, expand_bias: torch.Tensor, *,
                     backend: Optional[str] = None) -> torch.Tensor:
    """``sigmoid(expand(relu(reduce(x))))``, two linear layers on per-image channel statistics,
    computed in the weights' dtype whatever the autocast (the GroupMamba layer's CAM).

    Args:
        x: (B, C), e.g. the channel means of a map.
        reduce_weight, reduce_bias: (R, C), (R,).
        expand_weight, expand_bias: (C, R), (C,).
        backend: as for :func:`group_norm_gate`.

    Returns:
        (B, C) in (0, 1), in the weights' dtype.
    """
    kernels = _kernels('channel_affinity', 'channel_affinity', x, backend)
    if kernels is None or reduce_weight.dtype == torch.float64:
        return channel_affinity_ref(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
    inputs = (x.contiguous(), reduce_weight.contiguous(), reduce_bias,
              expand_weight.contiguous(), expand_bias)
    if _records_eager_backward():
        return _ChannelAffinity.apply(*inputs, kernels)
    return kernels.forward(*inputs)


def channel_affinity_ref(x, reduce_weight, reduce_bias, expand_weight, expand_bias):
    """:func:`channel_affinity` in plain operators."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(reduce_weight.dtype)
        hidden = F.relu(F.linear(x, reduce_weight, reduce_bias))
        return torch.sigmoid(F.linear(hidden, expand_weight, expand_bias))


class _ChannelAffinity(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, reduce_weight, reduce_bias, expand_weight, expand_bias, kernels):
        inputs = (x, reduce_weight, reduce_bias, expand_weight, expand_bias)
        ctx.save_for_backward(*inputs)
        ctx.kernels = kernels
        return kernels.forward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        inputs = ctx.saved_tensors
        grads = ctx.kernels.backward(grad_out.contiguous(), *inputs)
        # The parameters' gradients in their dtypes (no copy for float32 ones).
        return (grads[0], *(g.to(t.dtype) for g, t in zip(grads[1:], inputs[1:])), None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, in the autocast dtype under autocast as ``nn.Linear``. Eager
    backward writes the weight's and the bias's gradients in their own dtype directly (a GEMM
    that writes float32 where :func:`product_in` can, a sum into float32), where autograd
    would cast each after it: two kernels and three autograd nodes fewer per call."""
    if _records_eager_backward():
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _Linear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = compute_dtype(x)
        x, weight_c = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x, weight_c, bias.to(dtype))
        ctx.save_for_backward(x, weight_c)
        ctx.param_dtypes = weight.dtype, bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight_c = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_out = grad_out.to(x.dtype)
        rows = grad_out.flatten(0, -2)
        with torch.autocast(x.device.type, enabled=False):
            grad_x = grad_out @ weight_c
            grad_weight = product_in(rows.t(), x.flatten(0, -2), weight_dtype)
        return grad_x, grad_weight, rows.sum(0, dtype=bias_dtype)


def ffn(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
        conv_weight: Optional[torch.Tensor], conv_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor, fc2_bias: torch.Tensor) -> torch.Tensor:
    """``fc2(GELU(depthwise_conv(fc1(x))))`` on channels-last tokens. Eager training keeps only
    ``x`` (in the compute dtype) for backward and recomputes the rest there, fc1's matmul
    included: the hidden map is the block's widest activation (4 to 8 times the tokens'), which
    autograd would keep up to three times (as the convolution's, the GELU's and fc2's input).
    Compiled training keeps fc1's output and recomputes the convolution and GELU.

    Args:
        x: (B, H, W, C) tokens.
        fc1_weight, fc1_bias: (hidden, C), (hidden,).
        conv_weight, conv_bias: the depthwise convolution's (hidden, 1, k, k) weight and
            (hidden,) bias; ``conv_weight`` None: no convolution.
        fc2_weight, fc2_bias: (out, hidden), (out,).

    Returns:
        (B, H, W, out); under autocast the linear layers compute in the autocast dtype, as
        ``nn.Linear`` would.
    """
    args = (x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias)
    if _records_eager_backward():
        return _FFN.apply(*args)
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and not exporting():
        act = cp.checkpoint(_conv_gelu, F.linear(x, fc1_weight, fc1_bias), conv_weight,
                            conv_bias, use_reentrant=False)
        return F.linear(act, fc2_weight, fc2_bias)
    return ffn_ref(*args)


def ffn_ref(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias):
    """:func:`ffn` in plain operators."""
    act = _conv_gelu(F.linear(x, fc1_weight, fc1_bias), conv_weight, conv_bias)
    return F.linear(act, fc2_weight, fc2_bias)


def _conv_gelu(h: torch.Tensor, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU of the depthwise convolution of (B, H, W, C) tokens (one kernel on CUDA, which
    recomputes the convolution in backward); GELU alone without a weight."""
    if weight is None:
        return F.gelu(h)
    return depthwise_conv2d(h.permute(0, 3, 1, 2), weight, bias,
                            activation='gelu').permute(0, 2, 3, 1)


class _FFN(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias):
        device, dtype = x.device.type, compute_dtype(x)
        x = x.to(dtype)
        # The weights in the compute dtype are kept for backward (a few MiB for the whole
        # model), not cast again there.
        fc1_weight_c, fc1_bias_c, fc2_weight_c = (
            fc1_weight.to(dtype), fc1_bias.to(dtype), fc2_weight.to(dtype))
        with torch.autocast(device, enabled=False):
            h = F.linear(x, fc1_weight_c, fc1_bias_c)
            act = _conv_gelu(h, conv_weight, conv_bias)
            del h
            out = F.linear(act, fc2_weight_c, fc2_bias.to(dtype))
        ctx.save_for_backward(x, fc1_weight_c, fc1_bias_c, conv_weight, conv_bias, fc2_weight_c)
        ctx.param_dtypes = fc1_weight.dtype, fc1_bias.dtype, fc2_weight.dtype, fc2_bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, fc1_weight_c, fc1_bias_c, conv_weight, conv_bias, fc2_weight_c = ctx.saved_tensors
        fc1_weight_dtype, fc1_bias_dtype, fc2_weight_dtype, fc2_bias_dtype = ctx.param_dtypes
        dtype = x.dtype
        grad_conv_weight = grad_conv_bias = None
        with torch.autocast(x.device.type, enabled=False):
            grad_out = grad_out.to(dtype)
            h = F.linear(x, fc1_weight_c, fc1_bias_c)
            grad_act = grad_out @ fc2_weight_c
            # The activation (fc2's input, for its weight gradient) and the gradient at fc1's
            # output come from one pass that recomputes the convolution.
            if conv_weight is None:
                act = F.gelu(h)
                grad_h = torch.ops.aten.gelu_backward(grad_act, h)
                grad_fc1_bias = grad_h.flatten(0, -2).sum(0)
            else:
                # fc1's bias gradient comes from the pass that writes grad_h, not from another
                # read of the hidden map.
                act, grad_h, grad_conv_weight, grad_conv_bias, grad_fc1_bias = (
                    conv_activation_backward(grad_act.permute(0, 3, 1, 2), h.permute(0, 3, 1, 2),
                                             conv_weight, conv_bias, 'gelu',
                                             input_grad_sums=True))
                act, grad_h = act.permute(0, 2, 3, 1), grad_h.permute(0, 2, 3, 1)
            del h, grad_act
            rows = grad_out.flatten(0, -2)
            grad_fc2_weight = product_in(rows.t(), act.flatten(0, -2), fc2_weight_dtype)
            grad_fc2_bias = rows.sum(0, dtype=fc2_bias_dtype)
            del act
            grad_x = grad_h @ fc1_weight_c
            grad_fc1_weight = product_in(grad_h.flatten(0, -2).t(), x.flatten(0, -2),
                                         fc1_weight_dtype)
        return (grad_x, grad_fc1_weight, grad_fc1_bias.to(fc1_bias_dtype), grad_conv_weight,
                grad_conv_bias, grad_fc2_weight, grad_fc2_bias.to(fc2_bias_dtype))
