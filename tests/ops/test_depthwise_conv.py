"""The depthwise convolution op: PyTorch path, operator registration, Triton kernels (through
Triton's interpreter on the CPU, natively on a GPU), input checks."""
import functools
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from mmgroupmamba.ops import depthwise_conv2d

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

# (B, C, H, W, k, channels_last, bias): odd and non-square maps, both layouts, k 3 and 5.
CASES = [(2, 5, 7, 9, 3, False, True), (2, 70, 6, 5, 3, True, True), (1, 3, 4, 4, 5, False, False),
         (2, 66, 9, 3, 3, True, False), (1, 4, 1, 1, 3, True, True)]


def make_case(B, C, H, W, k, channels_last, bias, dtype=torch.float32, device='cpu'):
    x = torch.randn(B, C, H, W, dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(C, 1, k, k, device=device)
    return x, weight, torch.randn(C, device=device) if bias else None


ACTIVATIONS = {None: lambda a: a, 'silu': F.silu, 'gelu': F.gelu}


def reference(x, weight, bias, grad_y, activation=None):
    """F.conv2d (then the activation) in float64: output and gradients."""
    inputs = [t.detach().double().requires_grad_() for t in (x, weight, bias) if t is not None]
    conv_bias = inputs[2] if bias is not None else None
    y = F.conv2d(inputs[0], inputs[1], conv_bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    y = ACTIVATIONS[activation](y)
    return [y, *torch.autograd.grad(y, inputs, grad_y.double())]


def run_op(x, weight, bias, grad_y, **kwargs):
    inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    y = depthwise_conv2d(inputs[0], inputs[1], inputs[2] if bias is not None else None, **kwargs)
    return [y, *torch.autograd.grad(y, inputs, grad_y)]


@pytest.mark.parametrize('activation', [None, 'silu', 'gelu'])
@pytest.mark.parametrize('case', CASES)
def test_torch_path_matches_conv2d(case, activation):
    """Output and gradients equal ``F.conv2d``'s (then the activation's); output and input
    gradient keep x's layout."""
    torch.manual_seed(0)
    x, weight, bias = make_case(*case)
    grad_y = torch.randn_like(x)
    results = run_op(x, weight, bias, grad_y, activation=activation)
    for out, ref in zip(results, reference(x, weight, bias, grad_y, activation)):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert results[0].stride() == x.stride() and results[1].stride() == x.stride()


def test_gradcheck_and_low_precision():
    torch.manual_seed(0)
    x, weight, bias = (t.double().requires_grad_() for t in make_case(1, 3, 4, 5, 3, False, True))
    assert torch.autograd.gradcheck(depthwise_conv2d, (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda *args: depthwise_conv2d(*args, activation='gelu'), (x, weight, bias))
    # bf16 maps: float32 arithmetic, bf16 result and input gradient, float32 parameter gradients.
    x, weight, bias = make_case(2, 8, 5, 6, 3, True, True, dtype=torch.bfloat16)
    grad_y = torch.randn_like(x)
    results = run_op(x, weight, bias, grad_y)
    assert [t.dtype for t in results] == [torch.bfloat16, torch.bfloat16, torch.float32,
                                         torch.float32]
    for out, ref in zip(results, reference(x, weight, bias, grad_y)):
        assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_custom_operator_registration():
    """Shape functions and autograd registration agree with the implementation (opcheck), and a
    compiled caller traces through the op, same results."""
    torch.manual_seed(0)
    for case, activation in zip(CASES[:2], ['', 'silu']):
        x, weight, bias = (t.requires_grad_() for t in make_case(*case))
        torch.library.opcheck(torch.ops.mmgroupmamba.depthwise_conv_fwd.default,
                              (x, weight, bias, activation, ''))
        grad_y = torch.randn_like(x)
        eager = run_op(x, weight, bias, grad_y, activation=activation or None)
        compiled = torch.compile(functools.partial(depthwise_conv2d, activation=activation or None),
                                 backend='aot_eager', fullgraph=True)
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        y = compiled(*inputs)
        assert depthwise_conv2d(x, weight, bias).grad_fn.name() == '_EagerDepthwiseConvBackward'
        traced = [y, *torch.autograd.grad(y, inputs, grad_y)]
        for a, b in zip(traced, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('channels_last', [False, True])
def test_weight_gradient_has_the_weight_strides(channels_last):
    """DistributedDataParallel copies (and warns about) gradients whose strides differ from their
    parameter's, even in the size-1 input-channel axis, where a channels-last convolution's
    weight gradient puts another stride."""
    x, weight, bias = make_case(2, 6, 5, 7, 3, channels_last, True)
    weight.requires_grad_()
    depthwise_conv2d(x, weight, bias).sum().backward()
    assert weight.grad.stride() == weight.stride()


def test_bad_inputs_are_named():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match='weight must be'):
        depthwise_conv2d(x, torch.randn(4, 1, 2, 2))
    with pytest.raises(ValueError, match='weight must be'):
        depthwise_conv2d(x, torch.randn(8, 1, 3, 3))
    with pytest.raises(ValueError, match='bias must have shape'):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), torch.randn(3))
    with pytest.raises(ValueError, match=r'x must be \(B, C, H, W\)'):
        depthwise_conv2d(x[0], torch.randn(4, 1, 3, 3))
    with pytest.raises(TypeError, match='x must be a floating-point'):
        depthwise_conv2d(x.long(), torch.randn(4, 1, 3, 3))
    with pytest.raises(ValueError, match="activation must be None or one of .*'relu'"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), activation='relu')
    with pytest.raises(ValueError, match="backend must be None .*'cudnn'"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), backend='cudnn')
    with pytest.raises(ValueError, match=r"backend='triton'.* on cpu; the Triton kernels run on"):
        depthwise_conv2d(x, torch.randn(4, 1, 3, 3), backend='triton')


INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_depthwise_conv import CASES, make_case, reference
    from mmgroupmamba.ops.triton import depthwise_conv as triton_depthwise_conv
    torch.manual_seed(0)
    # Each number of rows per stencil program (the heuristic picks from them by the map's size).
    cases = [(case, rows) for case in CASES if case[4] == 3  # the kernels are written for 3 x 3
             for rows in (8, 4, 1)]
    for (case, rows), activation in zip(cases, [None, 'silu', 'gelu'] * len(cases)):
        triton_depthwise_conv._STENCIL_ROWS = (rows,)
        triton_depthwise_conv._plan.cache_clear()  # plans are cached per shape
        x, weight, bias = make_case(*case)
        grad_y = torch.randn_like(x)
        y = triton_depthwise_conv.forward(x, weight, bias, activation)
        grad_a = (triton_depthwise_conv.activation_grad(grad_y, x, weight, bias, activation)
                  if activation else grad_y)
        if activation:  # the same pass may also write the recomputed output
            grad_a2, y2 = triton_depthwise_conv.activation_grad(grad_y, x, weight, bias,
                                                                activation, with_output=True)
            assert torch.equal(grad_a2, grad_a) and torch.equal(y2, y), (case, rows)
        grad_x, grad_w, grad_b = triton_depthwise_conv.backward(grad_a, x, weight, bias is not None)
        # The same pass may also sum the input gradient per channel.
        *again, sums = triton_depthwise_conv.backward(grad_a, x, weight, bias is not None,
                                                      input_grad_sums=True)
        assert torch.equal(again[0], grad_x), (case, rows)
        assert torch.allclose(sums, grad_x.sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5), (case, rows)
        outs = [y, grad_x, grad_w] + ([grad_b] if bias is not None else [])
        for out, ref in zip(outs, reference(x, weight, bias, grad_y, activation)):
            assert out.shape == ref.shape, (case, out.shape, ref.shape)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-6, (case, rows, activation, err)
        assert y.stride() == x.stride() and grad_x.stride() == x.stride(), case
    # A launch geometry given instead of the planned one (as the tile sweep gives them).
    x, weight, bias = make_case(2, 6, 5, 4, 3, True, True)
    planned = triton_depthwise_conv.plan(x)
    other = triton_depthwise_conv.StencilConfig(2, 4, 2, 2)
    assert other != planned
    assert torch.equal(triton_depthwise_conv.forward(x, weight, bias, 'gelu', cfg=other),
                       triton_depthwise_conv.forward(x, weight, bias, 'gelu'))
    # A gradient laid out unlike the input (the kernels then index each tensor by its strides).
    x, weight, bias = make_case(2, 6, 5, 4, 3, True, True)
    grad_y = torch.randn(2, 6, 5, 4)
    grad_a = triton_depthwise_conv.activation_grad(grad_y, x, weight, bias, 'silu')
    grad_x, grad_w, _ = triton_depthwise_conv.backward(grad_a, x, weight, True)
    _, ref_x, ref_w, _ = reference(x, weight, bias, grad_y, 'silu')
    assert torch.allclose(grad_x.double(), ref_x, atol=1e-5), 'mixed layouts'
    assert torch.allclose(grad_w.double(), ref_w, atol=1e-5), 'mixed layouts'
    # A weight that is a strided view, not a dense parameter.
    x, _, bias = make_case(2, 6, 5, 4, 3, True, True)
    weight = torch.randn(6, 1, 3, 6)[..., ::2]
    y = triton_depthwise_conv.forward(x, weight, bias)
    assert torch.allclose(y.double(), reference(x, weight, bias, torch.zeros_like(x))[0], atol=1e-5)
    print('ok')
