"""The selective scan and the depthwise convolution as exporters record them: standard operators
that must compute what the eager paths compute."""
import sys

import pytest
import torch
import torch.nn.functional as F

from mmgroupmamba.ops import depthwise_conv as depthwise_conv_module
from mmgroupmamba.ops import depthwise_conv2d, graph_scan, selective_scan, torch_scan

# The package's ``selective_scan`` is the function; its module is this.
selective_scan_module = sys.modules['mmgroupmamba.ops.selective_scan']


def _inputs(batch, dim, groups, N, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(batch, dim, L, generator=g),
                delta=torch.randn(batch, dim, L, generator=g),
                A=-torch.rand(dim, N, generator=g) * 2,
                B=torch.randn(batch, groups, N, L, generator=g),
                C=torch.randn(batch, groups, N, L, generator=g),
                D=torch.randn(dim, generator=g), delta_bias=torch.randn(dim, generator=g))


def _relative_error(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize('batch, dim, N, H, W, directions', [
    (2, 8, 1, 1, 1, (0, 1, 2, 3)),          # one token
    (2, 8, 1, 5, 7, (0, 1, 2, 3)),          # fewer tokens than a chunk, odd sizes
    (1, 12, 2, 33, 41, (0, 1, 2, 3)),       # 170 chunks: 8 doubling levels matter
    (2, 6, 3, 9, 4, (3, 1)),                # two groups, state size 3
    (1, 4, 1, 16, 16, (0, )),               # one group, no reordering
])
def test_graph_scan_equals_the_cpu_path(batch, dim, N, H, W, directions):
    x = _inputs(batch, dim, len(directions), N, H * W)
    args = (x['u'], x['delta'], x['A'], x['B'], x['C'], x['D'], x['delta_bias'], True,
            directions, (H, W))
    ref, _ = torch_scan.scan_forward(*args, torch.float32)
    y = graph_scan.scan_forward(*args, torch.float32)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert _relative_error(y, ref) < 1e-5


def test_graph_scan_covers_max_length(monkeypatch):
    """LEVELS doubling levels carry states over 2^LEVELS chunks (and one more): shrunk to 3
    levels of 8-step chunks, 64 tokens scan right and 80 do not (the constants mean what they
    say)."""
    monkeypatch.setattr(graph_scan, 'CHUNK', 8)
    monkeypatch.setattr(graph_scan, 'LEVELS', 3)
    errors = []
    for L in (64, 80):
        x = _inputs(1, 4, 1, 1, L)
        x['A'] = -torch.full_like(x['A'], 1e-3)  # slow decay: early chunks reach the end
        args = (*x.values(),)[:5] + (None, None, False, (0, ), (1, L))
        ref, _ = torch_scan.scan_forward(*args, torch.float32)
        errors.append(_relative_error(graph_scan.scan_forward(*args, torch.float32), ref))
    assert errors[0] < 1e-5 and errors[1] > 1e-2
    assert graph_scan.MAX_LENGTH >= 2 ** 20  # the real constants: 4096 x 4096 images


def test_selective_scan_takes_the_graph_scan_while_exporting(monkeypatch):
    x = _inputs(2, 8, 4, 1, 6 * 5)
    x = dict(x, B=x['B'][:, 0], C=x['C'][:, 0])  # 3-D B and C, shared by the groups
    kwargs = dict(delta_softplus=True, spatial_shape=(6, 5),
                  directions=('left_right', 'top_bottom', 'right_left', 'bottom_top'))
    ref = selective_scan(*x.values(), **kwargs)
    calls, real = [], graph_scan.scan_forward
    # What an exporter sets: a tracer records the call, and the graph leaves PyTorch.
    monkeypatch.setattr(selective_scan_module, 'traced', lambda: True)
    monkeypatch.setattr(selective_scan_module, 'exporting', lambda: True)
    monkeypatch.setattr(graph_scan, 'scan_forward', lambda *a: calls.append(a) or real(*a))
    y = selective_scan(*x.values(), **kwargs)
    assert len(calls) == 1 and calls[0][3].shape == (2, 4, 1, 30)
    assert _relative_error(y, ref) < 1e-5


@pytest.mark.parametrize('activation', [None, 'silu', 'gelu'])
def test_depthwise_conv_is_a_grouped_conv_while_exporting(monkeypatch, activation):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 7, 9, generator=g).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, generator=g)
    ref = depthwise_conv2d(x, weight, bias, activation=activation)
    monkeypatch.setattr(depthwise_conv_module, 'traced', lambda: True)
    monkeypatch.setattr(depthwise_conv_module, 'exporting', lambda: True)
    y = depthwise_conv2d(x, weight, bias, activation=activation)
    expected = F.conv2d(x, weight, bias, padding=1, groups=6)
    expected = expected if activation is None else getattr(F, activation)(expected)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, ref)
