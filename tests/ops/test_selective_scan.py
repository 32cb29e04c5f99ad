"""``selective_scan`` (torch path) against an independent sequential implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmgroupmamba.ops import SCAN_DIRECTIONS, selective_scan
from mmgroupmamba.ops._directions import scan_permutation

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


def sequential_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """The recurrence one step at a time; autograd differentiates through the loop.

    u, delta ``(batch, dim, L)``, A ``(dim, N)``, B, C ``(batch, groups, N, L)``.
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels_per_group = u.shape[1] // B.shape[1]
    B = B.repeat_interleave(channels_per_group, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(channels_per_group, dim=1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[..., t, None] * A)
        h = decay * h + (delta[..., t] * u[..., t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    return y if D is None else y + D[:, None] * u


def to_scan_order(x, direction, H, W):
    """Reorders the last (row-major token) axis of ``x`` by explicit transpose/flip."""
    grid = x.reshape(*x.shape[:-1], H, W)
    if direction in ('top_bottom', 'bottom_top'):
        grid = grid.transpose(-1, -2)
    x = grid.reshape(x.shape)
    return x.flip(-1) if direction in ('right_left', 'bottom_top') else x


def from_scan_order(x, direction, H, W):
    if direction in ('right_left', 'bottom_top'):
        x = x.flip(-1)
    if direction in ('top_bottom', 'bottom_top'):
        return x.reshape(*x.shape[:-1], W, H).transpose(-1, -2).reshape(x.shape)
    return x


def directional_reference(u, delta, A, B, C, D, delta_bias, delta_softplus, directions, H, W):
    """Each channel group scanned separately on its explicitly reordered tokens."""
    groups = B.shape[1]
    width = u.shape[1] // groups
    outputs = []
    for g, direction in enumerate(directions):
        chans = slice(g * width, (g + 1) * width)
        y = sequential_scan(
            to_scan_order(u[:, chans], direction, H, W),
            to_scan_order(delta[:, chans], direction, H, W), A[chans],
            to_scan_order(B[:, g:g + 1], direction, H, W),
            to_scan_order(C[:, g:g + 1], direction, H, W),
            None if D is None else D[chans],
            None if delta_bias is None else delta_bias[chans], delta_softplus)
        outputs.append(from_scan_order(y, direction, H, W))
    return torch.cat(outputs, dim=1)


def make_inputs(batch, dim, L, N, groups, dtype=torch.float64, with_d=True, with_bias=True,
                delta_scale=0.5, a_scale=1.0, b_3d=False):
    """Random inputs in GroupMamba's ranges (negative A); all require grad."""
    B_shape = (batch, N, L) if b_3d else (batch, groups, N, L)
    inputs = dict(
        u=torch.randn(batch, dim, L),
        delta=delta_scale * torch.rand(batch, dim, L),
        A=-a_scale * (0.1 + torch.rand(dim, N)),
        B=torch.randn(B_shape),
        C=torch.randn(B_shape),
        D=torch.randn(dim) if with_d else None,
        delta_bias=0.3 * torch.randn(dim) if with_bias else None,
    )
    return {k: None if v is None else v.to(dtype).requires_grad_() for k, v in inputs.items()}


def grads_of(y, inputs, dy):
    present = [name for name in NAMES if inputs[name] is not None]
    grads = torch.autograd.grad(y, [inputs[n] for n in present], dy)
    return dict(zip(present, grads))


def assert_matches(out, ref, out_grads, ref_grads, inputs, **tol):
    torch.testing.assert_close(out, ref, **tol)
    assert out_grads.keys() == ref_grads.keys()
    for name, grad in out_grads.items():
        assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=lambda m: f'd{name}: {m}')


@pytest.mark.parametrize('batch,dim,L,N,groups,with_d,with_bias,softplus', [
    (2, 4, 1, 1, 1, True, True, True),       # a single token
    (2, 6, 37, 3, 2, True, True, True),      # L not a power of two, N > 1
    (1, 8, 64, 2, 4, False, False, False),   # bare recurrence
    (3, 4, 130, 1, 1, True, False, True),
    (2, 8, 17, 2, 4, False, True, False),
])
def test_matches_sequential_float64(batch, dim, L, N, groups, with_d, with_bias, softplus):
    torch.manual_seed(L)
    inputs = make_inputs(batch, dim, L, N, groups, with_d=with_d, with_bias=with_bias)
    originals = {k: v.detach().clone() for k, v in inputs.items() if v is not None}
    y = selective_scan(**inputs, delta_softplus=softplus)
    ref = sequential_scan(**inputs, delta_softplus=softplus)
    assert y.dtype == torch.float64
    dy = torch.randn_like(ref)
    assert_matches(y, ref, grads_of(y, inputs, dy), grads_of(ref, inputs, dy), inputs,
                   rtol=1e-9, atol=1e-10)
    for name, original in originals.items():  # the op's in-place updates stay off its inputs
        assert torch.equal(inputs[name], original), name


def test_shared_3d_B_C():
    """3-D B/C are shared by all groups; their gradients come back 3-D."""
    torch.manual_seed(0)
    inputs = make_inputs(2, 6, 12, 2, groups=2, b_3d=True)
    y = selective_scan(**inputs, spatial_shape=(3, 4), directions=('left_right', 'bottom_top'))
    expanded = dict(inputs, B=inputs['B'][:, None].expand(-1, 2, -1, -1),
                    C=inputs['C'][:, None].expand(-1, 2, -1, -1))
    ref = directional_reference(**expanded, delta_softplus=False,
                                directions=('left_right', 'bottom_top'), H=3, W=4)
    dy = torch.randn_like(ref)
    assert_matches(y, ref, grads_of(y, inputs, dy), grads_of(ref, inputs, dy), inputs,
                   rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize('H,W', [(3, 5), (4, 1), (1, 6)])
@pytest.mark.parametrize('shift', [0, 1, 2, 3])
def test_directions_match_explicit_reordering(H, W, shift):
    directions = SCAN_DIRECTIONS[shift:] + SCAN_DIRECTIONS[:shift]
    torch.manual_seed(H * 10 + W + shift)
    inputs = make_inputs(2, 8, H * W, 2, groups=4)
    y = selective_scan(**inputs, delta_softplus=True, spatial_shape=(H, W), directions=directions)
    ref = directional_reference(**inputs, delta_softplus=True, directions=directions, H=H, W=W)
    dy = torch.randn_like(ref)
    assert_matches(y, ref, grads_of(y, inputs, dy), grads_of(ref, inputs, dy), inputs,
                   rtol=1e-9, atol=1e-10)


def test_scan_permutation_visiting_order():
    order, inverse = scan_permutation((0, 1, 2, 3), 2, 3, torch.device('cpu'))
    # Tokens of a 2 x 3 map: row-major storage 0 1 2 / 3 4 5.
    assert order.tolist() == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5],
                              [5, 4, 3, 2, 1, 0], [5, 2, 4, 1, 3, 0]]
    x = torch.arange(6).expand(4, 6)
    assert torch.equal(x.gather(-1, order).gather(-1, inverse), x)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    torch.manual_seed(0)
    inputs = make_inputs(2, 8, 300, 2, groups=4, dtype=dtype)
    directions = ('top_bottom', 'left_right', 'bottom_top', 'right_left')
    y = selective_scan(**inputs, delta_softplus=True, spatial_shape=(15, 20),
                       directions=directions, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert selective_scan(**inputs, delta_softplus=True).dtype == dtype
    inputs64 = {k: None if v is None else v.detach().double().requires_grad_()
                for k, v in inputs.items()}
    ref = directional_reference(**inputs64, delta_softplus=True, directions=directions, H=15, W=20)
    dy = torch.randn_like(ref)
    tol = dict(rtol=1e-4, atol=1e-4)  # only the inputs' rounding differs: float32 accumulation
    torch.testing.assert_close(y.double(), ref, **tol)
    grads = grads_of(y, inputs, dy.float())
    ref_grads = grads_of(ref, inputs64, dy)
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
        scale = ref_grads[name].abs().max()
        torch.testing.assert_close(grad.double() / scale, ref_grads[name] / scale,
                                   rtol=0, atol=2e-2, msg=lambda m: f'd{name}: {m}')


def test_autocast_computes_in_float32():
    torch.manual_seed(0)
    inputs = make_inputs(2, 4, 50, 3, groups=2, dtype=torch.float32)
    plain = selective_scan(**inputs, delta_softplus=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        autocast = selective_scan(**inputs, delta_softplus=True)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
    autocast.sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in inputs.values() if v is not None)


def scalar_scan(u, delta, a, b, c, d):
    """Float64 recurrence of one channel with N = 1 in plain Python floats (fast for long L)."""
    h, ys = 0.0, []
    for u_t, delta_t, b_t, c_t in zip(u, delta, b, c):
        h = math.exp(delta_t * a) * h + delta_t * b_t * u_t
        ys.append(c_t * h + d * u_t)
    return ys


def test_long_sequence_is_stable():
    """Strong decay over 20k steps: finite, and float32 agrees with the float64 recurrence."""
    torch.manual_seed(0)
    L = 20_000
    inputs = make_inputs(1, 2, L, 1, groups=1, dtype=torch.float32, with_bias=False,
                         delta_scale=20.0, a_scale=5.0)
    inputs['delta'].data[..., ::1000] = 1e-3  # stretches of almost no decay between strong ones
    y = selective_scan(**inputs)
    dy = torch.randn_like(y)
    grads = grads_of(y, inputs, dy)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads.values())

    x = {k: v.detach().double() for k, v in inputs.items() if v is not None}
    ref = torch.tensor([scalar_scan(x['u'][0, i].tolist(), x['delta'][0, i].tolist(),
                                    x['A'][i, 0].item(), x['B'][0, 0, 0].tolist(),
                                    x['C'][0, 0, 0].tolist(), x['D'][i].item())
                        for i in range(2)], dtype=torch.float64)
    torch.testing.assert_close(y[0].double(), ref, rtol=1e-4, atol=1e-4)
    # Gradients: float32 against the float64 op (itself checked against the loop above).
    inputs64 = {k: v.detach().double().requires_grad_() for k, v in inputs.items()
                if v is not None}
    grads64 = grads_of(selective_scan(**inputs64), dict(inputs, **inputs64), dy.double())
    for name, grad in grads.items():
        scale = grads64[name].abs().max()
        torch.testing.assert_close(grad.double() / scale, grads64[name] / scale, rtol=0,
                                   atol=1e-5, msg=lambda m: f'd{name}: {m}')


def test_gradcheck():
    torch.manual_seed(0)
    inputs = make_inputs(1, 4, 6, 2, groups=2)
    directions = ('right_left', 'top_bottom')

    def fn(*args):
        return selective_scan(*args, delta_softplus=True, spatial_shape=(2, 3),
                              directions=directions)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in NAMES))


