"""The kernel benchmarks' shared pieces (the timings themselves need a GPU)."""
import argparse

import pytest
import torch

from common.kernels import (SCAN_SHAPES, candidate_stencil_tiles, candidate_tiles,
                            chunk_lengths, depthwise_maps, parse_scan_shape,
                            scan_benchmark_parser, scan_inputs, scan_io_bytes, token_maps)
import sweep_norm_tiles
from conftest import run_in_triton_interpreter
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


def test_all_directions_inputs_scan_a_map_in_four_groups():
    inputs = scan_inputs(2, 8, 12, device='cpu', all_directions=True)
    assert inputs['directions'] == (0, 1, 2, 3) and inputs['spatial_shape'] == (3, 4)
    assert inputs['B'].shape == (2, 4, 1, 12)
    y, _ = torch_scan.scan_forward(*inputs.values(), torch.float32)
    assert y.shape == (2, 8, 12)
    assert scan_inputs(1, 4, 7, device='cpu', all_directions=True)['spatial_shape'] == (1, 7)
    with pytest.raises(ValueError, match='divisible by 4'):
        scan_inputs(1, 6, 4, device='cpu', all_directions=True)


def test_sweep_candidates():
    tiles = candidate_tiles(87, 256, block_ds=(1, 2, 4, 128, 256), warps=(1, 8), max_tile=2048)
    # 256 channels is past the group (87 -> 128); 8 warps need 256 elements; 2048 at most.
    assert [(t.block_d, t.warps) for t in tiles] == [(1, 1), (1, 8), (2, 1), (2, 8), (4, 1),
                                                     (4, 8)]
    assert [t.block_d for t in candidate_tiles(1, 64, (1, 2), (1, ))] == [1]
    assert chunk_lengths(196) == [128, 256]
    assert chunk_lengths(49) == [64]
    assert chunk_lengths(3136, shortest=512) == [512, 1024, 2048]
    assert chunk_lengths(4096, longest=1024) == [128, 256, 512, 1024]
    assert chunk_lengths(1) == [16]


def test_depthwise_maps_are_the_models():
    maps = list(depthwise_maps('tiny', 128, 224))
    assert maps[0] == ('stage 1 FFN', (128, 512, 56, 56), True, 'gelu')
    assert maps[1] == ('stage 1 SS2D', (128, 64, 56, 56), False, 'silu')
    assert maps[-1] == ('stage 4 SS2D', (128, 448, 7, 7), False, 'silu')


def test_token_maps_are_the_models():
    maps = list(token_maps('tiny', 128, 224))
    assert maps[0] == ('stage 1', (128, 56, 56, 64))
    assert maps[-1] == ('stage 4', (128, 7, 7, 448))


def test_stencil_candidates():
    # Channels-last 512 channels at 56 x 56: channel blocks along the contiguous axis, tiles of
    # 256 to 8192 elements, 32 threads' worth of elements per warp at least.
    tiles = candidate_stencil_tiles((128, 512, 56, 56), True, rows=(4, ), warps=(8, ))
    assert tiles and all(16 <= t.block_c <= 128 and 256 <= t.block_w * t.block_c <= 8192
                         for t in tiles)
    assert all(t.rows == 4 and t.warps == 8 for t in tiles)
    # NCHW 7 x 7 with 448 channels: width blocks capped at 16 (7 rounds up to 8; 16 is the least),
    # rows at 8.
    tiles = candidate_stencil_tiles((128, 448, 7, 7), False, rows=(1, 8, 16), warps=(2, ))
    assert {t.block_w for t in tiles} == {16} and {t.rows for t in tiles} == {1, 8}
    assert all(t.block_c <= 128 for t in tiles)  # 448 channels -> at most the 128 tried


def test_norm_tile_candidates_hold_all_channels_and_a_thread_per_element():
    tiles = sweep_norm_tiles.candidate_tiles(348, 49, rows=[1, 2, 64, 128], warps=[1, 8, 32])
    assert {c for c, _, _ in tiles} == {512}
    assert (512, 64, 8) in tiles and (512, 1, 8) in tiles and (512, 1, 32) not in tiles
    assert all(rows <= 64 for _, rows, _ in tiles)  # L = 49 rows: up to 64


NORM_SWEEP_CHECK = '''
import sys
import torch
sys.path.insert(0, 'benchmarks')
from sweep_norm_tiles import VARIANTS, candidate_tiles, runs
from mmgroupmamba.ops.triton import layer_norm
B, L, C = 2, 6, 24
calls = runs(B, L, C, device='cpu')
assert tuple(calls) == VARIANTS
for variant, (run, nbytes) in calls.items():
    planned = layer_norm.plan(C, L, backward=variant == 'backward')
    other = candidate_tiles(C, L, [2], [1])[0]
    assert other != planned and nbytes > 0
    for a, b in zip(run(planned), run(other)):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a.float(), b.float(), atol=1e-2), variant
print('ok')
'''


def test_norm_sweep_runs_every_variant_in_the_interpreter():
    run_in_triton_interpreter(NORM_SWEEP_CHECK)


def test_sweep_report_lists_the_planned_tile_then_the_fastest(capsys):
    from common.kernels import print_sweep
    print_sweep('map', {'a': 2.0, 'b': 1.0, 'c': 4.0}, 'a', 4_000_000, 2, str.upper)
    assert capsys.readouterr().out.splitlines() == [
        '', 'map: planned A: 2000 us (2 GB/s)',
        '  B: 1000 us (4 GB/s, 2.00x the planned)', '  A: 2000 us (2 GB/s, 1.00x the planned)']
