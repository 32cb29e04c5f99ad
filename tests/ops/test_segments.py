"""``ops.fused.cast_weights`` / ``sum_images`` and their one-launch kernels
(``ops.triton.segments``): through Triton's interpreter on the CPU, natively on a GPU."""
import textwrap

import pytest
import torch

from conftest import run_in_triton_interpreter
from mmgroupmamba.ops.fused import cast_weights, sum_images

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def check_cast(device):
    """Casts of 1 to 6 weights (two launches past 4), repeated or not, against ``Tensor.to``:
    equal values (rounded to nearest, ties to even; NaN and infinities kept), shapes, contiguity
    and aligned starts in the shared buffer."""
    shapes = [(4, 32, 16), (7, ), (4, 3, 16), (64, 256), (1, ), (4, 16, 2)]
    weights = [torch.randn(s, device=device) for s in shapes]
    # Ties between bf16 neighbours (odd and even), the largest finite values, and non-finites.
    weights[1] = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 3.3895e38,
                               float('inf'), float('-inf'), float('nan')], device=device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for batch in (None, 1, 3):
            for count in (1, 2, 4, 6):
                outs = cast_weights(weights[:count], dtype, batch)
                assert len(outs) == count
                for w, out in zip(weights, outs):
                    ref = w.to(dtype)
                    if batch is not None:
                        ref = ref.expand(batch, *w.shape)
                    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
                    assert out.storage_offset() % 64 == 0
                    assert torch.allclose(out, ref, rtol=0, atol=0, equal_nan=True), (
                        dtype, batch, count, w.shape)
    # Weights already in the dtype are not copied.
    assert cast_weights(weights[:2], torch.float32)[1] is weights[1]


def check_sum_images(device):
    """Sums over images (one launch for up to four tensors) against float32 sums, in the asked
    dtypes, as new tensors; images not a multiple of the kernel's rows."""
    tensors = [torch.randn(37, 4, 32, 16, device=device).bfloat16(),
               torch.randn(37, 5, device=device).bfloat16(),
               torch.randn(37, 300, device=device), torch.randn(37, 1, 2, device=device).half(),
               torch.randn(37, 130, device=device).bfloat16()]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.float16, torch.float64]
    outs = sum_images(tensors, dtypes)
    for t, dtype, out in zip(tensors, dtypes, outs):
        ref = t.float().sum(0)
        assert out.shape == t.shape[1:] and out.dtype == dtype and out.is_contiguous()
        assert out.storage_offset() == 0
        torch.testing.assert_close(out.float(), ref, rtol=1e-3 if dtype == torch.float16 else 1e-6,
                                   atol=1e-2 if dtype == torch.float16 else 1e-5)


def test_plain_operators_on_the_cpu():
    check_cast('cpu')
    check_sum_images('cpu')


SEGMENTS_INTERPRETER_CHECK = textwrap.dedent('''
    import sys
    import torch
    sys.path.insert(0, 'tests/ops')
    from test_segments import check_cast, check_sum_images
    from mmgroupmamba.ops.triton import segments
    torch.manual_seed(0)
    check_cast('cpu')
    check_sum_images('cpu')
    assert segments.compiled_kernel_count() == 0  # interpreted, nothing compiled
    print('ok')
''')


def test_kernels_in_interpreter():
    run_in_triton_interpreter(SEGMENTS_INTERPRETER_CHECK)


def test_kernel_rejects_more_tensors_than_segments():
    pytest.importorskip('triton')
    from mmgroupmamba.ops.triton import segments
    with pytest.raises(ValueError, match='1 to 4 tensors'):
        segments.cast([torch.ones(1)] * 5, torch.float16)


@requires_cuda
def test_kernels_on_gpu():
    torch.manual_seed(0)
    check_cast('cuda')
    check_sum_images('cuda')