''')


def test_triton_kernels_in_interpreter():
    """The Triton kernels (forward, activations, input and weight gradients) against float64
    ``F.conv2d``, run on the CPU by Triton's interpreter."""
    run_in_triton_interpreter(INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape,activation', [
    ((4, 512, 56, 56), 'gelu'), ((3, 348, 13, 17), None), ((2, 1792, 7, 7), 'gelu'),
    ((2, 64, 200, 304), 'silu')])
@pytest.mark.parametrize('channels_last', [True, False])
def test_triton_matches_torch_on_gpu(dtype, shape, activation, channels_last):
    """The GPU op against PyTorch's path on the model's stage shapes and a detection-size map."""
    torch.manual_seed(0)
    x, weight, bias = make_case(*shape, 3, channels_last, True, dtype=dtype, device='cuda')
    grad_y = torch.randn_like(x)
    triton_results = run_op(x, weight, bias, grad_y, activation=activation)
    torch_results = run_op(x, weight, bias, grad_y, activation=activation, backend='torch')
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert triton_results[0].stride() == x.stride() and triton_results[1].stride() == x.stride()
    for a, b in zip(triton_results, torch_results):
        assert a.dtype == b.dtype
        assert ((a.double() - b.double()).norm() / b.double().norm()) < tol


@requires_cuda
@pytest.mark.parametrize('channels, channels_last', [(87, False), (512, True)])
def test_new_image_sizes_reuse_compiled_kernels(channels, channels_last):
    """Heights and widths that leave the strides' divisibility unchanged (widths multiples of 16)
    compile no kernel after the first size (which may find its kernels compiled by an earlier
    test): the sizes themselves are not specialised on. (The mixer's channel-major maps of
    87-channel groups, the FFN's channels-last ones.)"""
    from mmgroupmamba.ops.triton import depthwise_conv as triton_depthwise_conv
    torch.manual_seed(0)
    counts = []
    for H, W in [(200, 304), (208, 336), (221, 1024), (400, 96), (333, 160)]:
        before = triton_depthwise_conv.compiled_kernel_count()
        x, weight, bias = make_case(2, channels, H, W, 3, channels_last, True, device='cuda')
        run_op(x, weight, bias, torch.randn_like(x))
        counts.append(triton_depthwise_conv.compiled_kernel_count() - before)
    assert counts[1:] == [0] * 4, counts


@requires_cuda
def test_custom_operator_registration_on_gpu():
    """opcheck with the Triton kernels behind the op (their outputs' layouts and aliasing)."""
    torch.manual_seed(0)
    for case in CASES[:2]:
        x, weight, bias = (t.requires_grad_() for t in make_case(*case, device='cuda'))
        torch.library.opcheck(torch.ops.mmgroupmamba.depthwise_conv_fwd.default,
                              (x, weight, bias, 'gelu', ''))
