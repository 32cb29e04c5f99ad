"""Triton selective-scan kernels against the float64 torch reference.

The CUDA tests need a GPU; ``test_interpreter_matches_reference`` runs the same kernels on the CPU
through Triton's interpreter (small shapes, short chunks so that the carry between chunks is used).
"""
import textwrap

import pytest
import torch

triton = pytest.importorskip('triton')

from conftest import run_in_triton_interpreter  # noqa: E402
from mmgroupmamba.ops import selective_scan, torch_scan  # noqa: E402
from mmgroupmamba.ops.triton import scan as triton_scan  # noqa: E402
from mmgroupmamba.ops.triton import scan_n1 as triton_scan_n1  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


# (dims per group, L) of the four stages at 224 x 224; four groups, one per scan direction.
STAGES = {
    'tiny': ((16, 3136), (32, 784), (87, 196), (112, 49)),
    'small': ((16, 3136), (32, 784), (87, 196), (128, 49)),
    'base': ((24, 3136), (48, 784), (106, 196), (128, 49)),
}
ALL_DIRECTIONS = (0, 1, 2, 3)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_inputs(batch, dim, groups, N, H, W, dtype, device, with_d=True, with_bias=True):
    """Random scan inputs in the ranges GroupMamba produces (negative A, softplus-sized delta)."""
    L = H * W
    kw = dict(device=device)
    return dict(
        u=torch.randn(batch, dim, L, **kw).to(dtype),
        delta=(0.5 * torch.randn(batch, dim, L, **kw)).to(dtype),
        A=-(0.2 + torch.rand(dim, N, **kw)),
        B=torch.randn(batch, groups, N, L, **kw).to(dtype),
        C=torch.randn(batch, groups, N, L, **kw).to(dtype),
        D=torch.randn(dim, **kw) if with_d else None,
        delta_bias=0.3 * torch.randn(dim, **kw) if with_bias else None,
    )


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_against_reference(inputs, directions, spatial_shape, softplus=True, out_dtype=None):
    names = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')
    args = tuple(inputs[n] for n in names)
    out_dtype = out_dtype or inputs['u'].dtype
    tol = TOLERANCE[inputs['u'].dtype]
    y, saved = triton_scan.scan_forward(*args, softplus, directions, spatial_shape, out_dtype)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    grads = triton_scan.scan_backward(*args, softplus, directions, spatial_shape, dy, saved)

    args64 = tuple(None if a is None else a.double() for a in args)
    y_ref, _ = torch_scan.scan_forward(*args64, softplus, directions, spatial_shape, torch.float64)
    grads_ref = torch_scan.scan_backward(*args64, softplus, directions, spatial_shape,
                                         dy.double(), ())
    assert y.dtype == out_dtype
    assert relative_error(y, y_ref) < tol, 'y'
    for name, grad, ref, arg in zip(names, grads, grads_ref, args):
        if arg is None:
            assert grad is None, name
            continue
        assert grad.shape == arg.shape and grad.dtype == arg.dtype, name
        assert torch.isfinite(grad).all(), name  # NaN poison left anywhere means a missed write
        if ref.abs().max() > 0:  # dA is exactly zero for L = 1
            assert relative_error(grad, ref) < tol, f'd{name}: {relative_error(grad, ref):.2e}'


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element the kernels never write fails the check."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float('nan'), dtype=dtype, device=device)

    monkeypatch.setattr(triton_scan, '_empty', nan_empty)


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('batch', [1, 128])
@pytest.mark.parametrize('arch', list(STAGES))
def test_groupmamba_stages(arch, batch, dtype, poisoned_outputs):
    torch.manual_seed(0)
    for dim_per_group, L in STAGES[arch]:
        side = int(L**0.5)
        inputs = make_inputs(batch, 4 * dim_per_group, 4, 1, side, side, dtype, 'cuda')
        check_against_reference(inputs, ALL_DIRECTIONS, (side, side))


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('H, W', [(200, 304), (334, 200)])
def test_detection_sizes(H, W, dtype, poisoned_outputs):
    # Stage 1 of 800 x 1216 and 1333 x 800 inputs: L = 60,800 and 66,800, many chunks.
    torch.manual_seed(1)
    inputs = make_inputs(1, 64, 4, 1, H, W, dtype, 'cuda')
    check_against_reference(inputs, ALL_DIRECTIONS, (H, W))


