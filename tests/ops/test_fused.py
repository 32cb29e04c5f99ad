"""The fused pieces of the GroupMamba block (``mmgroupmamba.ops.fused``)."""
import pytest
import torch

from mmgroupmamba.ops.fused import (_ConvGeluLinear, _GroupNormGate, conv_gelu_linear,
                                    conv_gelu_linear_ref, group_norm_gate, group_norm_gate_ref)


def test_memory_lean_functions_match_plain_autograd():
    """The eager autograd Functions that keep less for backward (depthwise conv -> GELU -> fc2,
    the SS2D's norm and gate) give the gradients of the plain operators: exactly in float64
    (gradcheck; with and without the convolution and its bias), and within bf16 rounding under
    autocast."""
    torch.manual_seed(0)
    F = torch.nn.functional
    double = dict(dtype=torch.double, requires_grad=True)
    h, w = torch.randn(2, 3, 5, 16, **double), torch.randn(8, 16, **double)
    b = torch.randn(8, **double)
    conv_w, conv_b = torch.randn(16, 1, 3, 3, **double), torch.randn(16, **double)
    ffn = _ConvGeluLinear.apply
    assert torch.autograd.gradcheck(ffn, (h, conv_w, conv_b, w, b))
    assert torch.autograd.gradcheck(lambda h, cw, w, b: ffn(h, cw, None, w, b), (h, conv_w, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: ffn(h, None, None, w, b), (h, w, b))
    y, z = torch.randn(2, 4, 5, 7, **double), torch.randn(2, 4, 5, 7, **double)
    weight, bias = torch.randn(4, 5, **double), torch.randn(4, 5, **double)
    gate = _GroupNormGate.apply
    assert torch.autograd.gradcheck(lambda *a: gate(*a, 1e-5), (y, z, weight, bias))

    def plain_ffn(h, cw, cb, w, b):
        a = F.conv2d(h.permute(0, 3, 1, 2), cw, cb, padding=1, groups=h.shape[-1])
        return F.linear(F.gelu(a.permute(0, 2, 3, 1)), w, b)

    torch.testing.assert_close(conv_gelu_linear_ref(h, conv_w, conv_b, w, b),
                               plain_ffn(h, conv_w, conv_b, w, b))
    cases = [(ffn, plain_ffn, (h, conv_w, conv_b, w, b)),
             (lambda *a: gate(*a, 1e-5),
              lambda *a: group_norm_gate_ref(*a, 1e-5), (y, z, weight, bias))]
    for lean, plain, args in cases:
        results = []
        for fn in (lean, plain):
            inputs = [a.detach().float().requires_grad_() for a in args]
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = fn(*[x.bfloat16() if x.dim() > 2 else x for x in inputs])
            results.append([out, *torch.autograd.grad((out.float() ** 2).sum(), inputs)])
        for a, c in zip(*results):
            assert a.dtype == c.dtype
            assert ((a.float() - c.float()).norm() / c.float().norm()) < 1e-2


@pytest.mark.parametrize('grad', [True, False])
def test_public_functions_pick_by_autograd(grad):
    """With autograd recording, the lean Functions run (their outputs' grad_fn say so);
    without, the plain operators: both compute the same values."""
    torch.manual_seed(0)
    h, conv_w, conv_b = torch.randn(2, 4, 5, 8), torch.randn(8, 1, 3, 3), torch.randn(8)
    w, b = torch.randn(3, 8, requires_grad=True), torch.randn(3)
    y, z = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    norm_w, norm_b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    with torch.set_grad_enabled(grad):
        ffn = conv_gelu_linear(h, conv_w, conv_b, w, b)
        gate = group_norm_gate(y, z, norm_w, norm_b, 1e-5)
    names = [type(out.grad_fn).__name__ if out.grad_fn else None for out in (ffn, gate)]
    assert names == (['_ConvGeluLinearBackward', '_GroupNormGateBackward'] if grad
                     else [None, None])
    torch.testing.assert_close(ffn, conv_gelu_linear_ref(h, conv_w, conv_b, w, b))
    torch.testing.assert_close(gate, group_norm_gate_ref(y, z, norm_w, norm_b, 1e-5))
