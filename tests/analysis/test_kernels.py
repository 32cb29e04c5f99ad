"""The scan benchmarks' shared pieces (the timings themselves need a GPU)."""
import argparse

import pytest
import torch

from mmgroupmamba.analysis.kernels import (SCAN_SHAPES, parse_scan_shape, scan_benchmark_parser,
                                           scan_inputs, scan_io_bytes)
from mmgroupmamba.ops import torch_scan


def test_shapes_parse_and_bad_ones_are_named():
    assert parse_scan_shape('128X16x3136') == (128, 16, 3136)
    args = scan_benchmark_parser('doc').parse_args([])
    assert args.shapes == [parse_scan_shape(s) for s in SCAN_SHAPES] and args.dtype == 'float32'
    with pytest.raises(argparse.ArgumentTypeError, match='batch x dim x L'):
        parse_scan_shape('128x16')


def test_inputs_fit_the_scan_and_bytes_count_u_delta_b_c_y():
    inputs = scan_inputs(2, 3, 10, dtype=torch.bfloat16, device='cpu')
    y, _ = torch_scan.scan_forward(*inputs.values(), torch.float32)
    assert y.shape == (2, 3, 10)
    # u, delta and y: 2 * 3 * 10 bf16 each; B and C: 2 * 10 bf16 each.
    assert scan_io_bytes(inputs) == (3 * 60 + 2 * 20) * 2
