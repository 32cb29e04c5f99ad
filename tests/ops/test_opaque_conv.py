"""The opaque convolution (the stem's and downsampling convolutions while compiling): same values
and gradients as ``F.conv2d``, channels-last output, operator registration."""
import pytest
import torch
import torch.nn.functional as F

from mmgroupmamba.ops.opaque_conv import opaque_conv2d

# (B, C_in, C_out, H, W, k, stride, padding, bias, channels-last input)
CASES = [(2, 3, 8, 13, 10, 7, 2, 3, False, True), (2, 6, 5, 9, 7, 3, 2, 1, True, False),
         (1, 4, 4, 1, 1, 3, 2, 1, True, True), (2, 5, 3, 6, 8, 3, 1, 1, False, False)]


def make_case(B, c_in, c_out, H, W, k, stride, padding, bias, channels_last):
    x = torch.randn(B, c_in, H, W, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    return x, weight, torch.randn(c_out, dtype=torch.float64) if bias else None


@pytest.mark.parametrize('case', CASES)
def test_matches_conv2d_values_gradients_and_is_channels_last(case):
    torch.manual_seed(0)
    x, weight, bias = make_case(*case)
    stride, padding = case[6:8]
    inputs = [t.requires_grad_() for t in (x, weight, bias) if t is not None]
    y = opaque_conv2d(x, weight, bias, stride, padding)
    expected = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn_like(expected)
    got = torch.autograd.grad(y, inputs, grad_y)
    want = torch.autograd.grad(expected, inputs, grad_y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_operator_registration_and_frozen_inputs():
    """opcheck (shape functions, autograd, strides), and no gradient computed for an input that
    needs none (the image at the stem, frozen weights)."""
    torch.manual_seed(0)
    for case in CASES[:3]:
        x, weight, bias = (None if t is None else t.requires_grad_() for t in make_case(*case))
        torch.library.opcheck(torch.ops.mmgroupmamba.opaque_conv2d_fwd.default,
                              (x, weight, bias, *case[6:8]))
    x, weight, bias = make_case(*CASES[1])
    weight.requires_grad_()
    y = opaque_conv2d(x, weight, bias, 2, 1)
    (grad_weight, ) = torch.autograd.grad(y.sum(), [weight])
    torch.testing.assert_close(grad_weight, torch.autograd.grad(
        F.conv2d(x, weight, bias, stride=2, padding=1).sum(), [weight])[0])


def test_autocast_casts_like_conv2d():
    x, weight, bias = (t.float() for t in make_case(*CASES[1]))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = opaque_conv2d(x, weight, bias, 2, 1)
        expected = F.conv2d(x, weight, bias, stride=2, padding=1)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)


def test_compiled_caller_keeps_one_operator_and_matches_eager():
    torch.manual_seed(0)
    x, weight, bias = (t.float() for t in make_case(*CASES[1]))
    compiled = torch.compile(opaque_conv2d, backend='aot_eager', fullgraph=True, dynamic=True)
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    y = compiled(*inputs, 2, 1)
    expected = F.conv2d(x, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref_grads = torch.autograd.grad(F.conv2d(*ref, stride=2, padding=1), ref,
                                    torch.ones_like(y))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
