"""``ops.mixer.grouped_ss2d``: the eager-training Function (on the Triton kernels, here through
Triton's interpreter on the CPU) against the composition of the public ops in float64."""
import textwrap

import pytest
import torch

from conftest import run_in_triton_interpreter
from mmgroupmamba.ops.mixer import grouped_ss2d, grouped_ss2d_ref


def make_inputs(batch, C, H, W, dtype=torch.float32, seed=0):
    """Tokens and parameters of a GroupedSS2D of C channels, away from their initial values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.):
        return (scale * torch.randn(*shape, generator=generator)).requires_grad_()

    G, d = 4, C // 4
    R = -(-d // 16)
    tokens = torch.randn(batch, C, H * W, generator=generator).to(dtype).requires_grad_()
    params = dict(
        in_proj_weight=rand(G, 2 * d, d, scale=d ** -.5),
        conv_weight=rand(C, 1, 3, 3, scale=.3), conv_bias=rand(C, scale=.1),
        x_proj_weight=rand(G, R + 2, d, scale=d ** -.5),
        dt_proj_weight=rand(G, d, R, scale=R ** -.5), dt_bias=rand(C, scale=.5),
        A_log=rand(C, 1, scale=.3), D=rand(C), norm_weight=rand(G, d, scale=.2),
        norm_bias=rand(G, d, scale=.2), out_proj_weight=rand(G, d, d, scale=d ** -.5))
    with torch.no_grad():
        params['norm_weight'] += 1
    return tokens, params


def outputs_and_grads(fn, tokens, params, spatial_shape, grad_out):
    out = fn(tokens, spatial_shape, params)
    grads = torch.autograd.grad(out, [tokens, *params.values()], grad_out)
    return out, dict(zip(['tokens', *params], grads))


def run_function(tokens, spatial_shape, params):
    return grouped_ss2d(tokens, spatial_shape, *params.values(), 1e-5)


def run_reference(tokens, spatial_shape, params):
    return grouped_ss2d_ref(tokens, *params.values(), spatial_shape, 1e-5)


def test_reference_on_cpu_is_differentiable_in_float64():
    """Off the kernels (the CPU) the op is the composition, float64 included."""
    tokens, params = make_inputs(2, 16, 3, 5, torch.float64)
    params = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    out = run_function(tokens, (3, 5), params)
    ref = run_reference(tokens, (3, 5), params)
    assert out.shape == (2, 4, 4, 15) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref)


def test_wrong_spatial_shape_raises():
    tokens, params = make_inputs(1, 16, 3, 5)
    with pytest.raises((ValueError, RuntimeError)):
        run_function(tokens, (4, 5), params)


MIXER_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_mixer import make_inputs, outputs_and_grads, run_function, run_reference
    from mmgroupmamba.ops import mixer
    calls = []
    apply = mixer._GroupedSS2D.apply
    mixer._GroupedSS2D.apply = lambda *args: calls.append(1) or apply(*args)
    for batch, C, H, W, dtype in [(2, 64, 5, 7, torch.float32), (1, 32, 4, 4, torch.float32),
                                  (2, 64, 6, 3, torch.bfloat16)]:
        tokens, params = make_inputs(batch, C, H, W, dtype)
        grad_out = torch.randn(batch, 4, C // 4, H * W).to(dtype)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out, grads = outputs_and_grads(run_function, tokens, params, (H, W), grad_out)
        assert calls, 'the Function did not run'
        calls.clear()
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16,
                                             enabled=dtype == torch.bfloat16):
            assert torch.equal(run_function(tokens, (H, W), params), out), 'no-grad forward'
        assert not calls, 'no-grad calls need no Function'
        # Reference: the composition in float64 (which the kernels leave to PyTorch).
        tokens64 = tokens.detach().double().requires_grad_()
        params64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
        ref, refs = outputs_and_grads(run_reference, tokens64, params64, (H, W),
                                      grad_out.double())
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        assert out.dtype == dtype and out.shape == ref.shape
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < tol, ('out', dtype, err)
        for name, grad in grads.items():
            ref_grad = refs[name]
            assert grad.shape == ref_grad.shape, name
            assert grad.dtype == (tokens if name == 'tokens' else params[name]).dtype, name
            err = ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()
            assert err < tol, (name, dtype, err)
    print('ok')
''')


def test_function_matches_reference_in_interpreter():
    """The Function's forward and every gradient against the composition in float64, float32
    and bfloat16 tokens, and the no-grad forward against the Function's, run on the CPU by
    Triton's interpreter."""
    run_in_triton_interpreter(MIXER_INTERPRETER_CHECK)