def test_backend_is_chosen_or_refused_with_the_reason():
    inputs = make_inputs(1, 2, 5, 1, groups=1)
    torch.testing.assert_close(selective_scan(**inputs, backend='torch'), selective_scan(**inputs))
    with pytest.raises(ValueError, match="backend must be None .*'cuda'"):
        selective_scan(**inputs, backend='cuda')
    # CPU tensors: the Triton kernels cannot run, and the error says why.
    with pytest.raises(ValueError, match=r"backend='triton'.* on cpu; the Triton kernels run on"):
        selective_scan(**inputs, backend='triton')


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    inputs = make_inputs(2, 4, 9, 2, groups=2)
    strided = dict(inputs, u=inputs['u'].transpose(0, 1).contiguous().transpose(0, 1),
                   delta=inputs['delta'].repeat_interleave(2, dim=-1)[..., ::2])
    torch.testing.assert_close(selective_scan(**strided), selective_scan(**inputs))


@pytest.mark.parametrize('change,error,match', [
    (dict(u=torch.randn(2, 4)), ValueError, r'u must be \(batch, dim, L\)'),
    (dict(delta=torch.randn(2, 4, 8)), ValueError, r'delta must have shape \(2, 4, 9\)'),
    (dict(A=torch.randn(3, 2)), ValueError, r'A must be \(dim=4, N\)'),
    (dict(B=torch.randn(2, 2, 3, 9)), ValueError, r'B must have shape \(2, 2, 2, 9\)'),
    (dict(C=torch.randn(2, 2, 9)), ValueError, r'C must have shape \(2, 2, 2, 9\)'),
    (dict(B=torch.randn(2, 3, 2, 9), C=torch.randn(2, 3, 2, 9)), ValueError,
     r'groups \(3\) must divide dim \(4\)'),
    (dict(D=torch.randn(3)), ValueError, r'D must have shape \(4,\)'),
    (dict(delta_bias=torch.randn(4, 1)), ValueError, r'delta_bias must have shape \(4,\)'),
    (dict(u=torch.ones(2, 4, 9, dtype=torch.long)), TypeError, 'u must be a floating-point'),
    (dict(A=[[1.0]]), TypeError, 'A must be a torch.Tensor'),
    (dict(directions=('left_right', 'diagonal')), ValueError, "unknown scan direction 'diagonal'"),
    (dict(directions=('left_right',)), ValueError, r'len\(directions\) must equal groups \(2\)'),
    (dict(directions='left_right'), ValueError, 'directions must be a non-empty sequence'),
    (dict(spatial_shape=(2, 5)), ValueError, r'spatial_shape \(2, 5\) has 10 tokens but L = 9'),
    (dict(spatial_shape=(9,)), ValueError, r'spatial_shape must be \(H, W\)'),
    (dict(D=torch.randn(4, device='meta')), ValueError, 'D is on meta but u is on cpu'),
])
def test_errors_name_the_argument(change, error, match):
    kwargs = dict(u=torch.randn(2, 4, 9), delta=torch.rand(2, 4, 9), A=-torch.rand(4, 2),
                  B=torch.randn(2, 2, 2, 9), C=torch.randn(2, 2, 2, 9), D=torch.randn(4),
                  delta_bias=torch.randn(4))
    kwargs.update(change)
    with pytest.raises(error, match=match):
        selective_scan(**kwargs)


