"""The fused pieces of the GroupMamba block (``mmgroupmamba.ops.fused``): PyTorch paths, the
Triton kernels (through Triton's interpreter on the CPU, natively on a GPU)."""
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_in_triton_interpreter
from mmgroupmamba.ops.fused import (_FFN, _GroupNormGate, _Linear, add_layer_norm, ffn,
                                    ffn_ref, group_norm_gate, group_norm_gate_ref, layer_norm,
                                    layer_norm_ref, mixer_norm, mixer_norm_ref, modulate_norm,
                                    modulate_norm_ref)


def test_memory_lean_functions_match_plain_autograd():
    """The eager autograd Functions that keep less for backward (the FFN, the SS2D's norm and
    gate) or cast less (the linear layer) give the gradients of the plain operators: exactly in
    float64 (gradcheck; with and without the convolution and its bias), and within bf16
    rounding under autocast."""
    torch.manual_seed(0)
    double = dict(dtype=torch.double, requires_grad=True)
    x = torch.randn(2, 3, 5, 6, **double)
    w1, b1 = torch.randn(16, 6, **double), torch.randn(16, **double)
    conv_w, conv_b = torch.randn(16, 1, 3, 3, **double), torch.randn(16, **double)
    w2, b2 = torch.randn(8, 16, **double), torch.randn(8, **double)
    lean_ffn = _FFN.apply
    assert torch.autograd.gradcheck(lean_ffn, (x, w1, b1, conv_w, conv_b, w2, b2))
    assert torch.autograd.gradcheck(lambda x, w1, b1, cw, w2, b2: lean_ffn(
        x, w1, b1, cw, None, w2, b2), (x, w1, b1, conv_w, w2, b2))
    assert torch.autograd.gradcheck(lambda x, w1, b1, w2, b2: lean_ffn(
        x, w1, b1, None, None, w2, b2), (x, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(_Linear.apply, (x, w1, b1))
    y, z = torch.randn(2, 4, 5, 7, **double), torch.randn(2, 4, 5, 7, **double)
    weight, bias = torch.randn(4, 5, **double), torch.randn(4, 5, **double)
    gate = _GroupNormGate.apply
    assert torch.autograd.gradcheck(lambda *a: gate(*a, 1e-5, None), (y, z, weight, bias))

    def plain_ffn(x, w1, b1, cw, cb, w2, b2):
        h = F.linear(x, w1, b1)
        a = F.conv2d(h.permute(0, 3, 1, 2), cw, cb, padding=1, groups=h.shape[-1])
        return F.linear(F.gelu(a.permute(0, 2, 3, 1)), w2, b2)

    ffn_args = (x, w1, b1, conv_w, conv_b, w2, b2)
    torch.testing.assert_close(ffn_ref(*ffn_args), plain_ffn(*ffn_args))
    cases = [(lean_ffn, plain_ffn, ffn_args, 1), (_Linear.apply, F.linear, (x, w1, b1), 1),
             (lambda *a: gate(*a, 1e-5, None),
              lambda *a: group_norm_gate_ref(*a, 1e-5), (y, z, weight, bias), 2)]
    for lean, plain, args, maps in cases:
        results = []
        for fn in (lean, plain):
            inputs = [a.detach().float().requires_grad_() for a in args]
            with torch.autocast('cpu', dtype=torch.bfloat16):
                # The first ``maps`` inputs are activations: bf16, as autocast leaves them.
                out = fn(*[t.bfloat16() if i < maps else t for i, t in enumerate(inputs)])
            results.append([out, *torch.autograd.grad((out.float() ** 2).sum(), inputs)])
        for a, c in zip(*results):
            assert a.dtype == c.dtype
            assert ((a.float() - c.float()).norm() / c.float().norm()) < 1e-2


@pytest.mark.parametrize('grad', [True, False])
def test_public_functions_pick_by_autograd(grad):
    """With autograd recording, the lean Functions run (their outputs' grad_fn say so);
    without, the plain operators: both compute the same values."""
    torch.manual_seed(0)
    x, w1, b1 = torch.randn(2, 4, 5, 6), torch.randn(8, 6, requires_grad=True), torch.randn(8)
    conv_w, conv_b = torch.randn(8, 1, 3, 3), torch.randn(8)
    w2, b2 = torch.randn(3, 8), torch.randn(3)
    y, z = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    norm_w, norm_b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
    ffn_args = (x, w1, b1, conv_w, conv_b, w2, b2)
    with torch.set_grad_enabled(grad):
        lean_ffn = ffn(*ffn_args)
        gate = group_norm_gate(y, z, norm_w, norm_b, 1e-5)
    names = [type(out.grad_fn).__name__ if out.grad_fn else None for out in (lean_ffn, gate)]
    assert names == (['_FFNBackward', '_GroupNormGateBackward'] if grad else [None, None])
    torch.testing.assert_close(lean_ffn, ffn_ref(*ffn_args))
    torch.testing.assert_close(gate, group_norm_gate_ref(y, z, norm_w, norm_b, 1e-5))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
# (B, G, d, L): d below, at and above a power of two, tokens in one and several blocks.
NORM_GATE_CASES = [(2, 4, 5, 7), (1, 4, 16, 70), (2, 4, 87, 33), (1, 2, 112, 600)]


def norm_gate_reference(y, z, weight, bias, grad_out):
    """The plain operators in float64: output and the four gradients."""
    inputs = [t.detach().double().requires_grad_() for t in (y, z, weight, bias)]
    out = group_norm_gate_ref(*inputs, 1e-5)
    return [out, *torch.autograd.grad(out, inputs, grad_out.double())]


def norm_gate_case(B, G, d, L, dtype=torch.float32, device='cpu'):
    y, z, grad_out = (torch.randn(B, G, d, L, device=device).to(dtype) for _ in range(3))
    return y, z, torch.randn(G, d, device=device), torch.randn(G, d, device=device), grad_out


def test_norm_gate_backend_is_chosen_or_refused():
    y, z, weight, bias, _ = norm_gate_case(1, 4, 3, 5)
    torch.testing.assert_close(group_norm_gate(y, z, weight, bias, 1e-5, backend='torch'),
                               group_norm_gate_ref(y, z, weight, bias, 1e-5))
    with pytest.raises(ValueError, match="backend='triton'.* on cpu; the Triton kernels run"):
        group_norm_gate(y, z, weight, bias, 1e-5, backend='triton')
    with pytest.raises(ValueError, match="backend must be None .*'cuda'"):
        group_norm_gate(y, z, weight, bias, 1e-5, backend='cuda')


NORM_GATE_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import NORM_GATE_CASES, norm_gate_case, norm_gate_reference
    from mmgroupmamba.ops.triton import norm_gate
    torch.manual_seed(0)
    for case in NORM_GATE_CASES:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            y, z, weight, bias, grad_out = norm_gate_case(*case, dtype=dtype)
            out, mean, rstd = norm_gate.forward(y, z, weight, bias, 1e-5)
            grads = norm_gate.backward(grad_out, y, z, weight, bias, mean, rstd)
            refs = norm_gate_reference(y, z, weight, bias, grad_out)
            for name, got, ref in zip(['out', 'y', 'z', 'weight', 'bias'], [out, *grads], refs):
                assert got.shape == ref.shape, (case, name, got.shape)
                err = ((got.double() - ref).norm() / ref.norm()).item()
                assert err < tol, (case, dtype, name, err)
            assert out.dtype == grads[0].dtype == grads[1].dtype == dtype
    print('ok')
''')


def test_norm_gate_kernels_in_interpreter():
    """The norm-gate kernels (forward, all four gradients) against the float64 operators, in
    float32 and bfloat16, run on the CPU by Triton's interpreter."""
    run_in_triton_interpreter(NORM_GATE_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('case', NORM_GATE_CASES + [(128, 4, 16, 3136), (2, 4, 87, 15200)])
def test_norm_gate_triton_matches_torch_on_gpu(case, dtype):
    """Through the public function and its autograd: the Triton path against the PyTorch one,
    on the test cases and GroupMamba-T's first stage (batch 128) and a detection-size map."""
    torch.manual_seed(0)
    y, z, weight, bias, grad_out = norm_gate_case(*case, dtype=dtype, device='cuda')
    results = []
    for backend in ('triton', 'torch'):
        inputs = [t.clone().requires_grad_() for t in (y, z, weight, bias)]
        out = group_norm_gate(*inputs, 1e-5, backend=backend)
        results.append([out, *torch.autograd.grad(out, inputs, grad_out)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype
        assert ((got.double() - ref.double()).norm() / ref.double().norm()) < tol


# (B, H, W, C, with affinity): C below, at and above a power of two; tokens in one and several
# programs.
MODULATE_NORM_CASES = [(2, 3, 5, 6, True), (1, 7, 9, 64, True), (2, 2, 3, 87, False),
                       (1, 33, 40, 16, True)]


def modulate_norm_case(B, H, W, C, with_affinity, dtype=torch.float32, device='cpu'):
    """x channels-last and m channel-major in ``dtype`` (as in the model), the rest float32."""
    x = torch.randn(B, H, W, C, device=device).to(dtype)
    m = torch.randn(B, C, H, W, device=device).to(dtype).permute(0, 2, 3, 1)
    affinity = torch.rand(B, C, device=device) if with_affinity else None
    params = [torch.tensor([0.7], device=device), affinity,
              torch.randn(C, device=device), torch.randn(C, device=device)]
    return x, m, *params, torch.randn(B, H, W, C, device=device).to(dtype)


def check_modulate_norm(got, ref, dtype, inputs):
    """Relative errors of output and gradients. skip_scale's gradient is a sum whose terms
    nearly cancel within each token (LayerNorm does not see the scale of its input; only eps
    does), so its float32 rounding error is bounded in units of :func:`skip_scale_terms`."""
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        if i == 3:
            bound = 16 * torch.finfo(torch.float32).eps * skip_scale_terms(*inputs)
            assert abs(a.item() - b.item()) < bound, (i, a.item(), b.item(), bound)
        else:
            assert ((a.double() - b.double()).norm() / b.double().norm()) < tol, i


def skip_scale_terms(x, m, skip_scale, affinity, weight, bias, grad_out):
    """The scale of the rounding error of skip_scale's gradient, in float64: each token's sum
    of |dL/dpre * pre / s| over its channels (``pre = x * s * m * affinity``, the norm's input),
    combined over tokens as independent errors (the root of the sum of squares)."""
    x, m, skip_scale, weight, bias = (t.double() for t in (x, m, skip_scale, weight, bias))
    pre = x * skip_scale * m
    if affinity is not None:
        pre = pre * affinity.double()[:, None, None, :]
    pre.requires_grad_()
    out = F.layer_norm(pre, (pre.shape[-1], ), weight, bias, 1e-5)
    grad_pre, = torch.autograd.grad(out, pre, grad_out.double())
    return (grad_pre * pre / skip_scale).abs().sum(-1).square().sum().sqrt().item()


def run_modulate_norm(fn, x, m, skip_scale, affinity, weight, bias, grad_out, double=False):
    cast = (lambda t: t.double()) if double else (lambda t: t)
    inputs = [None if t is None else cast(t).detach().requires_grad_()
              for t in (x, m, skip_scale, affinity, weight, bias)]
    out = fn(*inputs)
    needed = [t for t in inputs if t is not None]
    return [out, *torch.autograd.grad(out, needed, cast(grad_out).to(out.dtype))]


def test_modulate_norm_reference_and_backend_choice():
    x, m, skip_scale, affinity, weight, bias, _ = modulate_norm_case(2, 3, 4, 8, True)
    expected = F.layer_norm(x * skip_scale * m * affinity[:, None, None, :], (8, ), weight,
                            bias, 1e-5)
    torch.testing.assert_close(modulate_norm_ref(x, m, skip_scale, affinity, weight, bias, 1e-5),
                               expected)
    torch.testing.assert_close(
        modulate_norm(x, m, skip_scale, affinity, weight, bias, 1e-5, backend='torch'), expected)
    with pytest.raises(ValueError, match=r"modulate_norm\(backend='triton'\) cannot run"):
        modulate_norm(x, m, skip_scale, affinity, weight, bias, 1e-5, backend='triton')


MODULATE_NORM_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import (MODULATE_NORM_CASES, check_modulate_norm, modulate_norm_case,
                            run_modulate_norm)
    from mmgroupmamba.ops import fused
    from mmgroupmamba.ops.triton import modulate_norm as kernels
    torch.manual_seed(0)
    for case in MODULATE_NORM_CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x, m, *params, grad_out = modulate_norm_case(*case, dtype=dtype)
            got = run_modulate_norm(lambda *a: fused._ModulateNorm.apply(*a, 1e-5, kernels),
                                    x, m, *params, grad_out)
            ref = run_modulate_norm(lambda *a: fused.modulate_norm_ref(*a, 1e-5), x, m, *params,
                                    grad_out, double=True)
            check_modulate_norm(got, ref, dtype, (x, m, *params, grad_out))
            assert got[2].stride() == m.stride() and got[1].stride() == x.stride(), case
    print('ok')
''')


def test_modulate_norm_kernels_in_interpreter():
    """The kernels (forward, the six gradients in their inputs' layouts) against the float64
    operators, run on the CPU by Triton's interpreter."""
    run_in_triton_interpreter(MODULATE_NORM_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('case', MODULATE_NORM_CASES + [(128, 56, 56, 64, True),
                                                        (2, 50, 76, 448, True)])
def test_modulate_norm_triton_matches_torch_on_gpu(case, dtype):
    torch.manual_seed(0)
    x, m, *params, grad_out = modulate_norm_case(*case, dtype=dtype, device='cuda')
    got = run_modulate_norm(lambda *a: modulate_norm(*a, 1e-5, backend='triton'), x, m, *params,
                            grad_out)
    ref = run_modulate_norm(lambda *a: modulate_norm_ref(*a, 1e-5), x, m, *params, grad_out,
                            double=True)
    check_modulate_norm(got, ref, dtype, (x, m, *params, grad_out))


# (M rows as (B, H, W), C, input dtype, output dtype): C below, at and above a power of two;
# rows in one and several programs (and more row blocks than backward programs); a float32
# residual written in bf16 for a matmul, bf16 written in float32 (autocast's LayerNorm).
LAYER_NORM_CASES = [((2, 3, 5), 6, torch.float32, torch.float32),
                    ((1, 7, 9), 64, torch.float32, torch.bfloat16),
                    ((2, 3, 3), 87, torch.bfloat16, torch.float32),
                    ((1, 70, 80), 16, torch.float32, torch.float32)]


def layer_norm_case(shape, C, dtype, device='cpu'):
    x = torch.randn(*shape, C, device=device).to(dtype)
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    return x, weight, bias, torch.randn(*shape, C, device=device)


def run_layer_norm(fn, x, weight, bias, grad_out, out_dtype, double=False):
    cast = (lambda t: t.double()) if double else (lambda t: t)
    inputs = [cast(t).detach().requires_grad_() for t in (x, weight, bias)]
    out = fn(*inputs, 1e-5, torch.double if double else out_dtype)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def check_layer_norm(got, ref, x, out_dtype):
    assert got[0].dtype == out_dtype and got[1].dtype == x.dtype
    assert got[0].shape == x.shape and got[1].stride() == x.stride()
    # Output rounding (bf16 outputs), input rounding (bf16 inputs) and its gradient.
    tol = 1e-5 if torch.bfloat16 not in (x.dtype, out_dtype) else 2e-2
    for i, (a, b) in enumerate(zip(got, ref)):
        assert ((a.double() - b).norm() / b.norm()) < tol, (i, a.dtype)


def test_layer_norm_reference_and_backend_choice():
    x, weight, bias, _ = layer_norm_case((2, 3, 4), 8, torch.float32)
    expected = F.layer_norm(x, (8, ), weight, bias, 1e-6)
    torch.testing.assert_close(layer_norm(x, weight, bias, 1e-6, backend='torch'), expected)
    assert layer_norm(x, weight, bias, 1e-6, torch.bfloat16).dtype == torch.bfloat16
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the dtype of autocast's own LayerNorm
        for dtype in (torch.float32, torch.bfloat16):
            assert (layer_norm(x.to(dtype), weight, bias, 1e-6).dtype
                    == F.layer_norm(x.to(dtype), (8, ), weight, bias, 1e-6).dtype)
    with pytest.raises(ValueError, match=r"layer_norm\(backend='triton'\) cannot run"):
        layer_norm(x, weight, bias, 1e-6, backend='triton')


LAYER_NORM_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import LAYER_NORM_CASES, check_layer_norm, layer_norm_case, run_layer_norm
    from mmgroupmamba.ops import fused
    from mmgroupmamba.ops.triton import layer_norm as kernels
    torch.manual_seed(0)
    kernels._BWD_PROGRAMS = 3  # programs that loop over several row blocks
    for shape, C, dtype, out_dtype in LAYER_NORM_CASES:
        x, weight, bias, grad_out = layer_norm_case(shape, C, dtype)
        got = run_layer_norm(lambda *a: fused.layer_norm(*a, backend='triton'), x, weight, bias,
                             grad_out, out_dtype)
        ref = run_layer_norm(fused.layer_norm_ref, x, weight, bias, grad_out, out_dtype,
                             double=True)
        check_layer_norm(got, ref, x, out_dtype)
    # Tokens whose rows do not merge into one stride (a crop of a map) are copied first.
    x, weight, bias, grad_out = layer_norm_case((2, 6, 7), 8, torch.float32)
    got = run_layer_norm(lambda *a: fused.layer_norm(*a, backend='triton'), x[:, 1:5, 2:],
                         weight, bias, grad_out[:, 1:5, 2:], torch.float32)
    ref = run_layer_norm(fused.layer_norm_ref, x[:, 1:5, 2:], weight, bias,
                         grad_out[:, 1:5, 2:], torch.float32, double=True)
    for a, b in zip(got, ref):
        assert ((a.double() - b).norm() / b.norm()) < 1e-5
    # A tile given instead of the planned one (as the tile sweep gives them): the same outputs.
    x, weight, bias = torch.randn(2 * 12, 24), torch.randn(24), torch.randn(24)
    other = (32, 2, 1)
    assert other != kernels.plan(24, 12) and other != kernels.plan(24, 12, backward=True)
    planned = kernels.forward(x, weight, bias, 1e-5, torch.float32, 2,
                              token_dtype=torch.float32, channel_means=True)
    given = kernels.forward(x, weight, bias, 1e-5, torch.float32, 2, token_dtype=torch.float32,
                            channel_means=True, cfg=other)
    for a, b in zip(planned[:5], given[:5]):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    grad = torch.randn(2 * 12, 24)
    planned = kernels.backward(grad, x, weight, planned[1], planned[2], 2)
    given = kernels.backward(grad, x, weight, given[1], given[2], 2, cfg=other)
    for a, b in zip(planned[:3], given[:3]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    print('ok')
''')


def test_layer_norm_kernels_in_interpreter():
    """The kernels (forward in the asked dtype, the three gradients) against the float64
    operators, run on the CPU by Triton's interpreter."""
    run_in_triton_interpreter(LAYER_NORM_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('case', LAYER_NORM_CASES + [((128, 56, 56), 64, torch.float32,
                                                      torch.bfloat16),
                                                     ((2, 25, 38), 448, torch.float32,
                                                      torch.float32)])
def test_layer_norm_triton_matches_torch_on_gpu(case):
    torch.manual_seed(0)
    shape, C, dtype, out_dtype = case
    x, weight, bias, grad_out = layer_norm_case(shape, C, dtype, device='cuda')
    got = run_layer_norm(lambda *a: layer_norm(*a, backend='triton'), x, weight, bias, grad_out,
                         out_dtype)
    ref = run_layer_norm(layer_norm_ref, x, weight, bias, grad_out, out_dtype, double=True)
    check_layer_norm(got, ref, x, out_dtype)


# (B, H, W, C, channel means): C below, at and above a power of two; images of one and several
# row blocks; the classifier's class token (one row per image, stage 4's width).
MIXER_NORM_CASES = [(2, 3, 5, 6, True), (1, 7, 9, 64, True), (2, 2, 3, 87, False),
                    (2, 33, 40, 16, True), (3, 1, 1, 448, True)]


def run_mixer_norm(fn, x, weight, bias, grads, double=False):
    """Outputs of ``fn`` (out, tokens, mean) and the gradients of x, weight and bias for the
    output gradients ``grads`` (None: that output unused)."""
    cast = (lambda t: t.double()) if double else (lambda t: t)
    inputs = [cast(t).detach().requires_grad_() for t in (x, weight, bias)]
    outs = fn(*inputs, 1e-5, torch.double if double else torch.bfloat16)
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    grad_inputs = torch.autograd.grad([o for o, _ in used],
                                      inputs, [cast(g).to(o.dtype) for o, g in used])
    return [o for o in outs if o is not None], list(grad_inputs)


def mixer_norm_grads(B, H, W, C, with_mean, device='cpu'):
    return [torch.randn(B, H, W, C, device=device), torch.randn(B, C, H * W, device=device),
            torch.randn(B, C, device=device) if with_mean else None]


def check_mixer_norm(got, ref):
    """bf16 tokens and float32 everything else: relative errors within bf16's rounding for the
    tokens, float32's for the rest (the tokens' gradient enters in bf16: 1e-2 there)."""
    (outs, grads), (ref_outs, ref_grads) = got, ref
    assert len(outs) == len(ref_outs)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        tol = 1e-2 if i == 1 else 1e-5
        assert a.shape == b.shape and ((a.double() - b).norm() / b.norm()) < tol, i
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert ((a.double() - b).norm() / b.norm()) < 1e-2, i


def test_mixer_norm_reference():
    """The plain operators: LayerNorm, its channel-major copy and its channel means."""
    x, weight, bias, _ = layer_norm_case((2, 3, 4), 8, torch.float32)
    out, tokens, mean = mixer_norm_ref(x, weight, bias, 1e-5, torch.bfloat16)
    expected = F.layer_norm(x, (8, ), weight, bias, 1e-5)
    torch.testing.assert_close(out, expected)
    assert tokens.dtype == torch.bfloat16 and tokens.is_contiguous()
    torch.testing.assert_close(tokens.float(), expected.flatten(1, 2).transpose(1, 2),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(mean, expected.mean(dim=(1, 2)))
    assert mixer_norm(x, weight, bias, 1e-5, torch.bfloat16, False)[2] is None


MIXER_NORM_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import MIXER_NORM_CASES, check_mixer_norm, mixer_norm_grads, run_mixer_norm
    from mmgroupmamba.ops import fused
    from mmgroupmamba.ops.triton import layer_norm as kernels
    torch.manual_seed(0)
    kernels._BWD_PROGRAMS = 3  # programs that loop over several row blocks
    for B, H, W, C, with_mean in MIXER_NORM_CASES:
        x = torch.randn(B, H, W, C)
        weight, bias = torch.randn(C), torch.randn(C)
        grads = mixer_norm_grads(B, H, W, C, with_mean)
        # All outputs' gradients together, then each output alone (the others unused).
        for used in [(0, 1, 2), (0, ), (1, ), (2, )]:
            if not with_mean and 2 in used:
                continue
            part = [g if i in used else None for i, g in enumerate(grads)]
            got = run_mixer_norm(lambda *a: fused.mixer_norm(*a, with_mean, backend='triton'),
                                 x, weight, bias, part)
            ref = run_mixer_norm(lambda *a: fused.mixer_norm_ref(*a, with_mean), x, weight,
                                 bias, part, double=True)
            check_mixer_norm(got, ref)
    print('ok')
''')


def test_mixer_norm_kernels_in_interpreter():
    """The kernels (the three outputs; the input, weight and bias gradients from every subset
    of the outputs' gradients) against the float64 operators, run on the CPU by Triton's
    interpreter."""
    run_in_triton_interpreter(MIXER_NORM_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('case', MIXER_NORM_CASES + [(128, 56, 56, 64, True),
                                                     (2, 25, 38, 448, True)])
def test_mixer_norm_triton_matches_torch_on_gpu(case):
    torch.manual_seed(0)
    B, H, W, C, with_mean = case
    x = torch.randn(B, H, W, C, device='cuda')
    weight, bias = torch.randn(C, device='cuda'), torch.randn(C, device='cuda')
    grads = mixer_norm_grads(B, H, W, C, with_mean, device='cuda')
    got = run_mixer_norm(lambda *a: mixer_norm(*a, with_mean, backend='triton'), x, weight,
                         bias, grads)
    ref = run_mixer_norm(lambda *a: mixer_norm_ref(*a, with_mean), x, weight, bias, grads,
                         double=True)
    check_mixer_norm(got, ref)


def run_add_layer_norm(fn, x, branch, weight, bias, grads, out_dtype, double=False,
                       branch_scale=None):
    """Outputs (total, out) of ``fn`` and the gradients of x, branch, weight and bias for the
    output gradients ``grads`` (None: that output unused)."""
    cast = (lambda t: t.double()) if double else (lambda t: t)
    inputs = [cast(t).detach().requires_grad_() for t in (x, branch, weight, bias)]
    scale = {} if branch_scale is None else dict(branch_scale=cast(branch_scale))
    outs = fn(*inputs, 1e-5, torch.double if double else out_dtype, **scale)
    used = [(o, g) for o, g in zip(outs, grads) if g is not None]
    needed = inputs if grads[1] is not None else inputs[:2]  # the norm's weights need its grad
    return list(outs), list(torch.autograd.grad([o for o, _ in used], needed,
                                                [cast(g).to(o.dtype) for o, g in used]))


def check_add_layer_norm(shape, C, dtype, out_dtype, device, scaled=False):
    """The Triton path of add_layer_norm against the float64 operators: both outputs, and the
    gradients from both outputs' gradients, then from each alone; ``scaled``: the branch
    dropped or scaled per image (stochastic depth)."""
    from mmgroupmamba.ops import fused
    x = torch.randn(*shape, C, device=device).to(dtype)
    branch = torch.randn(*shape, C, device=device).bfloat16()
    weight, bias = torch.randn(C, device=device), torch.randn(C, device=device)
    grads = [torch.randn(*shape, C, device=device), torch.randn(*shape, C, device=device)]
    scale = None
    if scaled:
        scale = torch.tensor([0., 1.25, 2., .5] * shape[0], device=device)[:shape[0]]
        scale = scale.to(torch.bfloat16)
    for used in [(0, 1), (0, ), (1, )]:
        part = [g if i in used else None for i, g in enumerate(grads)]
        got = run_add_layer_norm(lambda *a, **k: fused.add_layer_norm(*a, **k, backend='triton'),
                                 x, branch, weight, bias, part, out_dtype, branch_scale=scale)
        ref = run_add_layer_norm(fused.add_layer_norm_ref, x, branch, weight, bias, part,
                                 out_dtype, double=True, branch_scale=scale)
        assert [t.dtype for t in got[0]] == [dtype, out_dtype]
        assert got[1][1].dtype == torch.bfloat16  # the branch's gradient in its dtype
        tol = 1e-5 if torch.bfloat16 not in (dtype, out_dtype) else 2e-2
        for i, (a, b) in enumerate(zip(got[0] + got[1], ref[0] + ref[1])):
            bound = tol if i in (0, 1, 2) else 1e-2  # the branch's gradient is bf16
            assert ((a.double() - b).norm() / b.norm()) < bound, (used, i)


ADD_LAYER_NORM_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import check_add_layer_norm
    from mmgroupmamba.ops.triton import layer_norm as kernels
    torch.manual_seed(0)
    kernels._BWD_PROGRAMS = 3
    # A float32 residual stream plus a bf16 branch, the norm written in bf16 or float32, and a
    # bf16 stream (CPU autocast's); both outputs' gradients, then each alone.
    for shape, C, dtype, out_dtype in [((2, 3, 5), 6, torch.float32, torch.bfloat16),
                                       ((1, 70, 8), 87, torch.float32, torch.float32),
                                       ((2, 4, 6), 16, torch.bfloat16, torch.bfloat16)]:
        check_add_layer_norm(shape, C, dtype, out_dtype, 'cpu')
    # Stochastic depth: the branch dropped or scaled per image, several row blocks per image.
    check_add_layer_norm((3, 20, 9), 16, torch.float32, torch.bfloat16, 'cpu', scaled=True)
    check_add_layer_norm((4, 3, 5), 6, torch.float32, torch.float32, 'cpu', scaled=True)
    print('ok')
''')


def test_add_layer_norm_kernels_in_interpreter():
    """The residual sum and its norm (both outputs; the gradients of both addends, the weight
    and the bias from each subset of the outputs' gradients) against the float64 operators, run
    on the CPU by Triton's interpreter."""
    run_in_triton_interpreter(ADD_LAYER_NORM_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('case', [((128, 56, 56), 64, torch.float32, torch.bfloat16),
                                  ((2, 25, 38), 448, torch.float32, torch.bfloat16),
                                  ((1, 70, 8), 87, torch.float32, torch.float32),
                                  ((2, 4, 6), 16, torch.bfloat16, torch.bfloat16),
                                  ((128, 28, 28), 128, torch.float32, torch.bfloat16, True)])
def test_add_layer_norm_triton_matches_torch_on_gpu(case):
    torch.manual_seed(0)
    check_add_layer_norm(*case[:4], 'cuda', *case[4:])


def test_add_layer_norm_reference():
    x, branch = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8).bfloat16()
    weight, bias = torch.randn(8), torch.randn(8)
    total, out = add_layer_norm(x, branch, weight, bias, 1e-6, torch.bfloat16)
    torch.testing.assert_close(total, x + branch)
    torch.testing.assert_close(out, F.layer_norm(x + branch, (8, ), weight, bias,
                                                 1e-6).bfloat16())


def check_channel_affinity(B, C, dtype, device, block_c=None):
    """The Triton channel affinity (through the op, or the kernels at tile ``block_c``) against
    float64 operators: the output, and every gradient."""
    from mmgroupmamba.ops import fused
    from mmgroupmamba.ops.triton import channel_affinity as kernels
    R = C // 16
    x = torch.rand(B, C, device=device).to(dtype).requires_grad_()
    params = [(torch.randn(*shape, device=device) / shape[-1] ** .5).requires_grad_()
              for shape in [(R, C), (R, ), (C, R), (C, )]]
    grad = torch.randn(B, C, device=device)
    if block_c is None:
        out = fused.channel_affinity(x, *params, backend='triton')
        out.backward(grad)
        got = [out, x.grad] + [p.grad for p in params]
    else:
        with torch.no_grad():
            out = kernels.forward(x, *params, block_c=block_c)
            got = [out, *kernels.backward(grad, x, *params, block_c=block_c)]
    ref_inputs = [t.detach().double().requires_grad_() for t in [x] + params]
    ref = fused.channel_affinity_ref(*ref_inputs)
    ref.backward(grad.double())
    expected = [ref] + [t.grad for t in ref_inputs]
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    for i, (a, b) in enumerate(zip(got, expected)):
        tol = 1e-5 if dtype == torch.float32 or i != 1 else 1e-2  # x's gradient in bf16
        assert ((a.double() - b).norm() / b.norm().clamp_min(1e-12)) < tol, i


CHANNEL_AFFINITY_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_fused import check_channel_affinity
    torch.manual_seed(0)
    check_channel_affinity(3, 40, torch.float32, 'cpu', block_c=16)  # C in 3 blocks, R = 2
    check_channel_affinity(2, 100, torch.float32, 'cpu', block_c=32)  # R = 6 of 8
    check_channel_affinity(2, 200, torch.bfloat16, 'cpu')  # the op: autograd, bf16 means
    print('ok')
''')


def test_channel_affinity_kernels_in_interpreter():
    run_in_triton_interpreter(CHANNEL_AFFINITY_INTERPRETER_CHECK)


@requires_cuda
@pytest.mark.parametrize('B,C', [(128, 64), (128, 448), (2, 348), (128, 1024)])
def test_channel_affinity_triton_matches_torch_on_gpu(B, C):
    torch.manual_seed(0)
    check_channel_affinity(B, C, torch.float32, 'cuda')


def test_channel_affinity_reference_ignores_autocast_and_follows_the_weights():
    from mmgroupmamba.ops.fused import channel_affinity
    x = torch.rand(2, 32)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 2), torch.nn.ReLU(), torch.nn.Linear(2, 32),
                                 torch.nn.Sigmoid())
    params = [layers[0].weight, layers[0].bias, layers[2].weight, layers[2].bias]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = channel_affinity(x, *params)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, layers(x))
    out64 = channel_affinity(x.double(), *[p.double() for p in params])
    assert out64.dtype == torch.float64
    with pytest.raises(ValueError, match='channel_affinity'):
        channel_affinity(x, *params, backend='triton')  # no Triton for CPU tensors


def test_per_image_weights_and_their_gradient():
    from mmgroupmamba.ops.fused import per_image
    weight = torch.randn(4, 6, 3, requires_grad=True)
    out = per_image(weight, 5, torch.bfloat16)
    assert out.shape == (5, 4, 6, 3) and out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out[2], weight.detach().bfloat16())
    grad = torch.randn(5, 4, 6, 3).bfloat16()
    out.backward(grad)
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, grad.float().sum(0))
    with torch.no_grad():
        plain = per_image(weight, 2, torch.float32)
    assert plain.shape == (2, 4, 6, 3) and plain.is_contiguous() and plain.grad_fn is None
