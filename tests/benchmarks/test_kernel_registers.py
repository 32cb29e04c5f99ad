"""The register report compiles kernels for sm_90 without a GPU; its occupancy arithmetic."""
import pytest

pytest.importorskip('triton')

import kernel_registers  # noqa: E402
from mmgroupmamba.ops.triton import depthwise_conv  # noqa: E402


def test_warps_per_sm_follow_registers_shared_memory_and_the_caps():
    # 227 registers round up to 232 per thread: two blocks of 4 warps fit 65,536 registers.
    assert kernel_registers.warps_per_sm(227, 0, 4) == 8
    assert kernel_registers.warps_per_sm(32, 0, 8) == 64  # the 64-warp cap
    assert kernel_registers.warps_per_sm(32, 0, 1) == 32  # the 32-block cap
    assert kernel_registers.warps_per_sm(32, 100 * 1024, 4) == 8  # two blocks of shared memory


def test_report_of_a_stencil_geometry():
    flags = dict(MIRRORED=False, HAS_BIAS=True, ACTIVATION=2, ACTIVATION_GRAD=False,
                 STORE_OUTPUT=False, SAME_STRIDES=True, COLUMN_SUMS=False, ROWS=8, BLOCK_W=16,
                 BLOCK_C=64)
    pointers = ('src_ptr', 'dst_ptr', 'g_ptr', 'out_ptr')
    four = kernel_registers.compile_report(depthwise_conv._dwconv_stencil_kernel, flags, 4,
                                           pointers)
    eight = kernel_registers.compile_report(depthwise_conv._dwconv_stencil_kernel, flags, 8,
                                            pointers)
    assert 0 < eight['registers'] < four['registers'] <= 255
    assert four['warps_per_sm'] == kernel_registers.warps_per_sm(four['registers'],
                                                                 four['shared'], 4)
    with pytest.raises(ValueError, match='NO_SUCH'):
        kernel_registers.compile_report(depthwise_conv._dwconv_stencil_kernel,
                                        dict(flags, NO_SUCH=1), 4)