@requires_cuda
@pytest.mark.parametrize('case', [
    dict(H=1, W=1),                                       # L = 1
    dict(H=7, W=13, N=3, with_d=False, with_bias=False),  # odd sizes, several states, no D/bias
    dict(H=37, W=41, groups=2, softplus=False, directions=(3, 1)),
    dict(H=50, W=40, groups=1, directions=(0, )),         # one row-major group, vectorised path
])
def test_edge_cases(case, poisoned_outputs):
    torch.manual_seed(2)
    groups = case.get('groups', 4)
    inputs = make_inputs(2, 5 * groups, groups, case.get('N', 1), case['H'], case['W'],
                         torch.float32, 'cuda', case.get('with_d', True),
                         case.get('with_bias', True))
    if not case.get('softplus', True):
        # A step must not grow the state: delta + delta_bias >= 0 without softplus.
        inputs['delta'] = inputs['delta'].abs()
        inputs['delta_bias'] = inputs['delta_bias'].abs()
    check_against_reference(inputs, case.get('directions', ALL_DIRECTIONS)[:groups],
                            (case['H'], case['W']), softplus=case.get('softplus', True))


@requires_cuda
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_in_float32_out(dtype, poisoned_outputs):
    torch.manual_seed(3)
    inputs = make_inputs(4, 64, 4, 1, 28, 28, dtype, 'cuda')
    check_against_reference(inputs, ALL_DIRECTIONS, (28, 28), out_dtype=torch.float32)