@pytest.mark.parametrize('with_optional', [True, False])
def test_custom_operator_registration(with_optional):
    """The forward operator's shape function, autograd registration and aliasing rules agree with
    its implementation (``torch.library.opcheck``), and a compiled caller traces through it."""
    torch.manual_seed(0)
    batch, dim, H, W = 2, 8, 3, 5
    L = H * W
    u, delta = torch.randn(batch, dim, L), torch.randn(batch, dim, L)
    A = -torch.rand(dim, 1) - 0.1
    B, C = torch.randn(batch, 4, 1, L), torch.randn(batch, 4, 1, L)
    D, bias = (torch.randn(dim), torch.randn(dim)) if with_optional else (None, None)
    inputs = [x if x is None else x.requires_grad_() for x in (u, delta, A, B, C, D, bias)]
    torch.library.opcheck(torch.ops.mmgroupmamba.selective_scan_fwd.default,
                          (*inputs, True, [0, 1, 2, 3], [H, W], torch.float32, ''))

    def loss_and_grads(fn):
        y = fn(*inputs, delta_softplus=True, spatial_shape=(H, W), directions=SCAN_DIRECTIONS)
        params = [x for x in inputs if x is not None]
        return [y, *torch.autograd.grad((y ** 2).sum(), params)]

    eager = loss_and_grads(selective_scan)
    # Eager calls skip the operator layer; the compiled caller records the operator.
    assert eager[0].grad_fn.name() == '_EagerScanBackward'
    traced = loss_and_grads(torch.compile(selective_scan, backend='aot_eager', fullgraph=True))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
