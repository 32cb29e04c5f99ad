"""Registers, spills and occupancy of the Triton kernels at the geometries the ops plan for a
GroupMamba variant's maps, compiled for the H100/H200 (sm_90) on any machine, GPU or not
(Triton's compiler and the ptxas that ships with it).

    python benchmarks/kernel_registers.py                    # GroupMamba-T, batch 128, 224 px
    python benchmarks/kernel_registers.py --stencil-warps 8  # the stencil at another warp count

A memory-bound kernel keeps HBM busy only with enough loads in flight, and the registers a thread
holds bound how many warps an SM runs (65,536 registers and at most 64 warps per SM), hence the
loads in flight. For each kernel and geometry this prints registers per thread, bytes spilled to
local memory, static shared memory, and the warps per SM that leaves. It times nothing: it says
where to look before a sweep on a GPU (``sweep_depthwise_tiles.py``, ``sweep_scan_tiles.py``)
decides.
"""
import inspect
import os
import re
import subprocess
import tempfile
from typing import Dict, Iterable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmgroupmamba.ops.triton import depthwise_conv, layer_norm, scan_n1

from common.kernels import depthwise_maps, maps_benchmark_parser, token_maps

REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
# Registers are allocated per warp in units of 256 (8 per thread).
_ALLOCATION_UNIT = 256


def parse_args():
    parser = maps_benchmark_parser(__doc__)
    parser.add_argument('--stencil-warps', type=int,
                        help="the stencil kernels' warps (default: the plan's)")
    return parser.parse_args()


def ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')


def compile_report(kernel, constexprs: Dict[str, object], warps: int,
                   bf16_pointers: Iterable[str] = (),
                   aligned: Iterable[str] = ()) -> Dict[str, int]:
    """Compiles ``kernel`` for sm_90 with ``constexprs`` (which also give the integer arguments
    that are 1 at launch, such as a contiguous axis' stride: Triton specialises on them);
    pointers are float32 but for ``bf16_pointers``, every pointer and the ``aligned`` integers
    are taken as multiples of 16 (as Triton specialises them at launch). -> registers, spilled
    bytes, shared bytes and the warps per SM."""
    params = list(inspect.signature(kernel.fn).parameters)
    unknown = set(constexprs) - set(params)
    if unknown:
        raise ValueError(f'{kernel.fn.__name__} has no parameters {sorted(unknown)}')
    bf16_pointers, aligned = set(bf16_pointers), set(aligned)

    def argument_type(name):
        if name.endswith('_ptr'):
            return '*bf16' if name in bf16_pointers else '*fp32'
        return 'fp32' if name == 'eps' else 'i64' if name == 'dir_code' else 'i32'

    signature = {p: 'constexpr' if p in constexprs else argument_type(p) for p in params}
    attrs = {(params.index(p), ): [['tt.divisibility', 16]] for p in params
             if p not in constexprs and (p.endswith('_ptr') or p in aligned)}
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(params.index(k), ): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=dict(num_warps=warps))
    with tempfile.NamedTemporaryFile('w', suffix='.ptx', delete=False) as ptx:
        ptx.write(compiled.asm['ptx'])
    try:
        result = subprocess.run([ptxas_path(), '-v', '--gpu-name', 'sm_90a', ptx.name, '-o',
                                 os.devnull], capture_output=True, text=True, check=True)
    finally:
        os.unlink(ptx.name)
    registers = int(re.search(r'Used (\d+) registers', result.stderr).group(1))
    spilled = int(re.search(r'(\d+) bytes spill stores', result.stderr).group(1))
    shared = compiled.metadata.shared
    return dict(registers=registers, spilled=spilled, shared=shared,
                warps_per_sm=warps_per_sm(registers, shared, warps))


