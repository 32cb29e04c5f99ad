"""Every Triton kernel of the package compiles for the H100/H200 (sm_90) ahead of time, without a
GPU: Triton's own compiler down to a cubin (ptxas comes with Triton's wheel). The interpreter
tests check the kernels' arithmetic on the CPU; this catches what only the GPU compiler sees
(types, layouts, unsupported operations), at the launch geometries the ops use."""
import inspect

import pytest

triton = pytest.importorskip('triton')

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmgroupmamba.ops.triton import (channel_affinity, depthwise_conv,  # noqa: E402
                                     layer_norm, modulate_norm, norm_gate, scan, scan_n1)

# Pointer arguments to activations (bf16, as under autocast); other pointers are float32.
_ACTIVATION_POINTERS = {
    'u_ptr', 'delta_ptr', 'B_ptr', 'C_ptr', 'y_ptr', 'dy_ptr', 'du_ptr', 'ddelta_ptr', 'z_ptr',
    'out_ptr', 'go_ptr', 'gy_ptr', 'gz_ptr', 'm_ptr', 'gm_ptr', 'src_ptr', 'dst_ptr', 'g_ptr',
    'r_ptr', 'tokens_ptr', 'gt_ptr'}
_LN_GRADS = dict(HAS_GRAD_OUT=True, HAS_GRAD_TOKENS=True, HAS_GRAD_MEANS=True,
                 HAS_GRAD_INPUT=True, RESIDUAL_GRAD=True, SCALED=True)
_COMMON = dict(HAS_D=True, HAS_BIAS=True, SOFTPLUS=True, ROW_MAJOR=False, VEC=4)
# (kernel, compile-time parameters, warps): each as the ops launch it for GroupMamba's shapes.
KERNELS = [
    (scan_n1._scan_n1_fwd_kernel, dict(_COMMON, A_LOG=True, BLOCK_D=1, BLOCK_T=128, STATE_T=128,
                                       PREFETCH=True), 1),
    (scan_n1._scan_n1_fwd_kernel, dict(_COMMON, A_LOG=True, BLOCK_D=2, BLOCK_T=64, STATE_T=128,
                                       PREFETCH=False), 1),
    (scan_n1._scan_n1_bwd_kernel, dict(_COMMON, A_LOG=True, ATOMIC_BC=False, BLOCK_D=1,
                                       BLOCK_T=128, PREFETCH=True), 1),
    (scan_n1._scan_n1_bwd_kernel, dict(_COMMON, A_LOG=True, ATOMIC_BC=True, BLOCK_D=4,
                                       BLOCK_T=256, PREFETCH=True), 4),
    (scan._scan_fwd_kernel, dict(_COMMON, BLOCK_D=16, BLOCK_N=16, BLOCK_L=8), 4),
    (scan._scan_bwd_kernel, dict(_COMMON, BLOCK_D=8, BLOCK_N=16, BLOCK_L=8), 4),
    (depthwise_conv._dwconv_wgrad_kernel, dict(ROWS=8, BLOCK_W=8, BLOCK_C=64), 4),
    (norm_gate._norm_gate_fwd_kernel, dict(BLOCK_D=16, BLOCK_L=256), 4),
    (norm_gate._norm_gate_bwd_kernel, dict(BLOCK_D=128, BLOCK_L=16), 4),
    (modulate_norm._modulate_norm_fwd_kernel, dict(HAS_AFFINITY=True, BLOCK_T=64,
                                                   BLOCK_C=64), 4),
    (modulate_norm._modulate_norm_bwd_kernel, dict(HAS_AFFINITY=False, BLOCK_T=4,
                                                   BLOCK_C=512), 4),
    # The residual sum before the FFN's norm at stage 1; the mixer's input norm at stage 4.
    (layer_norm._layer_norm_fwd_kernel, dict(RESIDUAL=True, SCALED=True, TOKENS=False,
                                             MEANS=False, BLOCK_L=64, BLOCK_C=64), 4),
    (layer_norm._layer_norm_fwd_kernel, dict(RESIDUAL=False, SCALED=False, TOKENS=True,
                                             MEANS=True, BLOCK_L=16, BLOCK_C=512), 8),
    (layer_norm._layer_norm_bwd_kernel, dict(_LN_GRADS, BLOCK_L=32, BLOCK_C=64), 4),
    (layer_norm._layer_norm_bwd_kernel, dict(_LN_GRADS, BLOCK_L=16, BLOCK_C=512), 8),
    # CAM at GroupMamba-T's stage 3 (R = 21) and GroupMamba-B's stage 4 (R = 64).
    (channel_affinity._affinity_fwd_kernel, dict(BLOCK_R=32, BLOCK_C=64), 4),
    (channel_affinity._affinity_bwd_kernel, dict(BLOCK_R=64, BLOCK_C=32), 4),
] + [(depthwise_conv._dwconv_stencil_kernel,
      dict(MIRRORED=mirrored, HAS_BIAS=True, ACTIVATION=activation, ACTIVATION_GRAD=grad,
           STORE_OUTPUT=store, ROWS=8, BLOCK_W=32, BLOCK_C=64), 4)
     for mirrored, activation, grad, store in [(False, 0, False, False), (True, 0, False, False),
                                               (False, 1, False, False), (False, 2, True, False),
                                               (False, 2, True, True)]]


def _argument_type(name: str) -> str:
    if name.endswith('_ptr'):
        return '*bf16' if name in _ACTIVATION_POINTERS else '*fp32'
    if name == 'eps':
        return 'fp32'
    return 'i64' if name == 'dir_code' else 'i32'


@pytest.mark.parametrize('kernel,constexprs,warps', KERNELS,
                         ids=[f'{k.fn.__name__}-{i}' for i, (k, _, _) in enumerate(KERNELS)])
def test_kernel_compiles_for_sm90(kernel, constexprs, warps):
    params = list(inspect.signature(kernel.fn).parameters)
    assert set(constexprs) <= set(params), set(constexprs) - set(params)
    signature = {p: 'constexpr' if p in constexprs else _argument_type(p) for p in params}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(k), ): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget('cuda', 90, 32),
                              options=dict(num_warps=warps))
    assert compiled.asm['cubin'], kernel.fn.__name__
