"""The timing helpers' kernel groups (the timings themselves need a GPU)."""
import pytest

from common.speed import kernel_kind


def test_profile_kernel_kinds():
    """The profile's kernel groups: the project's own Triton kernels by their names, then
    Inductor's, library GEMMs and copies."""
    triton_depthwise_conv = pytest.importorskip('mmgroupmamba.ops.triton.depthwise_conv')
    from mmgroupmamba.ops.triton import scan as triton_scan
    from mmgroupmamba.ops.triton import scan_n1 as triton_scan_n1

    for kernel in (triton_scan._scan_fwd_kernel, triton_scan_n1._scan_n1_bwd_kernel):
        assert kernel_kind(kernel.fn.__name__) == 'selective scan'
    for kernel in (triton_depthwise_conv._dwconv_stencil_kernel,
                   triton_depthwise_conv._dwconv_wgrad_kernel):
        assert kernel_kind(kernel.fn.__name__) == 'depthwise conv'
    assert kernel_kind('triton_poi_fused_gelu_permute_28') == 'Inductor pointwise'
    assert kernel_kind('triton_per_fused_native_layer_norm_3') == 'Inductor reduction'
    assert kernel_kind('void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_bf16>') == 'GEMM'
    assert kernel_kind('void at::native::elementwise_kernel<direct_copy_kernel_cuda>') == 'copy'
    assert kernel_kind('some_kernel') == 'other'
