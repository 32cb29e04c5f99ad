"""``ops._products.product_in``: products written in the parameter's dtype."""
import pytest
import torch

from mmgroupmamba.ops._products import product_in

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.mark.parametrize('shape', [((5, 7), (7, 3)), ((2, 5, 7), (2, 7, 3))])
def test_cpu_product_is_cast(shape):
    a, b = (torch.randn(s).to(torch.bfloat16) for s in shape)
    out = product_in(a, b, torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.matmul(a, b).float())


@requires_cuda
@pytest.mark.parametrize('shape', [((64, 4096), (4096, 48)), ((4, 32, 8192), (4, 8192, 16))])
def test_cuda_product_of_16_bit_operands_is_float32_and_not_rounded(shape):
    """The float32 result is the product's accumulators, closer to the exact product than the
    16-bit product cast afterwards."""
    torch.manual_seed(0)
    a, b = (torch.randn(s, device='cuda').to(torch.bfloat16) for s in shape)
    exact = torch.matmul(a.double(), b.double())
    out = product_in(a, b, torch.float32)
    assert out.dtype == torch.float32
    rounded = torch.matmul(a, b).float()
    assert (out.double() - exact).abs().max() < (rounded.double() - exact).abs().max()