@requires_cuda
def test_public_op_dispatches_to_triton():
    torch.manual_seed(5)
    inputs = make_inputs(2, 32, 4, 1, 9, 10, torch.float32, 'cuda')
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    names = ('left_right', 'top_bottom', 'right_left', 'bottom_top')
    y = selective_scan(**leaves, delta_softplus=True, spatial_shape=(9, 10), directions=names)
    y.square().sum().backward()
    cpu = {k: v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    y_ref = selective_scan(**cpu, delta_softplus=True, spatial_shape=(9, 10), directions=names)
    y_ref.square().sum().backward()
    assert relative_error(y.cpu(), y_ref) < 1e-5
    for name in inputs:
        assert relative_error(leaves[name].grad.cpu(), cpu[name].grad) < 1e-5, name


@requires_cuda
def test_detection_sizes_reuse_compiled_kernels():
    """20 image sizes through all four stages compile a bounded set of kernels, not one per size."""
    torch.manual_seed(4)
    sizes = [(608 + 32 * (i % 7), 800 + 40 * i) for i in range(20)]
    dims = (64, 128, 348, 448)
    before = triton_scan.compiled_kernel_count()
    for height, width in sizes:
        for stage, dim in enumerate(dims):
            H, W = height // 4 >> stage, width // 4 >> stage
            inputs = make_inputs(2, dim, 4, 1, H, W, torch.float32, 'cuda')
            args = tuple(inputs.values())
            y, saved = triton_scan.scan_forward(*args, True, ALL_DIRECTIONS, (H, W), torch.float32)
            triton_scan.scan_backward(*args, True, ALL_DIRECTIONS, (H, W), y, saved)
    compiled = triton_scan.compiled_kernel_count() - before
    print(f'kernels compiled for 20 detection sizes x 4 stages: {compiled}')
    # Per stage and kernel: L % 4 == 0 or not, and at most two chunk lengths (stage 4 is short).
    assert compiled <= 4 * 2 * 2 * 2


INTERPRETER_CHECK = textwrap.dedent('''
    import torch
    from mmgroupmamba.ops import torch_scan
    from mmgroupmamba.ops.triton import scan as triton_scan
    from mmgroupmamba.ops.triton import scan_n1 as triton_scan_n1
    # Several chunks even for these short sequences; backward's chunk twice forward's. States
    # saved inside forward's chunks (state spacing 8, chunks 16), then once every few chunks
    # (spacing 32, chunks 8); then one-row programs of several chunks.
    triton_scan._MAX_CHUNK = 16
    triton_scan_n1._LONG_L, triton_scan_n1._LONG_BWD_T = 40, 32
    torch.manual_seed(0)
    cases = [(2, 8, 4, 2, 5, 7, (0, 1, 2, 3)), (1, 6, 2, 1, 3, 11, (0, 0)), (2, 8, 4, 1, 6, 4, (3, 2, 1, 0)),
             (2, 12, 2, 1, 7, 9, (1, 2)), (3, 4, 1, 1, 1, 1, (0, ))]
    settings = [dict(_MAX_T=16, STATE_STEPS=8), dict(_MAX_T=8, STATE_STEPS=32),
                dict(_MANY_ROWS=1, _SHORT_T=8, STATE_STEPS=8, _ROW_T=8, _ROW_LONG_L=40,
                     _ROW_LONG_T=16)]
    defaults = {name: getattr(triton_scan_n1, name) for setting in settings for name in setting}
    for setting, (batch, dim, groups, N, H, W, directions) in (
            (setting, case) for setting in settings for case in cases):
        for name, value in dict(defaults, **setting).items():
            setattr(triton_scan_n1, name, value)
        triton_scan_n1.plan.cache_clear()  # plans are cached per shape
        L = H * W
        args = (torch.randn(batch, dim, L), 0.5 * torch.randn(batch, dim, L), -0.2 - torch.rand(dim, N),
                torch.randn(batch, groups, N, L), torch.randn(batch, groups, N, L), torch.randn(dim),
                0.3 * torch.randn(dim))
        y, saved = triton_scan.scan_forward(*args, True, directions, (H, W), torch.float32)
        dy = torch.randn_like(y)
        grads = triton_scan.scan_backward(*args, True, directions, (H, W), dy, saved)
        args64 = tuple(a.double() for a in args)
        y_ref, _ = torch_scan.scan_forward(*args64, True, directions, (H, W), torch.float64)
        refs = torch_scan.scan_backward(*args64, True, directions, (H, W), dy.double(), ())
        for out, ref in zip((y, ) + grads, (y_ref, ) + refs):
            if ref.abs().max() > 0:  # dA is exactly zero for L = 1
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < 1e-5, (setting, L, err)
    print('ok')
''')


def test_interpreter_matches_reference():
    run_in_triton_interpreter(INTERPRETER_CHECK)


def test_saved_shapes_match_the_launch_plans():
    """The shape functions' state sizes (what ``torch.compile`` allocates for) equal what
    forward writes, for every sequence length and state size in range: for N = 1 one state per
    ``STATE_STEPS`` steps whatever the plan, otherwise one per chunk of the launch tile."""
    for L in list(range(1, 700)) + [3136, 4096, 12544, 50000]:
        for N in (1, 2, 3, 4, 16):
            (shape, ) = triton_scan.saved_shapes(2, 8, 4, N, L)
            if N == 1:
                assert shape == (16 * triton.cdiv(L, triton_scan_n1.STATE_STEPS), ), (L, N)
            else:
                tile = triton_scan._Tile(2, 8, 4, N, L, triton_scan._FWD_TILE)
                assert shape == (2, 8, tile.chunks, N), (L, N)


def test_launch_plans_are_consistent():
    """Power-of-two tiles inside the group; backward cuts where forward saved its states; short
    sequences (one chunk) run in one-warp programs; with many rows (batch x channels), longer
    ones run one row per program in one warp, and with few, in tiles of 4 warps or more."""
    for batch in (1, 2, 128):
        for dim_per_group in (1, 16, 87, 112):
            many_rows = batch * 4 * dim_per_group >= 2048
            for L in list(range(1, 600, 7)) + [784, 3136, 4096, 12544, 60800]:
                fwd, bwd = triton_scan_n1.plan(batch, dim_per_group, 4, L)
                for cfg in (fwd, bwd):
                    for value in cfg:
                        assert value & (value - 1) == 0, (L, cfg)
                    assert cfg.block_d <= triton.next_power_of_2(dim_per_group), (L, cfg)
                assert bwd.block_t % triton_scan_n1.STATE_STEPS == 0 or bwd.block_t >= L, (L, bwd)
                if L <= 256:
                    assert fwd.block_t >= L and fwd.warps == 1 and bwd.warps == 1, (L, fwd, bwd)
                elif many_rows:
                    assert fwd in ((1, 128, 1), (1, 256, 1)) and bwd == (1, 128, 1), (L, fwd, bwd)
                else:
                    assert fwd.warps >= 4 and bwd.warps >= 4, (batch, L, fwd, bwd)