def warps_per_sm(registers: int, shared: int, warps: int) -> int:
    """Warps an SM holds for blocks of ``warps`` warps of ``registers`` per thread and ``shared``
    bytes of shared memory each."""
    per_warp = -(-registers * 32 // _ALLOCATION_UNIT) * _ALLOCATION_UNIT
    blocks = min(REGISTERS_PER_SM // (per_warp * warps), MAX_BLOCKS_PER_SM,
                 MAX_WARPS_PER_SM // warps, SHARED_PER_SM // shared if shared else MAX_BLOCKS_PER_SM)
    return blocks * warps


def _line(name: str, geometry: str, report: Dict[str, int]) -> str:
    return (f'  {name:34s} {geometry:24s} {report["registers"]:4d} regs  '
            f'{report["spilled"]:5d} B spilled  {report["shared"]:6d} B shared  '
            f'{report["warps_per_sm"]:3d} warps/SM')


def stencil_reports(arch: str, batch: int, size: int, warps: Optional[int]):
    bf16 = ('src_ptr', 'dst_ptr', 'g_ptr', 'out_ptr')
    for name, shape, channels_last, activation in depthwise_maps(arch, batch, size):
        # The contiguous axis' strides are 1 (constants in the binary), the others multiples
        # of 16 or not known to be.
        unit, other = ('c', 'w') if channels_last else ('w', 'c')
        ones = {f'{t}s_{unit}': 1 for t in 'sdg'}
        strides = ('C', *(f'{t}s_{axis}' for t in 'sdg' for axis in ('b', other, 'h')))
        x = torch.empty(shape, device='meta', dtype=torch.bfloat16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        code = depthwise_conv.ACTIVATIONS[activation]
        # The three passes of training, as the ops launch them (the FFN's activation-gradient
        # pass also writes the activation; its input-gradient pass sums fc1's bias gradient).
        passes = [('forward', False, code, False, False, False),
                  ('activation grad', False, code, True, channels_last, False),
                  ('input grad', True, 0, False, False, channels_last)]
        print(f'{name} {tuple(shape)} {"NHWC" if channels_last else "NCHW"}:')
        for pass_name, mirrored, act, grad, store, sums in passes:
            cfg = depthwise_conv.plan(x, mirrored)
            cfg = cfg if warps is None else cfg._replace(warps=warps)
            geometry = f'{cfg.rows} x {cfg.block_w}w x {cfg.block_c}c, {cfg.warps}w'
            report = compile_report(
                depthwise_conv._dwconv_stencil_kernel,
                dict(ones, MIRRORED=mirrored, HAS_BIAS=not mirrored, ACTIVATION=act,
                     ACTIVATION_GRAD=grad, STORE_OUTPUT=store, SAME_STRIDES=True,
                     COLUMN_SUMS=sums, ROWS=cfg.rows, BLOCK_W=cfg.block_w,
                     BLOCK_C=cfg.block_c), cfg.warps, bf16, strides)
            print(_line(f'stencil, {pass_name}', geometry, report))
        block_w, block_c = depthwise_conv._blocks(x.shape, x.stride(1) == 1,
                                                  depthwise_conv._WGRAD_TILE)
        rows = depthwise_conv._WGRAD_ROWS
        report = compile_report(depthwise_conv._dwconv_wgrad_kernel,
                                dict(ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c,
                                     **{f'{t}s_{unit}': 1 for t in 'xg'}), 4,
                                ('x_ptr', 'g_ptr'),
                                ('C', *(f'{t}s_{axis}' for t in 'xg' for axis in ('b', other, 'h'))))
        print(_line('weight grad', f'{rows} x {block_w}w x {block_c}c, 4w', report))


def layer_norm_reports(arch: str, batch: int, size: int):
    bf16 = ('r_ptr', 'out_ptr', 'tokens_ptr', 'gt_ptr')
    aligned = ('C', 'xs_m', 'rs_m', 'gs_m', 'is_m')
    all_grads = dict(HAS_GRAD_OUT=True, HAS_GRAD_TOKENS=True, HAS_GRAD_MEANS=True,
                     HAS_GRAD_INPUT=True, RESIDUAL_GRAD=True, SCALED=True)
    for name, (B, H, W, C) in token_maps(arch, batch, size):
        print(f'{name} tokens ({B}, {H * W}, {C}):')
        variants = [
            ('norm forward, residual sum', layer_norm._layer_norm_fwd_kernel, layer_norm._TILE,
             dict(RESIDUAL=True, SCALED=True, TOKENS=False, MEANS=False)),
            ('norm forward, mixer input', layer_norm._layer_norm_fwd_kernel, layer_norm._TILE,
             dict(RESIDUAL=False, SCALED=False, TOKENS=True, MEANS=True)),
            ('norm backward, every gradient', layer_norm._layer_norm_bwd_kernel,
             layer_norm._BWD_TILE, all_grads),
        ]
        for label, kernel, tile, flags in variants:
            block_c, block_l, warps = layer_norm._blocks(C, H * W, tile)
            report = compile_report(kernel, dict(flags, BLOCK_L=block_l, BLOCK_C=block_c),
                                    warps, bf16, aligned)
            print(_line(label, f'{block_l} x {block_c}c, {warps}w', report))


def scan_reports(arch: str, batch: int, size: int):
    from mmgroupmamba.models.groupmamba import ARCH_SETTINGS
    bf16 = ('u_ptr', 'delta_ptr', 'B_ptr', 'C_ptr', 'y_ptr', 'dy_ptr', 'du_ptr', 'ddelta_ptr')
    common = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ROW_MAJOR=False, A_LOG=True)
    for stage, dims in enumerate(ARCH_SETTINGS[arch]['embed_dims']):
        side = size // 4 >> stage
        L, d = side * side, dims // 4
        fwd, bwd = scan_n1.plan(batch, d, 4, L)
        chunks_fwd, chunks_bwd = -(-L // fwd.block_t), -(-L // bwd.block_t)
        vec = 4 if L % 4 == 0 else 1
        print(f'stage {stage + 1} scan ({batch}, 4 x {d}, {L}):')
        report = compile_report(
            scan_n1._scan_n1_fwd_kernel,
            dict(common, VEC=vec, BLOCK_D=fwd.block_d, BLOCK_T=fwd.block_t,
                 STATE_T=scan_n1.STATE_STEPS, PREFETCH=chunks_fwd > 1), fwd.warps, bf16)
        print(_line('scan forward', f'{fwd.block_d} x {fwd.block_t}, {fwd.warps}w', report))
        report = compile_report(
            scan_n1._scan_n1_bwd_kernel,
            dict(common, VEC=vec, ATOMIC_BC=bwd.block_d < d, BLOCK_D=bwd.block_d,
                 BLOCK_T=bwd.block_t, PREFETCH=chunks_bwd > 1), bwd.warps, bf16)
        print(_line('scan backward', f'{bwd.block_d} x {bwd.block_t}, {bwd.warps}w', report))


def main():
    args = parse_args()
    print(f'triton {triton.__version__}, sm_90, {args.arch}, batch {args.batch_size}, '
          f'{args.image_size} px, bf16 maps')
    stencil_reports(args.arch, args.batch_size, args.image_size, args.stencil_warps)
    layer_norm_reports(args.arch, args.batch_size, args.image_size)
    scan_reports(args.arch, args.batch_size, args.image_size)


if __name__ == '__main__':
    main()
